//! mmkd: distilling multimodal large language models (LLaVA-KD) with candle.
//!
//! - [`models`]: differentiable Qwen2/Llama decoders, the LLaVA projector, splice and assembly.
//! - [`checkpoint`]: Hugging Face LLaVA checkpoint directories (load, compose, save, hub).
//! - [`generate`]: batched KV-cached generation.
//! - [`distill`]: the divergence family, MDist (L_res, L_vis), RDist and cross-entropy.
//! - [`batch`]: data → model inputs, the one batch layer every command uses.
//! - [`objective`]: training objectives composed of named loss terms.
//! - [`teacher`]: teacher signals (an online teacher, a teacher cache) and the cache writer.
//! - [`train`]: the learner — one step for every stage, AdamW, schedules, metrics, state.
//! - [`stages`]: a stage run from a preset, with checkpoints and resume.
//! - [`runtime`]: the device and the gradient-sync hook.
//! - [`config`]: presets (TOML with inheritance and overrides).
//! - [`scoring`]: model-free scorers (`mmkd metrics`): VQA accuracy, caption metrics, POPE,
//!   multiple choice, as the official scorers compute them.
//! - [`eval`]: a model run over evaluation sets (`mmkd eval`): batched generation, then
//!   [`scoring`].
//! - [`teacher_cache`]: the offline teacher cache's format (manifest, shards, store).
//! - [`datagen`]: data distillation (`mmkd distill-data`): a teacher writes training data
//!   from recipes on unlabeled images.
//! - [`bench`]: the distillation-step benchmark (`mmkd bench`).
//! - [`cli`]: the `mmkd` command line.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod datagen;
pub mod demo;
pub mod distill;
pub mod eval;
pub mod experts;
pub mod generate;
pub mod merge;
pub mod models;
pub mod objective;
pub mod progress;
pub mod prompt;
pub mod runtime;
pub mod scoring;
pub mod selection;
pub mod serve;
pub mod speculative;
pub mod stages;
pub mod teacher;
pub mod teacher_cache;
pub mod tower;
pub mod train;
