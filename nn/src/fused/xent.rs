//! Row-wise losses over a vocabulary, from logits: forward KL(p‖q) with p = softmax(t) and
//! q = softmax(s), and the cross-entropy −log softmax(s)[target].
//!
//! Both are one pass per row forward (log-sum-exp and the sum together) and one pass backward:
//! ∂KL/∂s = q − p, ∂CE/∂s = q − onehot(target), each times the row's upstream gradient. The
//! teacher logits and the targets get no gradient (they are constants in every loss here).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::simd::{max_of, sum_map, sum_map2};
use super::{data, for_each_row, for_each_row_costing, has_kernel, multiversion, storage, Real};

/// KL(softmax(t) ‖ softmax(s)) per row of `[n, v]` logits; `[n]`. `t` is treated as a constant.
pub fn forward_kl_rows(s: &Tensor, t: &Tensor) -> Result<Tensor> {
    if has_kernel(s) && s.rank() == 2 && t.dims() == s.dims() && t.dtype() == s.dtype() {
        s.contiguous()?
            .apply_op2(&t.detach().contiguous()?, ForwardKl)
    } else {
        forward_kl_rows_slow(s, t)
    }
}

/// The reference formulation from primitive ops.
pub fn forward_kl_rows_slow(s: &Tensor, t: &Tensor) -> Result<Tensor> {
    let log_q = log_softmax_slow(s)?;
    let log_p = log_softmax_slow(&t.detach())?;
    log_p.exp()?.mul(&log_p.sub(&log_q)?)?.sum(D::Minus1)
}

/// −log softmax(logits)[target] per row of `[n, v]` logits with `targets` `[n]` (u32); `[n]`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if has_kernel(logits)
        && logits.rank() == 2
        && targets.dims() == [n]
        && targets.dtype() == DType::U32
    {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy)
    } else {
        cross_entropy_rows_slow(logits, targets)
    }
}

/// The reference formulation from primitive ops.
pub fn cross_entropy_rows_slow(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    log_softmax_slow(logits)?
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()
}

