//! Rotary position embedding in the non-interleaved (`rotate_half`) layout:
//! y = x ⊙ cos + rotate_half(x) ⊙ sin with rotate_half([x₁, x₂]) = [−x₂, x₁].
//!
//! Per pair (i, i + d/2): y₁ = x₁c₁ − x₂s₁, y₂ = x₂c₂ + x₁s₂. The backward pass is the
//! transposed map: ∂x₁ = ∂y₁c₁ + ∂y₂s₂, ∂x₂ = ∂y₂c₂ − ∂y₁s₁. The tables get no gradient.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::{data, for_each_row, has_kernel, multiversion, storage, Real};

/// Rotates every head of `x` (`[b, s, heads·d]`, the projection layout) by the tables `cos`,
/// `sin` (`[b or 1, s, d]`, one row per position).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let fits = match (x.dims(), cos.dims()) {
        (&[b, s, w], &[cb, cs, d]) => {
            (cb == b || cb == 1)
                && cs == s
                && d > 0
                && d % 2 == 0
                && w % d == 0
                && sin.dims() == cos.dims()
        }
        _ => false,
    };
    if has_kernel(x) && fits && cos.dtype() == x.dtype() && sin.dtype() == x.dtype() {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { transpose: false },
        )
    } else {
        rope_slow(x, cos, sin)
    }
}

/// The reference formulation from primitive ops.
pub fn rope_slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, s, w) = x.dims3()?;
    let (cb, _, d) = cos.dims3()?;
    let x = x.reshape((b, s, w / d, d))?;
    let (cos, sin) = (cos.reshape((cb, s, 1, d))?, sin.reshape((cb, s, 1, d))?);
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.reshape((b, s, w))
}

multiversion! {
    /// One row of the rotation (or, with `transpose`, of its transpose).
    fn rope_row<T: Real>(x: &[T], c: &[T], s: &[T], y: &mut [T], transpose: bool) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = s.split_at(half);
        let (y1, y2) = y.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            if transpose {
                y1[i] = a * c1[i] + b * s2[i];
                y2[i] = b * c2[i] - a * s1[i];
            } else {
                y1[i] = a * c1[i] - b * s1[i];
                y2[i] = b * c2[i] + a * s2[i];
            }
        }
    }
}

/// `transpose` applies the transposed rotation (the backward map).
struct Rope {
    transpose: bool,
}

impl Rope {
    fn run<T: Real>(
        &self,
        x: &[T],
        cos: &[T],
        sin: &[T],
        dims: &[usize],
        table_dims: &[usize],
    ) -> Vec<T> {
        // Rows of width d are heads; every `heads` consecutive rows share a position.
        let (s, d) = (dims[1], table_dims[2]);
        let heads = dims[2] / d;
        let mut out = vec![T::zero(); x.len()];
        for_each_row(&mut out, d, |r, y| {
            let position = r / heads;
            let row = if table_dims[0] == 1 {
                position % s
            } else {
                position
            };
            let (c, sn) = (&cos[row * d..(row + 1) * d], &sin[row * d..(row + 1) * d]);
            rope_row(&x[r * d..(r + 1) * d], c, sn, y, self.transpose);
        });
        out
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "mmkd-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (dims, table_dims) = (xl.dims(), cl.dims());
        let out = match xs {
            CpuStorage::F32(_) => storage(self.run::<f32>(
                data(xs, xl, name)?,
                data(cs, cl, name)?,
                data(ss, sl, name)?,
                dims,
                table_dims,
            )),
            CpuStorage::F64(_) => storage(self.run::<f64>(
                data(xs, xl, name)?,
                data(cs, cl, name)?,
                data(ss, sl, name)?,
                dims,
                table_dims,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                transpose: !self.transpose,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::DType;

    #[test]
    fn matches_the_primitive_formulation() {
        // Per-sample tables (left-padded generation) and tables shared by the batch; the
        // halves of the tables differ so the check does not rely on HF's duplicated halves.
        let x = random(&[2, 40, 3 * 8], 1, DType::F64);
        let cos = random(&[2, 40, 8], 2, DType::F64);
        let sin = random(&[2, 40, 8], 3, DType::F64);
        check_against_slow(
            &[x],
            |a| rope(&a[0], &cos, &sin),
            |a| rope_slow(&a[0], &cos, &sin),
            1e-12,
        );
        // Enough rows for the parallel path, f32.
        let x = random(&[3, 300, 2 * 64], 4, DType::F32);
        let cos = random(&[1, 300, 64], 5, DType::F32);
        let sin = random(&[1, 300, 64], 6, DType::F32);
        check_against_slow(
            &[x],
            |a| rope(&a[0], &cos, &sin),
            |a| rope_slow(&a[0], &cos, &sin),
            1e-5,
        );
    }
}
