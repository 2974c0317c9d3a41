//! The affine map y = x Wᵀ + b as one op: one gemm into an output pre-filled with the bias.
//!
//! Written with primitive ops, a Linear is four graph nodes (reshape, transpose of W, matmul,
//! broadcast add) and candle's backward makes a zero tensor plus an addition for each of them.
//! As one node its backward is three products on constants:
//! ∂x = ∂y W, ∂W = ∂yᵀ x, ∂b = Σ_rows ∂y.

use super::gemm::{matmul, Operand};
use super::{data, has_kernel, multiversion, storage, Real};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// `x Wᵀ + b` for x `[.., in]`, W `[out, in]`, b `[out]`; `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let fits = has_kernel(x)
        && x.rank() >= 1
        && x.dim(D::Minus1)? == in_dim
        && w.dtype() == x.dtype()
        && b.is_none_or(|b| b.dtype() == x.dtype() && b.dims() == [out_dim]);
    if !fits {
        return linear_slow(x, w, b);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Affine),
        None => x.apply_op2(&w, Affine),
    }
}

/// The reference formulation from primitive ops.
pub fn linear_slow(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim.max(1);
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank ≥ 1") = w.dim(0)?;
    y.reshape(out_dims)
}

struct Affine;

impl Affine {
    pub(crate) fn fwd<T: Real>(
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<T> {
        let rows = x.len() / in_dim.max(1);
        // y (rows × out) = x (rows × in) · Wᵀ (in × out, read from W [out, in]) + b.
        matmul(
            (rows, out_dim, in_dim),
            Operand {
                data: x,
                rs: in_dim,
                cs: 1,
            },
            Operand {
                data: w,
                rs: 1,
                cs: in_dim,
            },
            b,
        )
    }

    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "mmkd-linear";
        let (out_dim, in_dim) = (wl.dims()[0], wl.dims()[1]);
        let out = match xs {
            CpuStorage::F32(_) => {
                let b = bias.map(|(s, l)| data::<f32>(s, l, name)).transpose()?;
                storage(Self::fwd::<f32>(
                    data(xs, xl, name)?,
                    data(ws, wl, name)?,
                    b,
                    in_dim,
                    out_dim,
                ))
            }
            CpuStorage::F64(_) => {
                let b = bias.map(|(s, l)| data::<f64>(s, l, name)).transpose()?;
                storage(Self::fwd::<f64>(
                    data(xs, xl, name)?,
                    data(ws, wl, name)?,
                    b,
                    in_dim,
                    out_dim,
                ))
            }
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, with_last_dim(xl, out_dim)))
    }

    /// (∂x, ∂W, ∂b) from x, W and ∂y, all treated as constants. Only what the graph needs
    /// is computed: a frozen weight (a constant, as in a frozen module or under a LoRA adapter)
    /// gets no ∂W, an input no gradient reaches (detached features) no ∂x.
    fn grads(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = w.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let dy2 = dy.detach().contiguous()?.reshape((rows, out_dim))?;
        let dx = if x.track_op() {
            Some(
                dy2.apply_op2_no_bwd(&w.detach().contiguous()?, &InputGrad)?
                    .reshape(x.shape())?,
            )
        } else {
            None
        };
        let dw = if w.track_op() {
            let x2 = x.detach().contiguous()?.reshape((rows, in_dim))?;
            Some(x2.apply_op2_no_bwd(&dy2, &WeightGrad)?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => Some(dy2.apply_op1_no_bwd(&ColumnSum)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

/// ∂W = ∂yᵀ x (`[out, in]`) from x `[rows, in]` and ∂y `[rows, out]`, written row-major by
/// the gemm itself.
struct WeightGrad;

impl WeightGrad {
    fn run<T: Real>(x: &[T], dy: &[T], rows: usize, in_dim: usize, out_dim: usize) -> Vec<T> {
        // ∂W (out × in) = ∂yᵀ (out × rows, read down ∂y's columns) · x (rows × in), written
        // row-major straight away (no transpose pass afterwards).
        matmul(
            (out_dim, in_dim, rows),
            Operand {
                data: dy,
                rs: 1,
                cs: out_dim,
            },
            Operand {
                data: x,
                rs: in_dim,
                cs: 1,
            },
            None,
        )
    }
}

/// ∂x = ∂y W (`[rows, in]`) from ∂y `[rows, out]` and W `[out, in]`.
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "mmkd-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(dy: &[T], w: &[T], rows: usize, out_dim: usize, in_dim: usize) -> Vec<T> {
            matmul(
                (rows, in_dim, out_dim),
                Operand {
                    data: dy,
                    rs: out_dim,
                    cs: 1,
                },
                Operand {
                    data: w,
                    rs: in_dim,
                    cs: 1,
                },
                None,
            )
        }
        let name = self.name();
        let (rows, out_dim) = (gl.dims()[0], gl.dims()[1]);
        let in_dim = wl.dims()[1];
        let out = match gs {
            CpuStorage::F32(_) => storage(run::<f32>(
                data(gs, gl, name)?,
                data(ws, wl, name)?,
                rows,
                out_dim,
                in_dim,
            )),
            CpuStorage::F64(_) => storage(run::<f64>(
                data(gs, gl, name)?,
                data(ws, wl, name)?,
                rows,
                out_dim,
                in_dim,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from((rows, in_dim))))
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "mmkd-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, in_dim) = (xl.dims()[0], xl.dims()[1]);
        let out_dim = gl.dims()[1];
        let out = match xs {
            CpuStorage::F32(_) => storage(Self::run::<f32>(
                data(xs, xl, name)?,
                data(gs, gl, name)?,
                rows,
                in_dim,
                out_dim,
            )),
            CpuStorage::F64(_) => storage(Self::run::<f64>(
                data(xs, xl, name)?,
                data(gs, gl, name)?,
                rows,
                in_dim,
                out_dim,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from((out_dim, in_dim))))
    }
}

multiversion! {
    fn add_row<T: Real>(acc: &mut [T], row: &[T]) {
        for (x, &v) in acc.iter_mut().zip(row) {
            *x += v;
        }
    }
}

/// Σ over the rows of a `[rows, cols]` matrix (candle's `sum(0)` walks it column by column,
/// ~40× slower).
struct ColumnSum;

impl candle_core::CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "mmkd-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(a: &[T], cols: usize) -> Vec<T> {
            super::sum_over_rows(a.len() / cols.max(1), cols, |r, acc| {
                add_row(acc, &a[r * cols..(r + 1) * cols])
            })
        }
        let name = self.name();
        let cols = l.dims()[1];
        let out = match s {
            CpuStorage::F32(_) => storage(run::<f32>(data(s, l, name)?, cols)),
            CpuStorage::F64(_) => storage(run::<f64>(data(s, l, name)?, cols)),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from(cols)))
    }
}

