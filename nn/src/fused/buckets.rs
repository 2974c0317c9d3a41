//! A student's log-probabilities on the k + 1 buckets of a teacher's top-k: log softmax(s·z)
//! at the k cached token ids, then the log of the mass of every other id (the rest).
//!
//! Written with primitive ops this is a log-softmax, a gather, a mask, a second log-sum-exp and
//! a concatenation: about ten `[rows, vocab]` temporaries forward and as many backward. Here the
//! forward is one pass per row that writes only the `[rows, k + 1]` result, and the backward one
//! pass that writes the logits' gradient: with q = softmax(x), x = s·z, R the rest's mass,
//! upstream g and G = Σⱼ gⱼ,
//!   ∂/∂zᵢ = s·(gⱼ − G·qᵢ)            for i the j-th top-k id,
//!   ∂/∂zᵢ = s·(g_rest·qᵢ/R − G·qᵢ)  for every other i.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::simd::{max_of, sum_map};
use super::xent::log_softmax_slow;
use super::{data, for_each_row, for_each_row_costing, has_kernel, multiversion, storage, Real};

/// `[n, k + 1]`: log softmax(scale·logits) at `ids` `[n, k]` (u32, distinct within a row, k
/// below the vocabulary) and, last, the log of the remaining mass, for `[n, vocab]` logits.
/// The ids get no gradient.
pub fn topk_bucket_log_probs(logits: &Tensor, ids: &Tensor, scale: f64) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let (ni, k) = ids.dims2()?;
    if ni != n || ids.dtype() != DType::U32 {
        candle_core::bail!(
            "top-k buckets: ids {:?} ({:?}) must be u32 with one row per logits row ({n})",
            ids.dims(),
            ids.dtype()
        );
    }
    if k >= v {
        candle_core::bail!("top-k buckets: k = {k} leaves no rest in a vocabulary of {v}");
    }
    if has_kernel(logits) {
        logits
            .contiguous()?
            .apply_op2(&ids.contiguous()?, TopKBuckets { scale })
    } else {
        topk_bucket_log_probs_slow(logits, ids, scale)
    }
}

/// The reference formulation from primitive ops.
pub fn topk_bucket_log_probs_slow(logits: &Tensor, ids: &Tensor, scale: f64) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let log_q = log_softmax_slow(&logits.affine(scale, 0.0)?)?;
    let top = log_q.gather(&ids.contiguous()?, 1)?;
    let mut mask = vec![0f32; n * v];
    for (r, row) in ids.to_vec2::<u32>()?.iter().enumerate() {
        for &id in row {
            mask[r * v + id as usize] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (n, v), logits.device())?.to_dtype(log_q.dtype())?;
    let masked = log_q.add(&mask)?;
    // Detached shift: it does not change the value; −∞ entries contribute exp = 0.
    let max = masked.max_keepdim(D::Minus1)?.detach();
    let rest = masked
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    Tensor::cat(&[&top, &rest], 1)
}

/// Every id is inside the vocabulary and appears once in its row.
fn check_ids(ids: &[u32], k: usize, v: usize) -> Result<()> {
    let mut seen = vec![usize::MAX; v];
    for (r, row) in ids.chunks(k.max(1)).enumerate() {
        for &id in row {
            let id = id as usize;
            if id >= v {
                candle_core::bail!("top-k row {r}: token id {id} is outside the vocabulary of {v}");
            }
            if seen[id] == r {
                candle_core::bail!("top-k row {r}: token id {id} appears twice");
            }
            seen[id] = r;
        }
    }
    Ok(())
}

/// ln Σ exp(x) of a row (−∞ entries add nothing).
#[inline(always)]
fn log_sum_exp<T: Real>(x: &[T]) -> T {
    let max = max_of(x);
    max + sum_map(x, |v| (v - max).exp_fast()).ln()
}

/// Writes scale·z into `x` and returns (ln Σ exp over the row, ln Σ exp over the rest); the
/// top-k entries of `x` are left at −∞.
#[inline(always)]
fn scaled_row<T: Real>(z: &[T], ids: &[u32], scale: T, x: &mut [T]) -> (T, T) {
    for (xv, &zv) in x.iter_mut().zip(z) {
        *xv = scale * zv;
    }
    let all = log_sum_exp(x);
    for &id in ids {
        x[id as usize] = T::neg_infinity();
    }
    (all, log_sum_exp(x))
}