/// log_softmax over the last dimension from primitive ops, with a detached shift.
pub(crate) fn log_softmax_slow(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// (max, ln Σ exp(x − max)) of a row.
#[inline(always)]
fn max_and_log_sum<T: Real>(row: &[T]) -> (T, T) {
    let max = max_of(row);
    (max, sum_map(row, |v| (v - max).exp_fast()).ln())
}

multiversion! {
    /// KL(softmax(t) ‖ softmax(s)) of one row.
    fn kl_row<T: Real>(s: &[T], t: &[T]) -> T {
        let (ms, ls) = max_and_log_sum(s);
        let (mt, lt) = max_and_log_sum(t);
        // log p − log q = (t − mt − lt) − (s − ms − ls)
        let shift = ms + ls - mt - lt;
        sum_map2(t, s, |tv, sv| (tv - mt - lt).exp_fast() * (tv - sv + shift))
    }
}

multiversion! {
    /// −log softmax(x)[target] of one row.
    fn ce_row<T: Real>(x: &[T], target: usize) -> T {
        let (m, l) = max_and_log_sum(x);
        m + l - x[target]
    }
}

multiversion! {
    /// g · softmax(s) of one row, minus g · softmax(t) when a teacher row is given.
    fn softmax_minus_row<T: Real>(s: &[T], t: Option<&[T]>, g: T, d: &mut [T]) {
        let (ms, ls) = max_and_log_sum(s);
        match t {
            Some(t) => {
                let (mt, lt) = max_and_log_sum(t);
                for ((dv, &sv), &tv) in d.iter_mut().zip(s).zip(t) {
                    *dv = g * ((sv - ms - ls).exp_fast() - (tv - mt - lt).exp_fast());
                }
            }
            None => {
                for (dv, &sv) in d.iter_mut().zip(s) {
                    *dv = g * (sv - ms - ls).exp_fast();
                }
            }
        }
    }
}

fn vocab(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

struct ForwardKl;

impl ForwardKl {
    fn fwd<T: Real>(s: &[T], t: &[T], v: usize) -> Vec<T> {
        let mut out = vec![T::zero(); s.len() / v.max(1)];
        // One value per row: rows of width 1 in `out`, the logits rows read alongside.
        for_each_row_costing(&mut out, 1, 2 * v, |r, kl| {
            let span = r * v..(r + 1) * v;
            kl[0] = kl_row(&s[span.clone()], &t[span]);
        });
        out
    }
}

impl CustomOp2 for ForwardKl {
    fn name(&self) -> &'static str {
        "mmkd-forward-kl-rows"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let v = vocab(sl);
        let out = match ss {
            CpuStorage::F32(_) => storage(Self::fwd::<f32>(
                data(ss, sl, name)?,
                data(ts, tl, name)?,
                v,
            )),
            CpuStorage::F64(_) => storage(Self::fwd::<f64>(
                data(ss, sl, name)?,
                data(ts, tl, name)?,
                v,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from(sl.dims()[0])))
    }

    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        _kl: &Tensor,
        dkl: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = s.apply_op3_no_bwd(t, &dkl.contiguous()?, &SoftmaxMinusTarget::Teacher)?;
        Ok((Some(ds), None))
    }
}

struct CrossEntropy;

impl CrossEntropy {
    fn fwd<T: Real>(x: &[T], targets: &[u32], v: usize) -> Result<Vec<T>> {
        if let Some(&bad) = targets.iter().find(|&&c| c as usize >= v) {
            candle_core::bail!("cross-entropy target {bad} is outside the vocabulary of {v}");
        }
        let mut out = vec![T::zero(); targets.len()];
        for_each_row_costing(&mut out, 1, v, |r, ce| {
            ce[0] = ce_row(&x[r * v..(r + 1) * v], targets[r] as usize);
        });
        Ok(out)
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "mmkd-cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let v = vocab(xl);
        let targets: &[u32] = data(cs, cl, name)?;
        let out = match xs {
            CpuStorage::F32(_) => storage(Self::fwd::<f32>(data(xs, xl, name)?, targets, v)?),
            CpuStorage::F64(_) => storage(Self::fwd::<f64>(data(xs, xl, name)?, targets, v)?),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, Shape::from(targets.len())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        _ce: &Tensor,
        dce: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(targets, &dce.contiguous()?, &SoftmaxMinusTarget::OneHot)?;
        Ok((Some(dx), None))
    }
}

/// g_row · (softmax(s) − target) from (s, target, g): the target is softmax(t) of a teacher
/// row or the one-hot vector of a class index.
enum SoftmaxMinusTarget {
    Teacher,
    OneHot,
}

impl SoftmaxMinusTarget {
    fn run<T: Real>(&self, s: &[T], target: Target<'_, T>, g: &[T], v: usize) -> Vec<T> {
        let mut out = vec![T::zero(); s.len()];
        for_each_row(&mut out, v, |r, d| {
            let span = r * v..(r + 1) * v;
            match target {
                Target::Teacher(t) => softmax_minus_row(&s[span.clone()], Some(&t[span]), g[r], d),
                Target::Class(c) => {
                    softmax_minus_row(&s[span], None, g[r], d);
                    d[c[r] as usize] -= g[r];
                }
            }
        });
        out
    }
}

#[derive(Clone, Copy)]
enum Target<'a, T> {
    Teacher(&'a [T]),
    Class(&'a [u32]),
}

impl CustomOp3 for SoftmaxMinusTarget {
    fn name(&self) -> &'static str {
        "mmkd-softmax-minus-target"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let v = vocab(sl);
        fn target<'a, T: Real>(
            kind: &SoftmaxMinusTarget,
            ts: &'a CpuStorage,
            tl: &Layout,
            name: &str,
        ) -> Result<Target<'a, T>> {
            Ok(match kind {
                SoftmaxMinusTarget::Teacher => Target::Teacher(data(ts, tl, name)?),
                SoftmaxMinusTarget::OneHot => Target::Class(data(ts, tl, name)?),
            })
        }
        let out = match ss {
            CpuStorage::F32(_) => storage(self.run::<f32>(
                data(ss, sl, name)?,
                target(self, ts, tl, name)?,
                data(gs, gl, name)?,
                v,
            )),
            CpuStorage::F64(_) => storage(self.run::<f64>(
                data(ss, sl, name)?,
                target(self, ts, tl, name)?,
                data(gs, gl, name)?,
                v,
            )),
            _ => candle_core::bail!("{name}: f32/f64 only"),
        };
        Ok((out, sl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::{check_against_slow, random};
    use candle_core::Device;

    #[test]
    fn forward_kl_matches_the_primitive_formulation() {
        // Enough rows for the parallel path; logits spread wide so the softmax is peaked.
        let s = random(&[300, 257], 1, DType::F64).affine(4.0, 0.0).unwrap();
        let t = random(&[300, 257], 2, DType::F64).affine(4.0, 0.0).unwrap();
        check_against_slow(
            &[s],
            |a| forward_kl_rows(&a[0], &t),
            |a| forward_kl_rows_slow(&a[0], &t),
            1e-12,
        );
        let s = random(&[5, 33], 3, DType::F32);
        let t = random(&[5, 33], 4, DType::F32);
        check_against_slow(
            &[s],
            |a| forward_kl_rows(&a[0], &t),
            |a| forward_kl_rows_slow(&a[0], &t),
            1e-5,
        );
    }

    #[test]
    fn cross_entropy_matches_the_primitive_formulation() {
        let x = random(&[40, 50], 5, DType::F64).affine(3.0, 0.0).unwrap();
        let targets: Vec<u32> = (0..40).map(|i| (i * 7 % 50) as u32).collect();
        let targets = Tensor::from_vec(targets, 40, &Device::Cpu).unwrap();
        check_against_slow(
            &[x],
            |a| cross_entropy_rows(&a[0], &targets),
            |a| cross_entropy_rows_slow(&a[0], &targets),
            1e-12,
        );
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let x = random(&[2, 4], 1, DType::F32);
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let err = cross_entropy_rows(&x, &targets).unwrap_err().to_string();
        assert!(
            err.contains("target 4 is outside the vocabulary of 4"),
            "{err}"
        );
    }
}
