//! GELU, exact (erf) and tanh-approximated, for f32:
//!
//! - exact: y = ½x(1 + erf(x/√2)), y′ = ½(1 + erf(x/√2)) + x·φ(x), φ(x) = e^(−x²/2)/√(2π);
//! - tanh: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³),
//!   y′ = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²).
//!
//! candle computes both with one libm call per element on one thread; here erf and tanh are
//! written from the vectorisable `exp` (erf: Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7;
//! tanh u = 1 − 2/(e^(2u) + 1)). Other dtypes take candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::{data, for_each_row, multiversion, storage};
use crate::fused::simd::exp_f32;

/// Which GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    Erf,
    Tanh,
}

/// GELU of `x`, fused for contiguous-or-not f32 CPU tensors.
pub fn gelu(x: &Tensor, kind: GeluKind) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Gelu { kind })
    } else {
        gelu_slow(x, kind)
    }
}

/// candle's formulation (the reference).
pub fn gelu_slow(x: &Tensor, kind: GeluKind) -> Result<Tensor> {
    match kind {
        GeluKind::Erf => x.gelu_erf(),
        GeluKind::Tanh => x.gelu(),
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;
const TANH_CUBIC: f32 = 0.044_715;

#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let e = 1.0 - poly * exp_f32(-a * a);
    if x < 0.0 {
        -e
    } else {
        e
    }
}

#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

#[inline(always)]
fn value(x: f32, kind: GeluKind) -> f32 {
    match kind {
        GeluKind::Erf => 0.5 * x * (1.0 + erf(x * INV_SQRT_2)),
        GeluKind::Tanh => 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x))),
    }
}

#[inline(always)]
fn derivative(x: f32, kind: GeluKind) -> f32 {
    match kind {
        GeluKind::Erf => {
            0.5 * (1.0 + erf(x * INV_SQRT_2)) + x * INV_SQRT_2PI * exp_f32(-0.5 * x * x)
        }
        GeluKind::Tanh => {
            let t = tanh(SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x));
            0.5 * (1.0 + t)
                + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * x * x)
        }
    }
}

multiversion! {
    fn gelu_row(x: &[f32], y: &mut [f32], kind: GeluKind) {
        match kind {
            GeluKind::Erf => y.iter_mut().zip(x).for_each(|(y, &v)| *y = value(v, GeluKind::Erf)),
            GeluKind::Tanh => y.iter_mut().zip(x).for_each(|(y, &v)| *y = value(v, GeluKind::Tanh)),
        }
    }
}

multiversion! {
    fn gelu_grad_row(x: &[f32], dy: &[f32], dx: &mut [f32], kind: GeluKind) {
        match kind {
            GeluKind::Erf => {
                for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                    *d = g * derivative(v, GeluKind::Erf);
                }
            }
            GeluKind::Tanh => {
                for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                    *d = g * derivative(v, GeluKind::Tanh);
                }
            }
        }
    }
}

fn width(l: &Layout) -> usize {
    (*l.dims().last().unwrap_or(&1)).max(1)
}

struct Gelu {
    kind: GeluKind,
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "mmkd-gelu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x: &[f32] = data(xs, xl, self.name())?;
        let w = width(xl);
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, w, |r, y| {
            gelu_row(&x[r * w..(r + 1) * w], y, self.kind)
        });
        Ok((storage(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &GeluGrad { kind: self.kind },
        )?))
    }
}

/// ∂x = ∂y · gelu′(x) from (x, ∂y).
struct GeluGrad {
    kind: GeluKind,
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "mmkd-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, dy): (&[f32], &[f32]) = (data(xs, xl, name)?, data(gs, gl, name)?);
        let w = width(xl);
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, w, |r, d| {
            let span = r * w..(r + 1) * w;
            gelu_grad_row(&x[span.clone()], &dy[span], d, self.kind)
        });
        Ok((storage(out), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{max_abs_diff, random};
    use candle_core::Var;

    #[test]
    fn matches_candle_in_f64_values_and_gradients() {
        // Spread over [−12, 12] so both tails and the middle are covered.
        let x = random(&[40, 300], 1, DType::F32).affine(4.0, 0.0).unwrap();
        let probe = random(&[40, 300], 2, DType::F32);
        for kind in [GeluKind::Erf, GeluKind::Tanh] {
            let v = Var::from_tensor(&x).unwrap();
            let y = gelu(v.as_tensor(), kind).unwrap();
            let g = y
                .mul(&probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = g.get(v.as_tensor()).unwrap().clone();

            let v64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
            let y64 = gelu_slow(v64.as_tensor(), kind).unwrap();
            let probe64 = probe.to_dtype(DType::F64).unwrap();
            let g64 = y64
                .mul(&probe64)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx64 = g64.get(v64.as_tensor()).unwrap();

            let dy = max_abs_diff(&y, &y64);
            assert!(dy < 2e-6, "{kind:?}: values differ by {dy}");
            let dg = max_abs_diff(&dx, dx64);
            assert!(dg < 2e-5, "{kind:?}: gradients differ by {dg}");
        }
    }
}