impl CustomOp2 for Affine {
    fn name(&self) -> &'static str {
        "mmkd-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, None, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "mmkd-linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::grads(x, w, Some(b), dy)
    }
}

/// A LoRA-adapted layer as one op: `x Wᵀ + b + s·(x Aᵀ) Bᵀ` for A `[r, in]`, B `[out, r]`.
///
/// Written as separate ops (a linear, the branch, a sum), candle's graph keeps both summands —
/// two `[tokens, out]` tensors per adapted layer — until the backward pass. As one node it keeps
/// only its inputs (x, W and the small adapters), and its backward skips ∂W of a frozen base:
/// ∂x = ∂y W + s·(∂y B) A, ∂A = s·(∂y B)ᵀ x, ∂B = s·∂yᵀ (x Aᵀ), ∂b = Σ_rows ∂y.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let rank = a.dim(0)?;
    let same = |t: &Tensor| t.dtype() == x.dtype();
    let fits = has_kernel(x)
        && x.rank() >= 1
        && x.dim(D::Minus1)? == in_dim
        && same(w)
        && same(a)
        && same(bm)
        && a.dims() == [rank, in_dim]
        && bm.dims() == [out_dim, rank]
        && b.is_none_or(|b| same(b) && b.dims() == [out_dim]);
    if !fits {
        return lora_linear_slow(x, w, b, a, bm, scale);
    }
    // The adapters (and bias) travel as one flat operand: a custom op takes three inputs.
    let mut parts = vec![a.flatten_all()?, bm.flatten_all()?];
    if let Some(b) = b {
        parts.push(b.clone());
    }
    let pack = Tensor::cat(&parts, 0)?;
    let op = LoraAffine {
        rank,
        scale,
        bias: b.is_some(),
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &pack, op)
}

