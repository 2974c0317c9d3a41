//! mmkd: distilling multimodal large language models (LLaVA-KD) with candle.
//!
//! - [`models`]: differentiable Qwen2/Llama decoders, the LLaVA projector, splice and assembly.
//! - [`checkpoint`]: Hugging Face LLaVA checkpoint directories (load, compose, save, hub).
//! - [`generate`]: batched KV-cached generation.
//! - [`distill`]: the divergence family, MDist (L_res, L_vis), RDist and cross-entropy.
//! - [`train`]: AdamW, schedules, the stage loop with checkpoints and resume.
//! - [`config`]: presets (TOML with inheritance and overrides).
//! - [`eval`]: VQA accuracy, caption metrics, POPE, multiple choice.
//! - [`evaluate`]: running a model over benchmarks (batched generation + scoring).
//! - [`teacher_cache`]: the offline teacher cache (`mmkd teacher-cache`, `--teacher-cache`).
//! - [`bench`]: the distillation-step benchmark (`mmkd bench`).
//! - [`cli`]: the `mmkd` command line.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod demo;
pub mod distill;
pub mod eval;
pub mod evaluate;
pub mod generate;
pub mod models;
pub mod prompt;
pub mod teacher_cache;
pub mod train;
