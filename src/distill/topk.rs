//! MDist against a teacher kept as its top-k log-probabilities (the offline teacher cache).
//!
//! Per distilled row the teacher is stored as the ids of its k most likely tokens, their
//! log-probabilities at the distillation temperature T, and the log of the mass left over,
//! log(1 − Σ top-k p). Teacher and student are then compared on k + 1 buckets: the teacher's
//! top-k ids and "the rest". The student's rest is the log-sum-exp of its log-probabilities over
//! the ids outside the teacher's top-k (computed directly, not as log(1 − Σ), which would cancel
//! when the top-k hold almost all the mass). With k = vocabulary there is no rest bucket and the
//! loss equals the exact one.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::config::DistillLossConfig;
use super::logprob::{compute_dtype, log_softmax};

/// Teacher rows on the host: `ids` and `log_probs` are `[rows, k]` row-major, `rest` is
/// `[rows]` (−∞ when k is the whole vocabulary).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopKHost {
    pub k: usize,
    pub ids: Vec<u32>,
    pub log_probs: Vec<f32>,
    pub rest: Vec<f32>,
}

impl TopKHost {
    pub fn empty(k: usize) -> Self {
        Self {
            k,
            ..Default::default()
        }
    }

    pub fn rows(&self) -> usize {
        self.rest.len()
    }

    /// The top-k of every row of `[rows, vocab]` teacher logits at `temperature`, computed in
    /// f64. Ties are broken towards the smaller token id, so the result is deterministic.
    pub fn from_logits(logits: &Tensor, k: usize, temperature: f64) -> Result<Self> {
        let (rows, vocab) = logits
            .dims2()
            .context("teacher rows must be [rows, vocab]")?;
        ensure!(
            k >= 1 && k <= vocab,
            "top-k must be between 1 and the vocabulary ({vocab}), got {k}"
        );
        ensure!(
            temperature.is_finite() && temperature > 0.0,
            "temperature must be a positive number, got {temperature}"
        );
        let values = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let per_row: Vec<(Vec<u32>, Vec<f32>, f32)> = values
            .par_chunks(vocab.max(1))
            .map(|row| top_k_row(row, k, temperature))
            .collect();
        let mut out = TopKHost::empty(k);
        out.ids.reserve(rows * k);
        out.log_probs.reserve(rows * k);
        out.rest.reserve(rows);
        for (ids, lp, rest) in per_row {
            out.ids.extend(ids);
            out.log_probs.extend(lp);
            out.rest.push(rest);
        }
        Ok(out)
    }

    /// Appends another block of rows with the same k.
    pub fn extend(&mut self, other: &TopKHost) -> Result<()> {
        ensure!(
            other.k == self.k || other.rows() == 0,
            "cannot join top-{} rows with top-{} rows",
            self.k,
            other.k
        );
        self.ids.extend_from_slice(&other.ids);
        self.log_probs.extend_from_slice(&other.log_probs);
        self.rest.extend_from_slice(&other.rest);
        Ok(())
    }

    /// Rows `start..start + len` as a new block.
    pub fn slice(&self, start: usize, len: usize) -> Result<TopKHost> {
        ensure!(
            start + len <= self.rows(),
            "rows {start}..{} of a block of {}",
            start + len,
            self.rows()
        );
        let k = self.k;
        Ok(TopKHost {
            k,
            ids: self.ids[start * k..(start + len) * k].to_vec(),
            log_probs: self.log_probs[start * k..(start + len) * k].to_vec(),
            rest: self.rest[start..start + len].to_vec(),
        })
    }

    /// The same rows as tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<TopKRows> {
        let (n, k) = (self.rows(), self.k);
        ensure!(
            self.ids.len() == n * k && self.log_probs.len() == n * k,
            "top-k rows hold {} ids and {} log-probabilities for {n} rows of k = {k}",
            self.ids.len(),
            self.log_probs.len()
        );
        Ok(TopKRows {
            ids: Tensor::from_slice(&self.ids, (n, k), device)?,
            log_probs: Tensor::from_slice(&self.log_probs, (n, k), device)?,
            rest: Tensor::from_slice(&self.rest, n, device)?,
        })
    }
}

