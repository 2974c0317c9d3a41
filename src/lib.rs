//! mmkd: distilling multimodal large language models (LLaVA-KD) with candle.
//!
//! - [`models`]: differentiable Qwen2/Llama decoders, the LLaVA projector and splice.
//! - [`cli`]: the `mmkd` command line.

pub mod cli;
pub mod models;
