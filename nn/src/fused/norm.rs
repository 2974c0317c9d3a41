//! RMSNorm: y = x · r · w with r = 1 / √(mean(x²) + ε) per row.
//!
//! Backward, with g = ∂L/∂y ⊙ w and n the row width:
//! ∂L/∂x = r·g − x·r³·(Σ g·x)/n,   ∂L/∂w = Σ_rows ∂L/∂y ⊙ x·r.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::simd::sum_map;
use super::{data, for_each_row, has_kernel, multiversion, storage, sum_over_rows, Real};

/// RMSNorm over the last dimension of `x` with weight `w` (`[n]`), fused when `x` is f32/f64
/// (otherwise the primitive-op formulation, which computes the statistics in f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if has_kernel(x) && w.dtype() == x.dtype() && w.dims() == [x.dim(D::Minus1)?] {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    } else {
        rms_norm_slow(x, w, eps)
    }
}

/// The reference formulation from primitive ops (statistics in f32 for half inputs).
pub fn rms_norm_slow(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let work = if dtype == candle_core::DType::F64 {
        dtype
    } else {
        candle_core::DType::F32
    };
    let xw = x.to_dtype(work)?;
    let rms = (xw.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    xw.broadcast_div(&rms)?
        .to_dtype(dtype)?
        .broadcast_mul(&w.to_dtype(dtype)?)
}

#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let mean = sum_map(row, |v| v * v) / T::from_f64(row.len() as f64);
    (mean + T::from_f64(eps)).sqrt().recip()
}

multiversion! {
    fn fwd_row<T: Real>(x: &[T], w: &[T], y: &mut [T], eps: f64) {
        let inv = inv_rms(x, eps);
        for ((y, &xv), &wv) in y.iter_mut().zip(x).zip(w) {
            *y = xv * inv * wv;
        }
    }
}

multiversion! {
    fn grad_x_row<T: Real>(x: &[T], w: &[T], g: &[T], dx: &mut [T], eps: f64) {
        let inv = inv_rms(x, eps);
        let dot = super::simd::sum_map3(x, g, w, |xv, gv, wv| xv * gv * wv);
        let c = inv * inv * inv * dot / T::from_f64(x.len() as f64);
        for (((d, &xv), &gv), &wv) in dx.iter_mut().zip(x).zip(g).zip(w) {
            *d = inv * gv * wv - xv * c;
        }
    }
}

multiversion! {
    fn grad_w_row<T: Real>(x: &[T], g: &[T], acc: &mut [T], eps: f64) {
        let inv = inv_rms(x, eps);
        for ((a, &xv), &gv) in acc.iter_mut().zip(x).zip(g) {
            *a += gv * xv * inv;
        }
    }
}

struct RmsNorm {
    eps: f64,
}

impl RmsNorm {
    fn fwd<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let n = w.len();
        let mut out = vec![T::zero(); x.len()];
        for_each_row(&mut out, n, |r, y| {
            fwd_row(&x[r * n..(r + 1) * n], w, y, self.eps)
        });
        out
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "mmkd-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match xs {
            CpuStorage::F32(_) => {
                storage(self.fwd::<f32>(data(xs, xl, self.name())?, data(ws, wl, self.name())?))
            }
            CpuStorage::F64(_) => {
                storage(self.fwd::<f64>(data(xs, xl, self.name())?, data(ws, wl, self.name())?))
            }
            _ => candle_core::bail!("{}: f32/f64 only", self.name()),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormGradX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&dy, &RmsNormGradW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// ∂L/∂x from (x, w, ∂L/∂y).
struct RmsNormGradX {
    eps: f64,
}

impl RmsNormGradX {
    fn run<T: Real>(&self, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
        let n = w.len();
        let mut out = vec![T::zero(); x.len()];
        for_each_row(&mut out, n, |r, dx| {
            let span = r * n..(r + 1) * n;
            grad_x_row(&x[span.clone()], w, &dy[span], dx, self.eps)
        });
        out
    }
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "mmkd-rms-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match xs {
            CpuStorage::F32(_) => storage(self.run::<f32>(
                data(xs, xl, name)?,
                data(ws, wl, name)?,
                data(gs, gl, name)?,
            )),
            CpuStorage::F64(_) => storage(self.run::<f64>(
                data(xs, xl, name)?,
                data(ws, wl, name)?,
                data(gs, gl, name)?,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, xl.shape().clone()))
    }
}

/// ∂L/∂w from (x, ∂L/∂y).
struct RmsNormGradW {
    eps: f64,
}

impl RmsNormGradW {
    fn run<T: Real>(&self, x: &[T], dy: &[T], n: usize) -> Vec<T> {
        sum_over_rows(x.len() / n, n, |r, acc| {
            let span = r * n..(r + 1) * n;
            grad_w_row(&x[span.clone()], &dy[span], acc, self.eps)
        })
    }
}

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "mmkd-rms-norm-grad-w"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let n = *xl.dims().last().unwrap_or(&0);
        let out = match xs {
            CpuStorage::F32(_) => {
                storage(self.run::<f32>(data(xs, xl, name)?, data(gs, gl, name)?, n))
            }
            CpuStorage::F64(_) => {
                storage(self.run::<f64>(data(xs, xl, name)?, data(gs, gl, name)?, n))
            }
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::DType;

    #[test]
    fn matches_the_primitive_formulation_f64() {
        // 3 × 700 rows of 300: more rows than one task, so the parallel paths run too.
        let x = random(&[3, 700, 300], 1, DType::F64);
        let w = random(&[300], 2, DType::F64);
        check_against_slow(
            &[x, w],
            |a| rms_norm(&a[0], &a[1], 1e-6),
            |a| rms_norm_slow(&a[0], &a[1], 1e-6),
            1e-10,
        );
    }

    #[test]
    fn matches_the_primitive_formulation_f32() {
        let x = random(&[2, 5, 64], 3, DType::F32);
        let w = random(&[64], 4, DType::F32);
        check_against_slow(
            &[x, w],
            |a| rms_norm(&a[0], &a[1], 1e-5),
            |a| rms_norm_slow(&a[0], &a[1], 1e-5),
            1e-4,
        );
    }
}