/// (ids, log-probs, log rest mass) of one row of logits.
fn top_k_row(row: &[f32], k: usize, temperature: f64) -> (Vec<u32>, Vec<f32>, f32) {
    let scaled: Vec<f64> = row.iter().map(|&x| x as f64 / temperature).collect();
    let lse = log_sum_exp(scaled.iter().copied());
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| {
        scaled[*b as usize]
            .total_cmp(&scaled[*a as usize])
            .then(a.cmp(b))
    };
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_value);
    }
    let (top, rest) = order.split_at_mut(k);
    top.sort_unstable_by(by_value);
    let log_probs = top
        .iter()
        .map(|&i| (scaled[i as usize] - lse) as f32)
        .collect();
    let rest_mass = if rest.is_empty() {
        f32::NEG_INFINITY
    } else {
        (log_sum_exp(rest.iter().map(|&i| scaled[i as usize])) - lse) as f32
    };
    (top.to_vec(), log_probs, rest_mass)
}

fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Teacher rows as tensors: `ids` `[rows, k]` u32, `log_probs` `[rows, k]` f32 (at the
/// distillation temperature), `rest` `[rows]` f32.
#[derive(Clone, Debug)]
pub struct TopKRows {
    pub ids: Tensor,
    pub log_probs: Tensor,
    pub rest: Tensor,
}

impl TopKRows {
    pub fn rows(&self) -> Result<usize> {
        Ok(self.ids.dim(0)?)
    }

    /// The rows in `rows`.
    pub fn narrow(&self, rows: std::ops::Range<usize>) -> Result<TopKRows> {
        let cut = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        Ok(TopKRows {
            ids: cut(&self.ids)?,
            log_probs: cut(&self.log_probs)?,
            rest: cut(&self.rest)?,
        })
    }
}

/// The per-row divergence `[rows]` between the student's `[rows, vocab]` logits and a
/// teacher's top-k rows, on the k + 1 buckets (top-k ids, the rest), with the config's
/// divergence, temperature and T² option. Gradients reach the student logits through the
/// gather and the rest's log-sum-exp.
pub fn topk_per_token(
    student_rows: &Tensor,
    teacher: &TopKRows,
    cfg: &DistillLossConfig,
) -> Result<Tensor> {
    let (n, vocab) = student_rows
        .dims2()
        .context("student rows must be [rows, vocab]")?;
    let (tn, k) = teacher.ids.dims2()?;
    ensure!(
        tn == n && teacher.log_probs.dims() == [n, k] && teacher.rest.dims() == [n],
        "the teacher's top-k rows {:?} / {:?} / {:?} do not match the student's {n} rows",
        teacher.ids.dims(),
        teacher.log_probs.dims(),
        teacher.rest.dims()
    );
    if k > vocab {
        bail!("the teacher's top-{k} exceeds the student's vocabulary ({vocab})");
    }
    ensure!(
        !cfg.divergence.needs_full_teacher(),
        "{} reads the teacher's logits at the student's top tokens, which a teacher cache does \
         not keep: run it with --teacher",
        cfg.divergence.name()
    );
    let student_rows = student_rows.to_dtype(compute_dtype(student_rows))?;
    let ids = teacher.ids.to_dtype(DType::U32)?.contiguous()?;
    let top_p = teacher.log_probs.to_dtype(student_rows.dtype())?;
    let (log_q, log_p) = if k == vocab {
        let log_q = log_softmax(&student_rows.affine(1.0 / cfg.temperature, 0.0)?)?;
        (log_q.contiguous()?.gather(&ids, 1)?, top_p)
    } else {
        // One fused pass: the student's log-softmax at the k ids and its rest's log-mass.
        let log_q =
            mmkd_nn::fused::topk_bucket_log_probs(&student_rows, &ids, 1.0 / cfg.temperature)?;
        let rest_p = teacher.rest.to_dtype(student_rows.dtype())?.unsqueeze(1)?;
        (log_q, Tensor::cat(&[&top_p, &rest_p], 1)?)
    };
    // Both are normalised log-distributions: at temperature 1 the divergence's own
    // log-softmax leaves them unchanged.
    let d = cfg.divergence.per_token(&log_q, &log_p.detach(), 1.0)?;
    if cfg.t2_scaling {
        Ok(d.affine(cfg.temperature * cfg.temperature, 0.0)?)
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::Divergence;
    use candle_core::Var;
    use mmkd_nn::grad_check::finite_difference;

    fn rows(seed: f64, n: usize, v: usize) -> Tensor {
        let data: Vec<f64> = (0..n * v)
            .map(|i| ((i as f64 + seed) * 0.73).sin() * 3.0)
            .collect();
        Tensor::from_vec(data, (n, v), &Device::Cpu).unwrap()
    }

    fn all() -> Vec<Divergence> {
        vec![
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::GeneralizedJsd { beta: 0.3 },
            Divergence::TotalVariation,
            Divergence::SkewForwardKl { alpha: 0.1 },
            Divergence::SkewReverseKl { alpha: 0.1 },
        ]
    }

    #[test]
    fn top_k_is_sorted_and_the_rest_mass_completes_it() {
        let t = Tensor::new(&[[1.0f32, 3.0, 2.0, 3.0, -1.0]], &Device::Cpu).unwrap();
        let top = TopKHost::from_logits(&t, 2, 1.0).unwrap();
        // Ties go to the smaller id.
        assert_eq!(top.ids, vec![1, 3]);
        let p: f64 = top.log_probs.iter().map(|&l| (l as f64).exp()).sum::<f64>()
            + (top.rest[0] as f64).exp();
        assert!((p - 1.0).abs() < 1e-6, "{p}");
        let full = TopKHost::from_logits(&t, 5, 2.0).unwrap();
        assert_eq!(full.rest, vec![f32::NEG_INFINITY]);
        assert_eq!(full.ids, vec![1, 3, 2, 0, 4]);
        let err = TopKHost::from_logits(&t, 6, 1.0).unwrap_err().to_string();
        assert_eq!(err, "top-k must be between 1 and the vocabulary (5), got 6");
    }

    #[test]
    fn full_vocabulary_top_k_equals_the_exact_divergence_with_gradients() {
        let s = rows(0.0, 3, 7);
        let t = rows(5.0, 3, 7);
        for d in all() {
            for (temperature, t2) in [(1.0, false), (2.0, true)] {
                let cfg = DistillLossConfig {
                    divergence: d,
                    temperature,
                    t2_scaling: t2,
                    ..Default::default()
                };
                let top = TopKHost::from_logits(&t, 7, temperature)
                    .unwrap()
                    .to_tensors(&Device::Cpu)
                    .unwrap();
                let var = Var::from_tensor(&s).unwrap();
                let cached = topk_per_token(var.as_tensor(), &top, &cfg).unwrap();
                let exact = cfg.per_token(var.as_tensor(), &t).unwrap();
                let (c, e) = (
                    cached.to_vec1::<f64>().unwrap(),
                    exact.to_vec1::<f64>().unwrap(),
                );
                for (a, b) in c.iter().zip(&e) {
                    assert!((a - b).abs() < 1e-6, "{d} T={temperature}: {a} vs {b}");
                }
                let g = |x: &Tensor| {
                    x.sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                        .get(var.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                };
                for (a, b) in g(&cached).iter().zip(&g(&exact)) {
                    assert!((a - b).abs() < 1e-6, "{d} gradient: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn partial_top_k_gradients_match_finite_differences() {
        let s = rows(0.0, 2, 9);
        let t = rows(3.0, 2, 9);
        let top = TopKHost::from_logits(&t, 3, 1.5)
            .unwrap()
            .to_tensors(&Device::Cpu)
            .unwrap();
        let w = Tensor::new(&[0.7f64, -1.3], &Device::Cpu).unwrap();
        for d in all() {
            let cfg = DistillLossConfig {
                divergence: d,
                temperature: 1.5,
                ..Default::default()
            };
            let f = |x: &Tensor| -> candle_core::Result<Tensor> {
                topk_per_token(x, &top, &cfg)
                    .map_err(candle_core::Error::wrap)?
                    .mul(&w)?
                    .sum_all()
            };
            let var = Var::from_tensor(&s).unwrap();
            let analytic = f(var.as_tensor())
                .unwrap()
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let numeric = finite_difference(|x| f(x)?.to_scalar::<f64>(), &s, 1e-6).unwrap();
            for (a, n) in analytic.iter().zip(&numeric) {
                assert!((a - n).abs() < 1e-7, "{d}: analytic {a} vs numeric {n}");
            }
        }
    }

    #[test]
    fn bucketed_forward_kl_is_a_lower_bound_that_closes_with_k() {
        // Merging outcomes never increases a KL divergence (data processing inequality).
        let s = rows(1.0, 4, 16);
        let t = rows(2.0, 4, 16);
        let cfg = DistillLossConfig::default();
        let exact: f64 = cfg
            .per_token(&s, &t)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let mut last = 0.0;
        for k in [1, 4, 8, 15, 16] {
            let top = TopKHost::from_logits(&t, k, 1.0)
                .unwrap()
                .to_tensors(&Device::Cpu)
                .unwrap();
            let v: f64 = topk_per_token(&s, &top, &cfg)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(v <= exact + 1e-6 && v >= last - 1e-6, "k={k}: {v}");
            last = v;
        }
        // The cached teacher is f32: equal to f32 precision.
        assert!((last - exact).abs() < 1e-6, "{last} vs {exact}");
    }
}