multiversion! {
    /// One row's k + 1 bucket log-probabilities.
    fn bucket_row<T: Real>(z: &[T], ids: &[u32], scale: T, x: &mut [T], out: &mut [T]) {
        let (all, rest) = scaled_row(z, ids, scale, x);
        for (o, &id) in out.iter_mut().zip(ids) {
            *o = scale * z[id as usize] - all;
        }
        out[ids.len()] = rest - all;
    }
}

multiversion! {
    /// One row's gradient with respect to the logits, from the buckets' upstream gradient g.
    fn bucket_grad_row<T: Real>(z: &[T], ids: &[u32], scale: T, g: &[T], d: &mut [T]) {
        let (all, rest) = scaled_row(z, ids, scale, d);
        let k = ids.len();
        let total = g.iter().fold(T::zero(), |s, &v| s + v);
        let g_rest = g[k];
        // Every entry as if it were in the rest (top-k entries hold −∞ here, giving 0) ...
        for dv in d.iter_mut() {
            let x = *dv;
            *dv = scale * (g_rest * (x - rest).exp_fast() - total * (x - all).exp_fast());
        }
        // ... then the top-k entries.
        for (&id, &gj) in ids.iter().zip(g) {
            let q = (scale * z[id as usize] - all).exp_fast();
            d[id as usize] = scale * (gj - total * q);
        }
    }
}

struct TopKBuckets {
    scale: f64,
}

impl TopKBuckets {
    fn fwd<T: Real>(&self, zs: &CpuStorage, zl: &Layout, ids: &[u32]) -> Result<CpuStorage> {
        let z: &[T] = data(zs, zl, "mmkd-topk-buckets")?;
        let (v, k) = (zl.dims()[1], ids.len() / zl.dims()[0].max(1));
        check_ids(ids, k, v)?;
        let scale = T::from(self.scale).expect("a finite scale");
        let mut out = vec![T::zero(); zl.dims()[0] * (k + 1)];
        for_each_row_costing(&mut out, k + 1, 3 * v, |r, o| {
            let mut x = vec![T::zero(); v];
            bucket_row(
                &z[r * v..(r + 1) * v],
                &ids[r * k..(r + 1) * k],
                scale,
                &mut x,
                o,
            );
        });
        Ok(storage(out))
    }
}

impl CustomOp2 for TopKBuckets {
    fn name(&self) -> &'static str {
        "mmkd-topk-buckets"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (n, k) = (zl.dims()[0], il.dims()[1]);
        let ids: &[u32] = data(is, il, name)?;
        let out = match zs {
            CpuStorage::F32(_) => self.fwd::<f32>(zs, zl, ids)?,
            CpuStorage::F64(_) => self.fwd::<f64>(zs, zl, ids)?,
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from((n, k + 1))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        ids: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = z.apply_op3_no_bwd(
            ids,
            &dout.contiguous()?,
            &TopKBucketsGrad { scale: self.scale },
        )?;
        Ok((Some(dz), None))
    }
}

/// ∂/∂logits of the buckets from (logits, ids, upstream gradient `[n, k + 1]`).
struct TopKBucketsGrad {
    scale: f64,
}

impl TopKBucketsGrad {
    fn run<T: Real>(
        &self,
        (zs, zl): (&CpuStorage, &Layout),
        ids: &[u32],
        (gs, gl): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let name = "mmkd-topk-buckets-grad";
        let (z, g): (&[T], &[T]) = (data(zs, zl, name)?, data(gs, gl, name)?);
        let (v, k) = (zl.dims()[1], gl.dims()[1] - 1);
        let scale = T::from(self.scale).expect("a finite scale");
        let mut out = vec![T::zero(); z.len()];
        for_each_row(&mut out, v, |r, d| {
            bucket_grad_row(
                &z[r * v..(r + 1) * v],
                &ids[r * k..(r + 1) * k],
                scale,
                &g[r * (k + 1)..(r + 1) * (k + 1)],
                d,
            );
        });
        Ok(storage(out))
    }
}

