//! Multi-head (grouped-query) attention as one op on the projections' own layout:
//! q `[b, s, heads·d]`, k and v `[b, t, kv_heads·d]` in, `[b, s, heads·d]` out, for each head
//! h reading key/value head h / (heads / kv_heads):
//!
//! P = softmax(scale · Q Kᵀ + M),  O = P V.
//!
//! Each (sample, key/value head) pair is one task: its heads' products run through gemm on
//! strided sub-matrices, the probabilities live in a per-task buffer, and nothing is split,
//! transposed, repeated or kept for the backward pass, which recomputes P (one extra Q Kᵀ):
//!
//! dV += Pᵀ dO,  dP = dO Vᵀ,  dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = dS K,  dK += dSᵀ Q.
//!
//! The mask gets no gradient.

use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use gemm::Parallelism;
use rayon::prelude::*;

use super::gemm::{gemm_into, Operand};
use super::simd::{max_of, sum_map, sum_map2};
use super::softmax::scaled_masked_softmax_slow;
use super::{data, has_kernel, multiversion, storage, Real};

/// softmax(scale · q kᵀ + mask) v per head, in and out in the projection layout (see the
/// module docs). `mask` is additive, `[b or 1, 1, s, t]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dims = Dims::of(q, k, v, heads, kv_heads, mask)?;
    let same_dtype = k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if !(has_kernel(q) && same_dtype) {
        return attention_slow(q, k, v, heads, kv_heads, mask, scale);
    }
    let mask = mask
        .map(|m| m.to_dtype(q.dtype())?.contiguous())
        .transpose()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention { dims, scale, mask },
    )
}

/// The reference formulation: heads split out and repeated, explicit products and softmax.
pub fn attention_slow(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let Dims { b, s, t, d, .. } = Dims::of(q, k, v, heads, kv_heads, mask)?;
    let split = |x: &Tensor, n: usize, len: usize| -> Result<Tensor> {
        x.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()
    };
    let rep = heads / kv_heads;
    let qh = split(q, heads, s)?;
    let kh = crate::attention::repeat_kv(&split(k, kv_heads, t)?, rep)?;
    let vh = crate::attention::repeat_kv(&split(v, kv_heads, t)?, rep)?;
    let scores = qh.matmul(&kh.transpose(2, 3)?.contiguous()?)?;
    let probs = scaled_masked_softmax_slow(&scores, mask, scale)?;
    probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, heads * d))
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    s: usize,
    t: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    /// The mask's batch size (1 = shared), 0 without a mask.
    mask_batch: usize,
}

impl Dims {
    fn of(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
        mask: Option<&Tensor>,
    ) -> Result<Self> {
        let (b, s, qw) = q.dims3()?;
        let (kb, t, kw) = k.dims3()?;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || qw % heads != 0 {
            candle_core::bail!(
                "attention: {heads} query heads of width {qw}/{heads} cannot share {kv_heads} key/value heads"
            );
        }
        let d = qw / heads;
        if kb != b || kw != kv_heads * d || v.dims() != k.dims() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {heads} query and {kv_heads} key/value heads of width {d}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let mask_batch = match mask.map(|m| m.dims()) {
            None => 0,
            Some(&[mb, 1, ms, mt]) if (mb == b || mb == 1) && (ms, mt) == (s, t) => mb,
            Some(other) => candle_core::bail!(
                "attention: mask {other:?} does not broadcast to [{b}, 1, {s}, {t}]"
            ),
        };
        Ok(Self {
            b,
            s,
            t,
            d,
            heads,
            kv_heads,
            mask_batch,
        })
    }

    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Offset of query-layout head `h` of sample `bi` (rows at stride heads·d).
    fn q_offset(&self, bi: usize, h: usize) -> usize {
        bi * self.s * self.heads * self.d + h * self.d
    }

    /// Offset of key/value head `g` of sample `bi` (rows at stride kv_heads·d).
    fn kv_offset(&self, bi: usize, g: usize) -> usize {
        bi * self.t * self.kv_heads * self.d + g * self.d
    }

