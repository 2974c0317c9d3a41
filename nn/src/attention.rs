//! Attention helpers. The attention itself is [`crate::fused::attention`] (one op with an
//! exact backward pass; candle's fused sdpa has none), with its reference formulation
//! [`crate::fused::attention::attention_slow`].

use candle_core::{Result, Tensor};

pub use crate::fused::attention::{attention, attention_slow};

/// Repeats each key/value head `n_rep` times along dim 1 of `[b, heads, t, d]` (grouped-query
/// attention written out, as transformers' `repeat_kv`; the reference formulation uses it).
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
