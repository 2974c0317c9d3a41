//! LLaVA-KD's loss as one function: L = L_ce + α·L_res + β·L_vis + γ·L_rel against an online
//! teacher ([`distill_loss`]) or a teacher cache ([`distill_loss_cached`]), from the same terms
//! the named objectives use ([`super::inputs::LossInputs`]).

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, D};

use super::ce::{cross_entropy, scalar};
use super::config::DistillLossConfig;
use super::inputs::{CachedTeacher, LossInputs, RelationHidden, StudentLogits, TeacherSide};
use super::rdist::StudentRelation;

/// One batch's loss: `total` to backpropagate, each term's value for logging (`None` when the
/// batch had nothing for that term or its weight is 0).
#[derive(Clone, Debug)]
pub struct LossTerms {
    pub total: Tensor,
    pub total_value: f32,
    pub ce: Option<f32>,
    pub l_res: Option<f32>,
    pub l_vis: Option<f32>,
    pub l_rel: Option<f32>,
}

impl LossTerms {
    /// The loss of a stage without teacher (PT, SFT): cross-entropy only.
    pub fn ce_only(logits: &Tensor, labels: &Tensor) -> Result<LossTerms> {
        let ce = cross_entropy(logits, labels)?.context(
            "the batch has no supervised token (every label is -100): nothing to train on",
        )?;
        let value = scalar(&ce)?;
        Ok(LossTerms {
            total: ce,
            total_value: value,
            ce: Some(value),
            l_res: None,
            l_vis: None,
            l_rel: None,
        })
    }
}

/// What a distillation step feeds the loss.
#[derive(Clone, Copy, Debug)]
pub struct DistillBatch<'a> {
    /// `[batch, seq, vocab]`, part of the graph.
    pub student_logits: &'a Tensor,
    /// `[batch, seq, vocab]`; detached here.
    pub teacher_logits: &'a Tensor,
    /// `[batch, seq]` unshifted labels, -100 = ignored.
    pub labels: &'a Tensor,
    /// `[batch, seq]`, non-zero at image-token positions.
    pub visual_mask: &'a Tensor,
    /// When set, L_rel is computed from hidden states (same value, far cheaper for large V).
    pub relation_hidden: Option<RelationHidden<'a>>,
}

/// L_ce + α·L_res + β·L_vis + γ·L_rel. Absent terms (no supervised token, no image, zero
/// weight) are left out; a batch with no term at all is an error.
pub fn distill_loss(batch: &DistillBatch<'_>, cfg: &DistillLossConfig) -> Result<LossTerms> {
    cfg.validate()?;
    let inputs = LossInputs::new(
        StudentLogits::Full(batch.student_logits),
        batch.labels,
        batch.visual_mask,
        Some(TeacherSide::Logits {
            logits: batch.teacher_logits,
            relation_hidden: batch.relation_hidden,
        }),
        None,
    )?;
    llava_kd_terms(&inputs, cfg)
}

/// What a distillation step from a teacher cache feeds the loss.
#[derive(Clone, Copy, Debug)]
pub struct CachedDistillBatch<'a> {
    /// The student's logits (already cut to the cache's vocabulary), part of the graph.
    pub student_logits: StudentLogits<'a>,
    pub labels: &'a Tensor,
    pub visual_mask: &'a Tensor,
    pub teacher: CachedTeacher<'a>,
    /// The student side of L_rel; `None`: the loss picks the cheaper form for the student —
    /// the logits at the visual rows L_vis reads, or (with [`StudentLogits::AtRows`]) the
    /// hidden-state form.
    pub student_relation: Option<StudentRelation<'a>>,
}

/// [`distill_loss`] against a cached teacher: L_res and L_vis on the k + 1 buckets of the
/// teacher's top-k (see [`super::topk`]), L_rel against the cached relation matrices. With
/// k = vocabulary it equals [`distill_loss`] on the teacher the cache was written from.
pub fn distill_loss_cached(
    batch: &CachedDistillBatch<'_>,
    cfg: &DistillLossConfig,
) -> Result<LossTerms> {
    cfg.validate()?;
    let inputs = LossInputs::new(
        batch.student_logits,
        batch.labels,
        batch.visual_mask,
        Some(TeacherSide::Cached(batch.teacher)),
        batch.student_relation,
    )?;
    llava_kd_terms(&inputs, cfg)
}

