//! Activation functions by their Hugging Face `hidden_act` names, from differentiable primitives.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// The activations used by the supported towers and language models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU, `gelu` in transformers.
    Gelu,
    /// tanh-approximated GELU (`gelu_pytorch_tanh`, `gelu_new`), SigLIP's default.
    #[serde(alias = "gelu_new", alias = "gelu_fast")]
    GeluPytorchTanh,
    /// x·σ(1.702x), CLIP's default.
    QuickGelu,
    /// x·σ(x), the SwiGLU gate of Qwen2/Llama.
    #[serde(alias = "swish")]
    Silu,
    Relu,
}

impl Activation {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => crate::fused::gelu(x, crate::fused::GeluKind::Erf),
            Activation::GeluPytorchTanh => crate::fused::gelu(x, crate::fused::GeluKind::Tanh),
            Activation::QuickGelu => x.mul(&sigmoid(&(x * 1.702)?)?),
            Activation::Silu => x.mul(&sigmoid(x)?),
            Activation::Relu => x.relu(),
        }
    }
}

/// σ(x) = 1 / (1 + e^{-x}) from primitives (so the gradient flows).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}
