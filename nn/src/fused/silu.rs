//! The SwiGLU product y = silu(g) ⊙ u = g·σ(g) ⊙ u of Qwen2/Llama MLPs.
//!
//! Backward: ∂g = ∂y ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))), ∂u = ∂y ⊙ silu(g).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{data, for_each_row, has_kernel, multiversion, storage, Real};
use crate::activation::sigmoid;

/// `silu(gate) ⊙ up` for tensors of the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if has_kernel(gate) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    } else {
        silu_mul_slow(gate, up)
    }
}

/// The reference formulation from primitive ops.
pub fn silu_mul_slow(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.mul(&sigmoid(gate)?)?.mul(up)
}

#[inline(always)]
fn sig<T: Real>(g: T) -> T {
    (T::one() + (-g).exp_fast()).recip()
}

multiversion! {
    fn silu_mul_row<T: Real>(g: &[T], u: &[T], y: &mut [T]) {
        for ((y, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
            *y = gv * sig(gv) * uv;
        }
    }
}

multiversion! {
    fn grad_gate_row<T: Real>(g: &[T], u: &[T], dy: &[T], d: &mut [T]) {
        for (((d, &gv), &uv), &dv) in d.iter_mut().zip(g).zip(u).zip(dy) {
            let s = sig(gv);
            *d = dv * uv * s * (T::one() + gv * (T::one() - s));
        }
    }
}

multiversion! {
    fn grad_up_row<T: Real>(g: &[T], dy: &[T], d: &mut [T]) {
        for ((d, &gv), &dv) in d.iter_mut().zip(g).zip(dy) {
            *d = dv * gv * sig(gv);
        }
    }
}

/// Rows of the last dimension (any split works for element-wise kernels).
fn width(l: &Layout) -> usize {
    (*l.dims().last().unwrap_or(&1)).max(1)
}

struct SiluMul;

impl SiluMul {
    fn run<T: Real>(g: &[T], u: &[T], w: usize) -> Vec<T> {
        let mut out = vec![T::zero(); g.len()];
        for_each_row(&mut out, w, |r, y| {
            let span = r * w..(r + 1) * w;
            silu_mul_row(&g[span.clone()], &u[span], y)
        });
        out
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "mmkd-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match gs {
            CpuStorage::F32(_) => storage(Self::run::<f32>(
                data(gs, gl, name)?,
                data(us, ul, name)?,
                width(gl),
            )),
            CpuStorage::F64(_) => storage(Self::run::<f64>(
                data(gs, gl, name)?,
                data(us, ul, name)?,
                width(gl),
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &dy, &SiluMulGradGate)?;
        let d_up = gate.apply_op2_no_bwd(&dy, &SiluMulGradUp)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// ∂g from (g, u, ∂y).
struct SiluMulGradGate;

impl SiluMulGradGate {
    fn run<T: Real>(g: &[T], u: &[T], dy: &[T], w: usize) -> Vec<T> {
        let mut out = vec![T::zero(); g.len()];
        for_each_row(&mut out, w, |r, d| {
            let span = r * w..(r + 1) * w;
            grad_gate_row(&g[span.clone()], &u[span.clone()], &dy[span], d)
        });
        out
    }
}

impl CustomOp3 for SiluMulGradGate {
    fn name(&self) -> &'static str {
        "mmkd-silu-mul-grad-gate"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match gs {
            CpuStorage::F32(_) => storage(Self::run::<f32>(
                data(gs, gl, name)?,
                data(us, ul, name)?,
                data(ds, dl, name)?,
                width(gl),
            )),
            CpuStorage::F64(_) => storage(Self::run::<f64>(
                data(gs, gl, name)?,
                data(us, ul, name)?,
                data(ds, dl, name)?,
                width(gl),
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, gl.shape().clone()))
    }
}

/// ∂u from (g, ∂y).
struct SiluMulGradUp;

impl SiluMulGradUp {
    fn run<T: Real>(g: &[T], dy: &[T], w: usize) -> Vec<T> {
        let mut out = vec![T::zero(); g.len()];
        for_each_row(&mut out, w, |r, d| {
            let span = r * w..(r + 1) * w;
            grad_up_row(&g[span.clone()], &dy[span], d)
        });
        out
    }
}

impl CustomOp2 for SiluMulGradUp {
    fn name(&self) -> &'static str {
        "mmkd-silu-mul-grad-up"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match gs {
            CpuStorage::F32(_) => storage(Self::run::<f32>(
                data(gs, gl, name)?,
                data(ds, dl, name)?,
                width(gl),
            )),
            CpuStorage::F64(_) => storage(Self::run::<f64>(
                data(gs, gl, name)?,
                data(ds, dl, name)?,
                width(gl),
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, gl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::DType;

    #[test]
    fn matches_the_primitive_formulation() {
        let g = random(&[4, 100, 96], 1, DType::F64);
        let u = random(&[4, 100, 96], 2, DType::F64);
        check_against_slow(
            &[g, u],
            |a| silu_mul(&a[0], &a[1]),
            |a| silu_mul_slow(&a[0], &a[1]),
            1e-12,
        );
        let g = random(&[3, 10], 3, DType::F32);
        let u = random(&[3, 10], 4, DType::F32);
        check_against_slow(
            &[g, u],
            |a| silu_mul(&a[0], &a[1]),
            |a| silu_mul_slow(&a[0], &a[1]),
            1e-5,
        );
    }
}