/// The reference formulation from primitive ops.
pub fn lora_linear_slow(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let down = linear_slow(x, a, None)?.affine(scale, 0.0)?;
    linear_slow(x, w, b)? + linear_slow(&down, bm, None)?
}

struct LoraAffine {
    rank: usize,
    scale: f64,
    bias: bool,
}

impl LoraAffine {
    fn fwd<T: Real>(&self, x: &[T], w: &[T], pack: &[T], in_dim: usize, out_dim: usize) -> Vec<T> {
        let r = self.rank;
        let rows = x.len() / in_dim.max(1);
        let (a, rest) = pack.split_at(r * in_dim);
        let (bm, rest) = rest.split_at(out_dim * r);
        let bias = self.bias.then_some(rest);
        let mut y = Affine::fwd(x, w, bias, in_dim, out_dim);
        // down (rows × r) = x · Aᵀ, scaled; up (rows × out) = down · Bᵀ.
        let mut down = matmul(
            (rows, r, in_dim),
            Operand {
                data: x,
                rs: in_dim,
                cs: 1,
            },
            Operand {
                data: a,
                rs: 1,
                cs: in_dim,
            },
            None,
        );
        let s = T::from(self.scale).expect("a finite scale");
        for v in &mut down {
            *v *= s;
        }
        let up = matmul(
            (rows, out_dim, r),
            Operand {
                data: &down,
                rs: r,
                cs: 1,
            },
            Operand {
                data: bm,
                rs: 1,
                cs: r,
            },
            None,
        );
        for (yv, u) in y.iter_mut().zip(up) {
            *yv += u;
        }
        y
    }
}

