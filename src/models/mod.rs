//! Model code: the Qwen2/Llama decoder, the multimodal projector, the LLaVA splice and assembly.

pub mod decoder;
pub mod llava;
pub mod llava_config;
pub mod moe;
pub mod projector;
pub mod splice;
pub mod text_config;
