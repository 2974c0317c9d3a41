//! mmkd: distilling multimodal large language models (LLaVA-KD) with candle.
//!
//! - [`models`]: differentiable Qwen2/Llama decoders, the LLaVA projector and splice.
//! - [`checkpoint`]: Hugging Face LLaVA checkpoint directories (load, compose, save).
//! - [`distill`]: distillation losses (MDist, RDist, divergences) and the masked cross-entropy.
//! - [`train`]: AdamW with parameter groups, gradient clipping/accumulation, LR schedules.
//! - [`cli`]: the `mmkd` command line.

pub mod cli;
pub mod distill;
pub mod train;
