//! Linear, embedding and normalisation layers with correct gradients on every parameter.

use candle_core::{DType, Result as CResult, Tensor, D};

use crate::error::Result;
use crate::lora::LoraBranch;
use crate::params::{Init, ParamBuilder};

/// y = x Wᵀ + b with the PyTorch weight layout `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A low-rank adapter (its base weight and bias are then frozen).
    pub lora: Option<LoraBranch>,
}

impl Linear {
    /// Builds `name.weight` (and `name.bias` when `bias`), initialised N(0, std²) / zeros.
    /// Where the builder's LoRA plan applies, the base is frozen and `name.lora_A.weight`
    /// (PEFT's init: uniform ±1/√in, what kaiming-uniform with a = √5 gives) and
    /// `name.lora_B.weight` (zeros) are added.
    pub fn new(
        pb: &ParamBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        std: f32,
    ) -> Result<Self> {
        let plan = pb.lora_here().cloned();
        let base = if plan.is_some() {
            pb.trainable(false)
        } else {
            pb.clone()
        };
        let weight = base.get((out_dim, in_dim), "weight", Init::Normal { std })?;
        let bias = if bias {
            Some(base.get(out_dim, "bias", Init::Zeros)?)
        } else {
            None
        };
        let lora = match plan {
            Some(plan) => {
                let adapter = |name: &str| {
                    pb.pp(name)
                        .trainable(plan.trainable)
                        .strict(plan.require_weights)
                };
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a = adapter("lora_A").get(
                    (plan.rank, in_dim),
                    "weight",
                    Init::Uniform { bound },
                )?;
                let b = adapter("lora_B").get((out_dim, plan.rank), "weight", Init::Zeros)?;
                Some(LoraBranch {
                    a,
                    b,
                    scale: plan.scale(),
                    dropout: plan.dropout,
                    name: pb.prefix().to_string(),
                })
            }
            None => None,
        };
        Ok(Self { weight, bias, lora })
    }

    /// A plain layer over given tensors (e.g. an LM head tied to the embeddings).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Works on any rank ≥ 1: one fused op for f32/f64 (see [`crate::fused::linear`]), primitive
    /// ops otherwise. Inputs are made contiguous first (candle's batched matmul fast path folds
    /// non-contiguous batches wrongly).
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let w = if self.weight.dtype() != x.dtype() {
            self.weight.to_dtype(x.dtype())?
        } else {
            self.weight.clone()
        };
        let b = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(x.dtype()))
            .transpose()?;
        match &self.lora {
            // One op keeps the graph as small as a plain layer's (see `fused::lora_linear`).
            Some(branch) if !branch.drops_now() => {
                let a = branch.a.to_dtype(x.dtype())?;
                let bm = branch.b.to_dtype(x.dtype())?;
                crate::fused::lora_linear(x, &w, b.as_ref(), &a, &bm, branch.scale)
            }
            Some(branch) => crate::fused::linear(x, &w, b.as_ref())? + branch.forward(x)?,
            None => crate::fused::linear(x, &w, b.as_ref()),
        }
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(pb: &ParamBuilder, vocab: usize, hidden: usize, std: f32) -> Result<Self> {
        Ok(Self {
            weight: pb.get((vocab, hidden), "weight", Init::Normal { std })?,
        })
    }

    /// ids of any shape → ids.shape + [hidden].
    pub fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        let mut dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let rows = self.weight.index_select(&flat, 0)?;
        dims.push(self.weight.dim(1)?);
        rows.reshape(dims)
    }
}

/// LayerNorm over the last dimension (statistics in f32).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: pb.get(dim, "weight", Init::Ones)?,
            bias: pb.get(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dtype = x.dtype();
        let work = stats_dtype(dtype);
        let x = x.to_dtype(work)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(work)?)?
            .broadcast_add(&self.bias.to_dtype(work)?)?
            .to_dtype(dtype)
    }
}

/// RMSNorm as in Qwen2/Llama: x / sqrt(mean(x²) + ε) · w, computed in f32.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(pb: &ParamBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: pb.get(dim, "weight", Init::Ones)?,
            eps,
        })
    }

    /// Fused for f32/f64 (see [`crate::fused::rms_norm`]); half-precision inputs take the
    /// primitive-op path with f32 statistics.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        crate::fused::rms_norm(x, &self.weight.to_dtype(x.dtype())?, self.eps)
    }
}

/// Normalisation statistics are computed in f32 for half-precision inputs (as transformers
/// does) and in f64 for f64 inputs (gradient checks).
fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
