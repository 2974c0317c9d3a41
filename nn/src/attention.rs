//! Scaled dot-product attention from explicit ops (candle's fused sdpa has no backward).

use candle_core::{Result, Tensor, D};

/// softmax(q kᵀ · scale + mask) v for q `[b, h, s, d]`, k/v `[b, h, t, d]`; `mask` is additive
/// and broadcastable to `[b, h, s, t]` (0 where allowed, a large negative value elsewhere).
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let mut scores = (q.matmul(&kt)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.matmul(&v.contiguous()?)
}

/// Repeats each key/value head `n_rep` times along dim 1 (grouped-query attention).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .contiguous()?
        .reshape((b, h * n_rep, t, d))
}

/// The value added to masked attention scores (finite, so fully masked padding rows stay NaN-free).
pub const MASK_VALUE: f32 = -1e9;