impl CustomOp3 for LoraAffine {
    fn name(&self) -> &'static str {
        "mmkd-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (out_dim, in_dim) = (wl.dims()[0], wl.dims()[1]);
        let out = match xs {
            CpuStorage::F32(_) => storage(self.fwd::<f32>(
                data(xs, xl, name)?,
                data(ws, wl, name)?,
                data(ps, pl, name)?,
                in_dim,
                out_dim,
            )),
            CpuStorage::F64(_) => storage(self.fwd::<f64>(
                data(xs, xl, name)?,
                data(ws, wl, name)?,
                data(ps, pl, name)?,
                in_dim,
                out_dim,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, with_last_dim(xl, out_dim)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        pack: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_dim, in_dim) = w.dims2()?;
        let r = self.rank;
        let rows = x.elem_count() / in_dim.max(1);
        let dy2 = dy.detach().contiguous()?.reshape((rows, out_dim))?;
        let x2 = x.detach().contiguous()?.reshape((rows, in_dim))?;
        let pack = pack.detach();
        let a = pack.narrow(0, 0, r * in_dim)?.reshape((r, in_dim))?;
        let bm = pack
            .narrow(0, r * in_dim, out_dim * r)?
            .reshape((out_dim, r))?;
        // ∂y B (rows × r), shared by ∂x and ∂A.
        let dy_b = dy2.matmul(&bm)?;
        let dx = if x.track_op() {
            let base = dy2.apply_op2_no_bwd(&w.detach().contiguous()?, &InputGrad)?;
            let branch = dy_b.matmul(&a)?.affine(self.scale, 0.0)?;
            Some((base + branch)?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x2.apply_op2_no_bwd(&dy2, &WeightGrad)?)
        } else {
            None
        };
        let down = x2.matmul(&a.t()?)?;
        let da = dy_b.t()?.matmul(&x2)?.affine(self.scale, 0.0)?;
        let db = dy2.t()?.matmul(&down)?.affine(self.scale, 0.0)?;
        let mut parts = vec![da.flatten_all()?, db.flatten_all()?];
        if self.bias {
            parts.push(dy2.apply_op1_no_bwd(&ColumnSum)?);
        }
        Ok((dx, dw, Some(Tensor::cat(&parts, 0)?)))
    }
}

/// The input's shape with its last dimension (the features) replaced by `out_dim`.
fn with_last_dim(xl: &Layout, out_dim: usize) -> Shape {
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = out_dim;
    Shape::from(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::DType;

    #[test]
    fn the_lora_layer_matches_the_primitive_formulation() {
        // Values and the gradients of x, W, b, A and B.
        let x = random(&[3, 7, 20], 11, DType::F64);
        let w = random(&[13, 20], 12, DType::F64);
        let b = random(&[13], 13, DType::F64);
        let a = random(&[4, 20], 14, DType::F64);
        let bm = random(&[13, 4], 15, DType::F64);
        check_against_slow(
            &[x.clone(), w.clone(), b, a.clone(), bm.clone()],
            |t| lora_linear(&t[0], &t[1], Some(&t[2]), &t[3], &t[4], 2.5),
            |t| lora_linear_slow(&t[0], &t[1], Some(&t[2]), &t[3], &t[4], 2.5),
            1e-12,
        );
        check_against_slow(
            &[x, w, a, bm],
            |t| lora_linear(&t[0], &t[1], None, &t[2], &t[3], 0.5),
            |t| lora_linear_slow(&t[0], &t[1], None, &t[2], &t[3], 0.5),
            1e-12,
        );
        // f32, sizes past one gemm block.
        let x = random(&[300, 70], 16, DType::F32);
        let w = random(&[90, 70], 17, DType::F32);
        let a = random(&[8, 70], 18, DType::F32);
        let bm = random(&[90, 8], 19, DType::F32);
        check_against_slow(
            &[x, w, a, bm],
            |t| lora_linear(&t[0], &t[1], None, &t[2], &t[3], 2.0),
            |t| lora_linear_slow(&t[0], &t[1], None, &t[2], &t[3], 2.0),
            2e-3,
        );
    }

    #[test]
    fn matches_the_primitive_formulation() {
        let x = random(&[3, 7, 20], 1, DType::F64);
        let w = random(&[13, 20], 2, DType::F64);
        let b = random(&[13], 3, DType::F64);
        check_against_slow(
            &[x.clone(), w.clone(), b],
            |a| linear(&a[0], &a[1], Some(&a[2])),
            |a| linear_slow(&a[0], &a[1], Some(&a[2])),
            1e-12,
        );
        check_against_slow(
            &[x, w],
            |a| linear(&a[0], &a[1], None),
            |a| linear_slow(&a[0], &a[1], None),
            1e-12,
        );
        // f32, a 2-D input, sizes past one gemm block.
        let x = random(&[300, 70], 4, DType::F32);
        let w = random(&[90, 70], 5, DType::F32);
        let b = random(&[90], 6, DType::F32);
        check_against_slow(
            &[x, w, b],
            |a| linear(&a[0], &a[1], Some(&a[2])),
            |a| linear_slow(&a[0], &a[1], Some(&a[2])),
            2e-3,
        );
    }
}