impl CustomOp3 for TopKBucketsGrad {
    fn name(&self) -> &'static str {
        "mmkd-topk-buckets-grad"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        is: &CpuStorage,
        il: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let ids: &[u32] = data(is, il, name)?;
        let out = match zs {
            CpuStorage::F32(_) => self.run::<f32>((zs, zl), ids, (gs, gl))?,
            CpuStorage::F64(_) => self.run::<f64>((zs, zl), ids, (gs, gl))?,
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, zl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{check_against_slow, random};
    use crate::rng::SeededRng;
    use candle_core::Device;

    /// `k` distinct ids per row, drawn without replacement from `0..v`.
    fn distinct_ids(n: usize, k: usize, v: usize, seed: u64) -> Tensor {
        let mut rng = SeededRng::new(seed);
        let mut ids = Vec::with_capacity(n * k);
        for _ in 0..n {
            let mut pool: Vec<u32> = (0..v as u32).collect();
            for j in 0..k {
                let pick = j + rng.below(v - j);
                pool.swap(j, pick);
            }
            ids.extend_from_slice(&pool[..k]);
        }
        Tensor::from_vec(ids, (n, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn buckets_match_the_primitive_formulation() {
        // f64 to 1e-12 (many rows: the parallel path; spread logits: peaked softmax), then f32.
        for (dtype, n, v, k, spread, scale, tol) in [
            (DType::F64, 300, 257, 16, 4.0, 0.5, 1e-12),
            (DType::F64, 7, 40, 39, 2.0, 1.0, 1e-12),
            (DType::F32, 9, 33, 5, 1.0, 2.0, 1e-5),
        ] {
            let z = random(&[n, v], 1, dtype).affine(spread, 0.0).unwrap();
            let ids = distinct_ids(n, k, v, 2);
            check_against_slow(
                &[z],
                |a| topk_bucket_log_probs(&a[0], &ids, scale),
                |a| topk_bucket_log_probs_slow(&a[0], &ids, scale),
                tol,
            );
        }
    }

    #[test]
    fn the_buckets_are_a_distribution_even_when_the_rest_is_tiny() {
        // The rest's logits sit 80 below the top: its mass (e^-80) is far under f32's epsilon
        // relative to 1, yet its log comes out right because it is summed on its own.
        let mut z = vec![-80f32; 2 * 50];
        for r in 0..2 {
            for j in 0..3 {
                z[r * 50 + j] = 0.0;
            }
        }
        let z = Tensor::from_vec(z, (2, 50), &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 1, 2], [2, 0, 1]], &Device::Cpu).unwrap();
        let b = topk_bucket_log_probs(&z, &ids, 1.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for row in b {
            let want_rest = (47f64).ln() - 80.0 - 3f64.ln();
            assert!((row[3] as f64 - want_rest).abs() < 1e-4, "{row:?}");
            let mass: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
            assert!((mass - 1.0).abs() < 1e-6, "{mass}");
        }
    }

    #[test]
    fn bad_ids_are_errors() {
        let z = random(&[2, 6], 1, DType::F32);
        let outside = Tensor::new(&[[0u32, 1], [2, 6]], &Device::Cpu).unwrap();
        let err = topk_bucket_log_probs(&z, &outside, 1.0).unwrap_err();
        assert!(
            err.to_string()
                .contains("row 1: token id 6 is outside the vocabulary of 6"),
            "{err}"
        );
        let twice = Tensor::new(&[[3u32, 3], [0, 1]], &Device::Cpu).unwrap();
        let err = topk_bucket_log_probs(&z, &twice, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("row 0: token id 3 appears twice"),
            "{err}"
        );
        let all = Tensor::new(&[[0u32, 1, 2, 3, 4, 5]; 2], &Device::Cpu).unwrap();
        let err = topk_bucket_log_probs(&z, &all, 1.0).unwrap_err();
        assert!(err.to_string().contains("leaves no rest"), "{err}");
    }
}