/// The four LLaVA-KD terms (those of positive weight) and their weighted sum.
fn llava_kd_terms(inputs: &LossInputs<'_>, cfg: &DistillLossConfig) -> Result<LossTerms> {
    let ce = inputs.ce()?;
    let l_res = if cfg.alpha_res > 0.0 {
        inputs.response_divergence(cfg)?
    } else {
        None
    };
    let l_vis = if cfg.beta_vis > 0.0 {
        inputs.visual_divergence(cfg)?
    } else {
        None
    };
    let l_rel = if cfg.gamma_rel > 0.0 {
        inputs.relation()?
    } else {
        None
    };
    let Some(total) = weighted_sum([
        (ce.as_ref(), 1.0),
        (l_res.as_ref(), cfg.alpha_res),
        (l_vis.as_ref(), cfg.beta_vis),
        (l_rel.as_ref(), cfg.gamma_rel),
    ])?
    else {
        bail!("the batch has no supervised token and no visual position: nothing to train on");
    };
    let value = |t: &Option<Tensor>| t.as_ref().map(scalar).transpose();
    Ok(LossTerms {
        total_value: scalar(&total)?,
        total,
        ce: value(&ce)?,
        l_res: value(&l_res)?,
        l_vis: value(&l_vis)?,
        l_rel: value(&l_rel)?,
    })
}

/// Σ weight·term over the terms present, in order (a weight of 1 adds the term as it is);
/// `None` when no term is present.
pub fn weighted_sum<'t>(
    terms: impl IntoIterator<Item = (Option<&'t Tensor>, f64)>,
) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (term, weight) in terms {
        let Some(t) = term else { continue };
        let weighted = if weight == 1.0 {
            t.clone()
        } else {
            t.affine(weight, 0.0)?
        };
        total = Some(match total {
            Some(acc) => acc.add(&weighted)?,
            None => weighted,
        });
    }
    Ok(total)
}

/// Cuts `[.., V]` logits to their first `vocab` entries, for a teacher and student whose
/// vocabularies differ only by padding (e.g. Qwen 152064 vs 151936). Fails when `vocab` is
/// larger than the logits' vocabulary.
pub fn truncate_vocab(logits: &Tensor, vocab: usize) -> Result<Tensor> {
    let have = logits.dim(D::Minus1)?;
    ensure!(
        vocab <= have,
        "cannot cut logits with vocabulary {have} to {vocab}: it is larger"
    );
    if vocab == have {
        return Ok(logits.clone());
    }
    Ok(logits.narrow(D::Minus1, 0, vocab)?)
}

#[cfg(test)]
mod tests {
    use super::super::positions::{gather_rows, response_rows, visual_rows};
    use super::*;
    use candle_core::{DType, Device, Var};
    use mmkd_nn::grad_check::finite_difference;