    /// The mask row of query `i` of sample `bi`.
    fn mask_row<'a, T>(&self, mask: Option<&'a [T]>, bi: usize, i: usize) -> Option<&'a [T]> {
        mask.map(|m| {
            let batch = if self.mask_batch == 1 { 0 } else { bi };
            let row = batch * self.s + i;
            &m[row * self.t..(row + 1) * self.t]
        })
    }
}

multiversion! {
    /// row ← softmax(scale · row + mask) in place.
    fn softmax_in_place<T: Real>(row: &mut [T], mask: Option<&[T]>, scale: T) {
        match mask {
            Some(m) => row.iter_mut().zip(m).for_each(|(x, &mv)| *x = *x * scale + mv),
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        let max = max_of(row);
        row.iter_mut().for_each(|x| *x = (*x - max).exp_fast());
        let inv = sum_map(row, |x| x).recip();
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

multiversion! {
    /// dp ← scale · p ⊙ (dp − Σ dp ⊙ p) in place.
    fn softmax_grad_in_place<T: Real>(p: &[T], dp: &mut [T], scale: T) {
        let dot = sum_map2(p, dp, |a, b| a * b);
        dp.iter_mut().zip(p).for_each(|(g, &pv)| *g = scale * pv * (*g - dot));
    }
}

/// A pointer that parallel tasks write through, each to its own disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every use writes elements no other task touches (see the callers).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// P (`s × t`) of head `h` of sample `bi` into `p`.
fn probabilities<T: Real>(
    dims: &Dims,
    (q, k): (&[T], &[T]),
    mask: Option<&[T]>,
    scale: T,
    (bi, h): (usize, usize),
    p: &mut [T],
) {
    let Dims {
        s,
        t,
        d,
        heads,
        kv_heads,
        ..
    } = *dims;
    let g = h / dims.rep();
    let qh = Operand {
        data: &q[dims.q_offset(bi, h)..],
        rs: heads * d,
        cs: 1,
    };
    // Kᵀ (d × t) read from K's rows.
    let kt = Operand {
        data: &k[dims.kv_offset(bi, g)..],
        rs: 1,
        cs: kv_heads * d,
    };
    // SAFETY: p holds s·t elements at row stride t and belongs to this task.
    unsafe {
        gemm_into(
            (s, t, d),
            p.as_mut_ptr(),
            (t, 1),
            false,
            qh,
            kt,
            Parallelism::None,
        )
    };
    for (i, row) in p.chunks_mut(t).enumerate() {
        softmax_in_place(row, dims.mask_row(mask, bi, i), scale);
    }
}

fn forward<T: Real>(
    dims: &Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[T]>,
    scale: f64,
) -> Vec<T> {
    let Dims {
        b,
        s,
        t,
        d,
        heads,
        kv_heads,
        ..
    } = *dims;
    let len = b * s * heads * d;
    let mut out: Vec<T> = Vec::with_capacity(len);
    let dst = SharedMut(out.as_mut_ptr());
    let scale = T::from_f64(scale);
    (0..b * kv_heads).into_par_iter().for_each(|task| {
        let (bi, g) = (task / kv_heads, task % kv_heads);
        let mut p = vec![T::zero(); s * t];
        let vg = Operand {
            data: &v[dims.kv_offset(bi, g)..],
            rs: kv_heads * d,
            cs: 1,
        };
        for h in g * dims.rep()..(g + 1) * dims.rep() {
            probabilities(dims, (q, k), mask, scale, (bi, h), &mut p);
            let ph = Operand {
                data: &p,
                rs: t,
                cs: 1,
            };
            // Capture the Send wrapper, not its raw-pointer field (edition-2021 closures
            // capture disjoint fields).
            #[allow(clippy::redundant_locals)]
            let dst = dst;
            // SAFETY: head h of sample bi owns the s × d block at q_offset(bi, h) (row stride
            // heads·d) of the b·s·heads·d output; no other task writes it.
            unsafe {
                gemm_into(
                    (s, d, t),
                    dst.0.add(dims.q_offset(bi, h)),
                    (heads * d, 1),
                    false,
                    ph,
                    vg,
                    Parallelism::None,
                );
            }
        }
    });
    // SAFETY: the (sample, head) blocks cover all b·s·heads·d elements, each written once by
    // gemm above (k = 0 writes zeros).
    unsafe { out.set_len(len) };
    out
}

/// (dQ, dK, dV) in the layouts of q, k, v.
#[allow(clippy::type_complexity)]
fn backward<T: Real>(
    dims: &Dims,
    (q, k, v): (&[T], &[T], &[T]),
    dout: &[T],
    mask: Option<&[T]>,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        b,
        s,
        t,
        d,
        heads,
        kv_heads,
        ..
    } = *dims;
    let mut dq = vec![T::zero(); q.len()];
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    let scale = T::from_f64(scale);
    (0..b * kv_heads).into_par_iter().for_each(|task| {
        let (bi, g) = (task / kv_heads, task % kv_heads);
        let (dq_ptr, dk_ptr, dv_ptr) = (dq_ptr, dk_ptr, dv_ptr);
        let mut p = vec![T::zero(); s * t];
        let mut dp = vec![T::zero(); s * t];
        let kv = dims.kv_offset(bi, g);
        let kg = Operand {
            data: &k[kv..],
            rs: kv_heads * d,
            cs: 1,
        };
        let vgt = Operand {
            data: &v[kv..],
            rs: 1,
            cs: kv_heads * d,
        };
        for h in g * dims.rep()..(g + 1) * dims.rep() {
            let qo = dims.q_offset(bi, h);
            let qh = Operand {
                data: &q[qo..],
                rs: heads * d,
                cs: 1,
            };
            let doh = Operand {
                data: &dout[qo..],
                rs: heads * d,
                cs: 1,
            };
            probabilities(dims, (q, k), mask, scale, (bi, h), &mut p);
            let pt = Operand {
                data: &p,
                rs: 1,
                cs: t,
            };
            // SAFETY (all four products): dp is this task's own buffer; the dV and dK blocks
            // of (bi, g) and the dQ block of (bi, h) belong to this task alone.
            unsafe {
                // dV_g += Pᵀ dO_h
                gemm_into(
                    (t, d, s),
                    dv_ptr.0.add(kv),
                    (kv_heads * d, 1),
                    true,
                    pt,
                    doh,
                    Parallelism::None,
                );
                // dP = dO_h V_gᵀ
                gemm_into(
                    (s, t, d),
                    dp.as_mut_ptr(),
                    (t, 1),
                    false,
                    doh,
                    vgt,
                    Parallelism::None,
                );
            }
            for (p_row, dp_row) in p.chunks(t).zip(dp.chunks_mut(t)) {
                softmax_grad_in_place(p_row, dp_row, scale);
            }
            let ds = Operand {
                data: &dp,
                rs: t,
                cs: 1,
            };
            let dst = Operand {
                data: &dp,
                rs: 1,
                cs: t,
            };
            unsafe {
                // dQ_h = dS K_g
                gemm_into(
                    (s, d, t),
                    dq_ptr.0.add(qo),
                    (heads * d, 1),
                    false,
                    ds,
                    kg,
                    Parallelism::None,
                );
                // dK_g += dSᵀ Q_h
                gemm_into(
                    (t, d, s),
                    dk_ptr.0.add(kv),
                    (kv_heads * d, 1),
                    true,
                    dst,
                    qh,
                    Parallelism::None,
                );
            }
        }
    });
    (dq, dk, dv)
}

struct Attention {
    dims: Dims,
    scale: f64,
    mask: Option<Tensor>,
}

/// Runs `f` on the CPU data of `t` (contiguous, dtype `T`).
fn with_data<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(data(cpu, layout, "mmkd-attention")?),
        _ => candle_core::bail!("mmkd-attention: CPU tensors only"),
    }
}

