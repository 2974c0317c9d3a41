//! Differentiable building blocks shared by mmkd's vision towers and language models.
//!
//! candle's fused CPU ops (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope`) silently drop
//! gradients, so every layer here is written from primitive ops whose backward passes are
//! correct. Parameters live in a [`ParamStore`]: trainable ones as `Var`s, frozen ones as plain
//! tensors that build no autograd graph. [`fused`] holds the speed-critical kernels (RMSNorm,
//! attention softmax, rotary embedding, SwiGLU) as custom ops with their own exact backward
//! passes, each tested against the primitive-op formulation.

pub mod activation;
pub mod attention;
pub mod error;
pub mod fused;
pub mod grad_check;
pub mod layers;
pub mod lora;
pub mod params;
pub mod rng;
pub mod weights;

pub use activation::Activation;
pub use error::{NnError, Result};
pub use layers::{Embedding, LayerNorm, Linear, RmsNorm};
pub use lora::{LoraBranch, LoraPlan, LoraTargets};
pub use params::{Init, ParamBuilder, ParamStore};
pub use rng::SeededRng;
pub use weights::WeightSource;
