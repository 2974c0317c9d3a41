//! Scaled dot-product attention with an exact backward pass (candle's fused sdpa has none).

use candle_core::{Result, Tensor};

use crate::fused::scaled_masked_softmax;

/// softmax(q kᵀ · scale + mask) v for q `[b, h, s, d]`, k/v `[b, g, t, d]` where g divides h
/// (grouped-query attention: query head i reads key/value head i / (h / g), as transformers'
/// `repeat_kv` arranges it, without materialising the repeated heads). `mask` is additive,
/// `[b or 1, 1, s, t]` (0 where allowed, a large negative value elsewhere).
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (_, g, t, _) = k.dims4()?;
    if g == 0 || h % g != 0 {
        candle_core::bail!("attention: {h} query heads cannot share {g} key/value heads");
    }
    // [b, h, s, d] → [b, g, (h/g)·s, d]: the query heads of one group become extra rows.
    let q = q.contiguous()?.reshape((b, g, h / g * s, d))?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let scores = q.matmul(&kt)?.reshape((b, h, s, t))?;
    let probs = scaled_masked_softmax(&scores, mask, scale)?;
    probs
        .reshape((b, g, h / g * s, t))?
        .matmul(&v.contiguous()?)?
        .reshape((b, h, s, d))
}

/// Repeats each key/value head `n_rep` times along dim 1 (grouped-query attention written out;
/// [`scaled_dot_product`] does not need it).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::softmax::scaled_masked_softmax_slow;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::{DType, Device};

    /// The textbook formulation: repeated heads, explicit scale and mask, softmax, · v.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let rep = q.dim(1)? / k.dim(1)?;
        let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
        let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        scaled_masked_softmax_slow(&scores, Some(mask), scale)?.matmul(&v)
    }

    #[test]
    fn grouped_attention_matches_repeated_heads() {
        let (b, h, g, s, d) = (2, 6, 2, 5, 4);
        let q = random(&[b, h, s, d], 1, DType::F64);
        let k = random(&[b, g, s, d], 2, DType::F64);
        let v = random(&[b, g, s, d], 3, DType::F64);
        let mut m = vec![0f64; b * s * s];
        for i in 0..s {
            for j in i + 1..s {
                m[i * s + j] = MASK_VALUE as f64;
                m[(s + i) * s + j] = MASK_VALUE as f64;
            }
        }
        m[s * s] = MASK_VALUE as f64; // sample 1, query 0 cannot see key 0 either
        let mask = Tensor::from_vec(m, (b, 1, s, s), &Device::Cpu).unwrap();
        check_against_slow(
            &[q, k, v],
            |a| scaled_dot_product(&a[0], &a[1], &a[2], Some(&mask), 0.5),
            |a| reference(&a[0], &a[1], &a[2], &mask, 0.5),
            1e-12,
        );
    }

    #[test]
    fn heads_that_do_not_group_are_an_error() {
        let q = random(&[1, 3, 2, 4], 1, DType::F32);
        let k = random(&[1, 2, 2, 4], 2, DType::F32);
        let err = scaled_dot_product(&q, &k, &k, None, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 query heads cannot share 2"), "{err}");
    }
}
