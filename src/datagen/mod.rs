//! Data distillation (`mmkd distill-data`): a teacher writes the training data. A recipe steers
//! it to a skill with prompt templates and seed knowledge; the teacher (a local model, or any
//! server of the OpenAI chat-completions API) answers on unlabeled images; filters drop what is
//! empty, cut off, duplicated, outside the answer set, unsure or untrainable; what is kept is a
//! LLaVA-format dataset that `mmkd sft|dft` read unchanged.
//!
//! - [`recipe`]: recipe files, seed knowledge, the prompts planned for an image.
//! - [`filters`]: the checks on each reply, counted by reason.
//! - [`client`]: the chat-completions client (concurrency, timeouts, retries with backoff).
//! - [`teacher`]: local and API teachers behind one interface; the supervised-span check.
//! - [`job`]: a resumable run over an image folder, its data file and manifest.

pub mod client;
pub mod filters;
pub mod job;
pub mod logprobs;
pub mod recipe;
pub mod teacher;

pub use job::{describe, run, JobRequest, Summary};
pub use recipe::Recipe;
pub use teacher::{DataTeacher, SpanCheck};