    #[test]
    fn logits_at_the_loss_rows_give_the_full_logits_loss_and_gradients() {
        let dev = Device::Cpu;
        let (b, s, h, v) = (2, 6, 8, 12);
        let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, h), &dev).unwrap()).unwrap();
        let head = Var::from_tensor(&Tensor::randn(0f32, 0.5, (v, h), &dev).unwrap()).unwrap();
        let labels = Tensor::new(
            &[
                [-100i64, -100, -100, -100, 3, 7],
                [-100, -100, -100, 5, 1, -100],
            ],
            &dev,
        )
        .unwrap();
        // Different visual counts per sample.
        let visual_mask = Tensor::new(&[[0u8, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], &dev).unwrap();
        let teacher_logits = Tensor::randn(0f32, 2.0, (b, s, v), &dev).unwrap();
        let top = |rows: &[u32]| {
            let t = gather_rows(&teacher_logits, rows).unwrap();
            super::super::topk::TopKHost::from_logits(&t, 5, 1.0)
                .unwrap()
                .to_tensors(&dev)
                .unwrap()
        };
        let response = top(&response_rows(&labels).unwrap().rows);
        let visual = top(&visual_rows(&visual_mask).unwrap());
        let relations =
            super::super::rdist::relation_matrices(&teacher_logits, &visual_mask).unwrap();
        let teacher = CachedTeacher {
            response: &response,
            visual: &visual,
            relations: &relations,
        };
        let cfg = DistillLossConfig::default();
        let full = mmkd_nn::fused::linear(hidden.as_tensor(), head.as_tensor(), None).unwrap();
        let run = |student_logits, student_relation| {
            let terms = distill_loss_cached(
                &CachedDistillBatch {
                    student_logits,
                    labels: &labels,
                    visual_mask: &visual_mask,
                    teacher,
                    student_relation,
                },
                &cfg,
            )
            .unwrap();
            let grads = terms.total.backward().unwrap();
            let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
            (terms, grad(&hidden), grad(&head))
        };
        let at_rows = StudentLogits::AtRows {
            hidden: hidden.as_tensor(),
            head: head.as_tensor(),
        };
        let reference = run(
            StudentLogits::Full(&full),
            Some(StudentRelation::Logits(&full)),
        );
        let hidden_form = StudentRelation::Hidden {
            hidden: hidden.as_tensor(),
            head: head.as_tensor(),
        };
        for (what, got) in [
            ("visual-row relation", run(at_rows, None)),
            ("hidden-form relation", run(at_rows, Some(hidden_form))),
        ] {
            let (t, r) = (&got.0, &reference.0);
            for (term, a, e) in [
                ("total", Some(t.total_value), Some(r.total_value)),
                ("ce", t.ce, r.ce),
                ("l_res", t.l_res, r.l_res),
                ("l_vis", t.l_vis, r.l_vis),
                ("l_rel", t.l_rel, r.l_rel),
            ] {
                let (a, e) = (a.unwrap(), e.unwrap());
                assert!(
                    (a - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{what} {term}: {a} vs {e}"
                );
            }
            for (name, a, e) in [
                ("hidden", &got.1, &reference.1),
                ("head", &got.2, &reference.2),
            ] {
                let diff = (a - e).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(diff <= 1e-5, "{what}: ∂{name} differs by {diff}");
            }
        }
        assert!(reference.0.l_rel.unwrap() > 0.0 && reference.0.l_vis.unwrap() > 0.0);
    }

    #[test]
    fn cross_entropy_by_hand() {
        // One supervised token: logit row 0 of sample 0 must predict token 2.
        let logits = Tensor::new(&[[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[-100i64, 2]], &Device::Cpu).unwrap();
        let got = cross_entropy(&logits, &labels)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = -(3.0f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn cross_entropy_errors_and_none() {
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[-100i64, -100, 9]], &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &labels).unwrap_err().to_string();
        assert_eq!(
            err,
            "labels: sample 0, position 2 holds token 9, outside the vocabulary of 4 logits"
        );
        let none = Tensor::new(&[[-100i64, -100, -100]], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &none).unwrap().is_none());
        let err = LossTerms::ce_only(&logits, &none).unwrap_err().to_string();
        assert!(err.contains("no supervised token"), "{err}");
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let data: Vec<f64> = (0..2 * 3 * 5)
            .map(|i| (i as f64 * 0.7).sin() * 2.0)
            .collect();
        let x = Tensor::from_vec(data, (2, 3, 5), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[-100i64, 1, 4], [-100, -100, 0]], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let loss = cross_entropy(var.as_tensor(), &labels).unwrap().unwrap();
        let analytic = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap();
        let numeric = finite_difference(
            |t| {
                cross_entropy(t, &labels)
                    .map_err(candle_core::Error::wrap)?
                    .unwrap()
                    .to_scalar::<f64>()
            },
            &x,
            1e-6,
        )
        .unwrap();
        for (a, n) in analytic.to_vec1::<f64>().unwrap().iter().zip(&numeric) {
            assert!((a - n).abs() < 1e-8, "analytic {a} vs numeric {n}");
        }
    }

    #[test]
    fn zero_weights_skip_terms_and_empty_batches_fail() {
        let s = Tensor::new(&[[[1.0f32, 2.0], [0.5, 0.1]]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[[0.0f32, 1.0], [2.0, 0.1]]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[[-100i64, -100]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu).unwrap();
        let batch = DistillBatch {
            student_logits: &s,
            teacher_logits: &t,
            labels: &labels,
            visual_mask: &mask,
            relation_hidden: None,
        };
        let cfg = DistillLossConfig {
            gamma_rel: 0.0,
            ..Default::default()
        };
        let terms = distill_loss(&batch, &cfg).unwrap();
        assert_eq!((terms.ce, terms.l_res, terms.l_rel), (None, None, None));
        assert_eq!(terms.total_value, terms.l_vis.unwrap());
        let cfg = DistillLossConfig {
            beta_vis: 0.0,
            gamma_rel: 0.0,
            ..Default::default()
        };
        let err = distill_loss(&batch, &cfg).unwrap_err().to_string();
        assert!(
            err.contains("no supervised token and no visual position"),
            "{err}"
        );
    }

    #[test]
    fn truncate_vocab_cuts_padding_only() {
        let x = Tensor::zeros((1, 2, 6), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(truncate_vocab(&x, 4).unwrap().dims(), &[1, 2, 4]);
        let err = truncate_vocab(&x, 8).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot cut logits with vocabulary 6 to 8: it is larger"
        );
    }
}
