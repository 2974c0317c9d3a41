//! mmkd: distilling multimodal large language models (LLaVA-KD) with candle.
//!
//! - [`models`]: differentiable Qwen2/Llama decoders, the LLaVA projector, splice and assembly.
//! - [`checkpoint`]: Hugging Face LLaVA checkpoint directories (load, compose, save, hub).
//! - [`generate`]: batched KV-cached generation.
//! - [`cli`]: the `mmkd` command line.

pub mod checkpoint;
pub mod cli;
pub mod generate;
pub mod models;
pub mod prompt;
