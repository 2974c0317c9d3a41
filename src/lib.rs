//! mmkd: distilling multimodal large language models (LLaVA-KD) with candle.
//!
//! - [`models`]: differentiable Qwen2/Llama decoders, the LLaVA projector and splice.
//! - [`checkpoint`]: Hugging Face LLaVA checkpoint directories (load, compose, save).
//! - [`eval`]: evaluation metrics (VQA, captions, POPE, multiple choice) and their file readers.
//! - [`cli`]: the `mmkd` command line.

pub mod cli;
pub mod eval;