fn with_mask<T: WithDType, R>(
    mask: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> Result<R>,
) -> Result<R> {
    match mask {
        Some(m) => with_data(m, |m| f(Some(m))),
        None => f(None),
    }
}

impl Attention {
    fn fwd<T: Real>(&self, q: &[T], k: &[T], v: &[T]) -> Result<Vec<T>> {
        with_mask(self.mask.as_ref(), |m| {
            Ok(forward(&self.dims, q, k, v, m, self.scale))
        })
    }

    fn grads<T: Real>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dout = dout.contiguous()?;
        let (dq, dk, dv) = with_data::<T, _>(q, |q| {
            with_data::<T, _>(k, |k| {
                with_data::<T, _>(v, |v| {
                    with_data::<T, _>(&dout, |g| {
                        with_mask(self.mask.as_ref(), |m| {
                            Ok(backward(&self.dims, (q, k, v), g, m, self.scale))
                        })
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "mmkd-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match qs {
            CpuStorage::F32(_) => storage(self.fwd::<f32>(
                data(qs, ql, name)?,
                data(ks, kl, name)?,
                data(vs, vl, name)?,
            )?),
            CpuStorage::F64(_) => storage(self.fwd::<f64>(
                data(qs, ql, name)?,
                data(ks, kl, name)?,
                data(vs, vl, name)?,
            )?),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.grads::<f32>(q, k, v, dout)?,
            DType::F64 => self.grads::<f64>(q, k, v, dout)?,
            other => candle_core::bail!("mmkd-attention: f32/f64 only, got {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::MASK_VALUE;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::Device;

    /// Causal over the last `s` of `t` keys, and sample 1 cannot see key 0 (padding).
    fn mask(b: usize, s: usize, t: usize) -> Tensor {
        let past = t - s;
        let mut m = vec![0f64; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    if j > past + i || (bi == 1 && j == 0) {
                        m[(bi * s + i) * t + j] = MASK_VALUE as f64;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, s, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn grouped_masked_attention_matches_the_reference() {
        // 6 query heads on 2 key/value heads of width 4; queries for the last 5 of 7 keys.
        let (b, s, t, d) = (2, 5, 7, 4);
        let q = random(&[b, s, 6 * d], 1, DType::F64);
        let k = random(&[b, t, 2 * d], 2, DType::F64);
        let v = random(&[b, t, 2 * d], 3, DType::F64);
        let m = mask(b, s, t);
        check_against_slow(
            &[q.clone(), k.clone(), v.clone()],
            |a| attention(&a[0], &a[1], &a[2], 6, 2, Some(&m), 0.5),
            |a| attention_slow(&a[0], &a[1], &a[2], 6, 2, Some(&m), 0.5),
            1e-12,
        );
        // A mask shared by the batch, in f32.
        let m1 = mask(1, s, t).to_dtype(DType::F32).unwrap();
        let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        check_against_slow(
            &[f32s(&q), f32s(&k), f32s(&v)],
            |a| attention(&a[0], &a[1], &a[2], 6, 2, Some(&m1), 0.5),
            |a| attention_slow(&a[0], &a[1], &a[2], 6, 2, Some(&m1), 0.5),
            1e-5,
        );
    }

    #[test]
    fn unmasked_multi_head_attention_matches_the_reference() {
        // The vision towers' case: as many key/value heads as query heads, no mask.
        let q = random(&[3, 9, 3 * 8], 4, DType::F64);
        let k = random(&[3, 9, 3 * 8], 5, DType::F64);
        let v = random(&[3, 9, 3 * 8], 6, DType::F64);
        check_against_slow(
            &[q, k, v],
            |a| attention(&a[0], &a[1], &a[2], 3, 3, None, 0.3),
            |a| attention_slow(&a[0], &a[1], &a[2], 3, 3, None, 0.3),
            1e-12,
        );
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let q = random(&[1, 2, 12], 1, DType::F32);
        let k = random(&[1, 2, 8], 2, DType::F32);
        let err = attention(&q, &k, &k, 3, 2, None, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 query heads"), "{err}");
        let bad_mask = Tensor::zeros((1, 1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = attention(&k, &k, &k, 2, 2, Some(&bad_mask), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not broadcast"), "{err}");
    }
}
