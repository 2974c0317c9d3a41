//! Attention probabilities: y = softmax(scale · x + mask) over the last dimension, the additive
//! mask broadcast over heads.
//!
//! Backward: ∂L/∂x = scale · y ⊙ (∂L/∂y − Σ ∂L/∂y ⊙ y); the mask gets no gradient (it is a
//! constant by construction).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::simd::{max_of, sum_map2};
use super::{data, for_each_row, has_kernel, multiversion, storage, Real};

/// `softmax(scale · x + mask)` over the last dimension of `x` (`[b, h, q, k]`, or any rank
/// without a mask). `mask` is `[b or 1, 1, q, k]`.
pub fn scaled_masked_softmax(x: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if !has_kernel(x) {
        return scaled_masked_softmax_slow(x, mask, scale);
    }
    let x = x.contiguous()?;
    match mask {
        None => x.apply_op1(ScaledSoftmax {
            scale,
            mask_batch: 0,
        }),
        Some(mask) => {
            let mask = mask.to_dtype(x.dtype())?.contiguous()?;
            match (x.dims(), mask.dims()) {
                (&[b, _, q, k], &[mb, 1, mq, mk]) if (mb == b || mb == 1) && (mq, mk) == (q, k) => {
                    x.apply_op2(
                        &mask,
                        ScaledSoftmax {
                            scale,
                            mask_batch: mb,
                        },
                    )
                }
                _ => scaled_masked_softmax_slow(&x, Some(&mask), scale),
            }
        }
    }
}

/// The reference formulation from primitive ops.
pub fn scaled_masked_softmax_slow(x: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let mut scores = (x * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    candle_nn::ops::softmax(&scores, D::Minus1)
}

multiversion! {
    /// y = softmax(scale · x + mask) of one row.
    fn softmax_row<T: Real>(x: &[T], mask: Option<&[T]>, y: &mut [T], scale: T) {
        match mask {
            Some(m) => {
                for ((y, &xv), &mv) in y.iter_mut().zip(x).zip(m) {
                    *y = xv * scale + mv;
                }
            }
            None => {
                for (y, &xv) in y.iter_mut().zip(x) {
                    *y = xv * scale;
                }
            }
        }
        let max = max_of(y);
        for v in y.iter_mut() {
            *v = (*v - max).exp_fast();
        }
        let inv = super::simd::sum_map(y, |v| v).recip();
        for v in y.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// dx = scale · y ⊙ (dy − Σ dy ⊙ y) of one row.
    fn softmax_grad_row<T: Real>(y: &[T], dy: &[T], dx: &mut [T], scale: T) {
        let dot = sum_map2(y, dy, |a, b| a * b);
        for ((d, &yv), &gv) in dx.iter_mut().zip(y).zip(dy) {
            *d = scale * yv * (gv - dot);
        }
    }
}

/// `mask_batch` is 0 without a mask, else the mask's batch size (1 = shared by the batch).
struct ScaledSoftmax {
    scale: f64,
    mask_batch: usize,
}

impl ScaledSoftmax {
    /// `dims` of x: rows are grouped `[b, h, q]` when a mask is given.
    fn fwd<T: Real>(&self, x: &[T], mask: Option<&[T]>, dims: &[usize]) -> Vec<T> {
        let k = *dims.last().unwrap_or(&1);
        let (heads, q) = match dims {
            [_, h, q, _] => (*h, *q),
            _ => (1, 1),
        };
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); x.len()];
        for_each_row(&mut out, k, |r, y| {
            let mask_row = mask.map(|m| {
                let batch = if self.mask_batch == 1 {
                    0
                } else {
                    r / (heads * q)
                };
                let m_row = batch * q + r % q;
                &m[m_row * k..(m_row + 1) * k]
            });
            softmax_row(&x[r * k..(r + 1) * k], mask_row, y, scale)
        });
        out
    }

    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "mmkd-scaled-masked-softmax";
        let out = match xs {
            CpuStorage::F32(_) => {
                let m = mask.map(|(s, l)| data::<f32>(s, l, name)).transpose()?;
                storage(self.fwd::<f32>(data(xs, xl, name)?, m, xl.dims()))
            }
            CpuStorage::F64(_) => {
                let m = mask.map(|(s, l)| data::<f64>(s, l, name)).transpose()?;
                storage(self.fwd::<f64>(data(xs, xl, name)?, m, xl.dims()))
            }
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn grad(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxGrad { scale: self.scale })
    }
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "mmkd-scaled-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, None)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(y, dy)?))
    }
}

impl CustomOp2 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "mmkd-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, Some((ms, ml)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(y, dy)?), None))
    }
}

/// scale · y ⊙ (dy − Σ dy ⊙ y) per row, from (y, dy).
struct SoftmaxGrad {
    scale: f64,
}

impl SoftmaxGrad {
    fn run<T: Real>(&self, y: &[T], dy: &[T], k: usize) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); y.len()];
        for_each_row(&mut out, k, |r, dx| {
            let span = r * k..(r + 1) * k;
            softmax_grad_row(&y[span.clone()], &dy[span], dx, scale)
        });
        out
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "mmkd-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let k = *yl.dims().last().unwrap_or(&1);
        let out = match ys {
            CpuStorage::F32(_) => {
                storage(self.run::<f32>(data(ys, yl, name)?, data(gs, gl, name)?, k))
            }
            CpuStorage::F64(_) => {
                storage(self.run::<f64>(data(ys, yl, name)?, data(gs, gl, name)?, k))
            }
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, yl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::MASK_VALUE;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::{DType, Device};

    /// A causal mask with padding: sample 1's first key is padding.
    fn mask(b: usize, q: usize) -> Tensor {
        let mut m = vec![0f64; b * q * q];
        for s in 0..b {
            for i in 0..q {
                for j in 0..q {
                    if j > i || (s == 1 && j == 0) {
                        m[(s * q + i) * q + j] = MASK_VALUE as f64;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, q, q), &Device::Cpu).unwrap()
    }

    #[test]
    fn masked_matches_the_primitive_formulation() {
        // Large enough for several parallel tasks.
        let x = random(&[2, 3, 150, 150], 1, DType::F64);
        let m = mask(2, 150);
        check_against_slow(
            &[x],
            |a| scaled_masked_softmax(&a[0], Some(&m), 0.125),
            |a| scaled_masked_softmax_slow(&a[0], Some(&m), 0.125),
            1e-12,
        );
        // A mask shared by the batch, in f32.
        let x = random(&[2, 2, 7, 7], 2, DType::F32);
        let m1 = mask(1, 7).to_dtype(DType::F32).unwrap();
        check_against_slow(
            &[x],
            |a| scaled_masked_softmax(&a[0], Some(&m1), 0.3),
            |a| scaled_masked_softmax_slow(&a[0], Some(&m1), 0.3),
            1e-5,
        );
    }

    #[test]
    fn unmasked_matches_the_primitive_formulation() {
        let x = random(&[3, 4, 9], 3, DType::F64);
        check_against_slow(
            &[x],
            |a| scaled_masked_softmax(&a[0], None, 0.7),
            |a| scaled_masked_softmax_slow(&a[0], None, 0.7),
            1e-12,
        );
    }

    #[test]
    fn the_mask_gets_no_gradient() {
        let x = candle_core::Var::from_tensor(&random(&[1, 1, 3, 3], 4, DType::F64)).unwrap();
        let m = candle_core::Var::from_tensor(&mask(1, 3)).unwrap();
        let y = scaled_masked_softmax(x.as_tensor(), Some(m.as_tensor()), 1.0).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(m.as_tensor()).is_none());
    }
}
