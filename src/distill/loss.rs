//! The training objective of every stage: masked next-token cross-entropy, plus (in the
//! distillation stages) L = L_ce + α·L_res + β·L_vis + γ·L_rel.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::divergence::Divergence;
use super::logprob::compute_dtype;
use super::mdist::{check_labels, check_pair, rows_loss};
use super::positions::{gather_rows, response_rows, visual_rows, ResponseRows};
use super::rdist::{
    relation_loss, relation_loss_from_hidden, relation_loss_to_cached,
    student_hidden_form_is_cheaper, StudentRelation,
};
use super::topk::{topk_per_token, TopKRows};

/// Distillation loss settings. Defaults are the paper's: forward KL at T = 1 without T²,
/// (α, β, γ) = (1.0, 1.0, 0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillLossConfig {
    pub divergence: Divergence,
    /// Softmax temperature T applied to both teacher and student logits.
    pub temperature: f64,
    /// Multiply the divergence terms (L_res, L_vis) by T², as in Hinton et al., so their
    /// gradient scale does not shrink with T. LLaVA-KD and TRL do not.
    pub t2_scaling: bool,
    /// Weight α of L_res.
    pub alpha_res: f64,
    /// Weight β of L_vis.
    pub beta_vis: f64,
    /// Weight γ of L_rel.
    pub gamma_rel: f64,
}

impl Default for DistillLossConfig {
    fn default() -> Self {
        Self {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            t2_scaling: false,
            alpha_res: 1.0,
            beta_vis: 1.0,
            gamma_rel: 0.5,
        }
    }
}

impl DistillLossConfig {
    pub fn validate(&self) -> Result<()> {
        self.divergence.validate()?;
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "distillation `temperature` must be a positive number, got {}",
            self.temperature
        );
        for (name, w) in [
            ("alpha_res", self.alpha_res),
            ("beta_vis", self.beta_vis),
            ("gamma_rel", self.gamma_rel),
        ] {
            ensure!(
                w.is_finite() && w >= 0.0,
                "distillation weight `{name}` must be ≥ 0, got {w}"
            );
        }
        Ok(())
    }

    /// Per-row divergence of `[N, V]` logits at this temperature, times T² when enabled.
    pub fn per_token(&self, student_rows: &Tensor, teacher_rows: &Tensor) -> Result<Tensor> {
        let d = self
            .divergence
            .per_token(student_rows, teacher_rows, self.temperature)?;
        if self.t2_scaling {
            Ok(d.affine(self.temperature * self.temperature, 0.0)?)
        } else {
            Ok(d)
        }
    }
}

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

/// Hidden states and bias-free `lm_head` weights for the cheaper relation loss
/// (see [`relation_loss_from_hidden`]).
#[derive(Clone, Copy, Debug)]
pub struct RelationHidden<'a> {
    pub student_hidden: &'a Tensor,
    pub student_head: &'a Tensor,
    pub teacher_hidden: &'a Tensor,
    pub teacher_head: &'a Tensor,
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
    let DistillBatch {
        student_logits,
        teacher_logits,
        labels,
        visual_mask,
        relation_hidden,
    } = *batch;
    check_pair(student_logits, teacher_logits)?;
    check_labels(student_logits, labels, "labels")?;
    check_labels(student_logits, visual_mask, "visual mask")?;

    let response = response_rows(labels)?;
    let ce = ce_rows(student_logits, &response)?;
    let l_res = if cfg.alpha_res > 0.0 {
        rows_loss(student_logits, teacher_logits, &response.rows, cfg)
            .context("response distillation loss (L_res)")?
    } else {
        None
    };
    let l_vis = if cfg.beta_vis > 0.0 {
        rows_loss(
            student_logits,
            teacher_logits,
            &visual_rows(visual_mask)?,
            cfg,
        )
        .context("visual distillation loss (L_vis)")?
    } else {
        None
    };
    let l_rel = if cfg.gamma_rel > 0.0 {
        match relation_hidden {
            Some(h) => relation_loss_from_hidden(
                h.student_hidden,
                h.student_head,
                h.teacher_hidden,
                h.teacher_head,
                visual_mask,
            )?,
            None => relation_loss(student_logits, teacher_logits, visual_mask)?,
        }
    } else {
        None
    };

    combine(ce, l_res, l_vis, l_rel, cfg)
}

/// A teacher read back from an offline cache, lined up with one batch.
#[derive(Clone, Copy, Debug)]
pub struct CachedTeacher<'a> {
    /// Top-k rows at the batch's response positions, in [`response_rows`] order.
    pub response: &'a TopKRows,
    /// Top-k rows at the batch's visual positions, in [`visual_rows`] order.
    pub visual: &'a TopKRows,
    /// The teacher's relation matrix of each batch row (`None`: no visual position, or the
    /// cache holds none because L_rel is off).
    pub relations: &'a [Option<Tensor>],
}

/// Where the student's logits at the rows a loss reads come from.
#[derive(Clone, Copy, Debug)]
pub enum StudentLogits<'a> {
    /// `[batch, seq, vocab]` at every position; the rows are gathered from them.
    Full(&'a Tensor),
    /// Final hidden states `[batch, seq, hidden]` and the bias-free LM head `[vocab, hidden]`
    /// (cut to the vocabulary the loss compares): logits are computed at the loss's rows only.
    /// Same values; the head then skips the positions no loss reads, and the backward scatters
    /// hidden-width gradients instead of a vocabulary-wide one per gathered row set.
    AtRows {
        hidden: &'a Tensor,
        head: &'a Tensor,
    },
}

impl StudentLogits<'_> {
    /// `[batch, seq, vocab]`.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        match self {
            StudentLogits::Full(logits) => logits.dims3().with_context(|| {
                format!(
                    "student logits must be [batch, seq, vocab], got {:?}",
                    logits.dims()
                )
            }),
            StudentLogits::AtRows { hidden, head } => {
                let (b, s, h) = hidden.dims3().with_context(|| {
                    format!(
                        "student hidden states must be [batch, seq, hidden], got {:?}",
                        hidden.dims()
                    )
                })?;
                let (v, head_h) = head
                    .dims2()
                    .context("the LM head must be [vocab, hidden]")?;
                ensure!(
                    head_h == h,
                    "the LM head is [{v}, {head_h}], the hidden states are {h} wide"
                );
                Ok((b, s, v))
            }
        }
    }

    /// The logits `[rows, vocab]` at flat `batch·seq` rows.
    fn rows(&self, rows: &[u32]) -> Result<Tensor> {
        match self {
            StudentLogits::Full(logits) => gather_rows(logits, rows),
            StudentLogits::AtRows { hidden, head } => {
                let picked = gather_rows(hidden, rows)?;
                Ok(mmkd_nn::fused::linear(&picked, head, None)?)
            }
        }
    }
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
    let CachedDistillBatch {
        student_logits,
        labels,
        visual_mask,
        teacher,
        student_relation,
    } = *batch;
    let (b, seq, vocab) = student_logits.dims()?;
    for (t, what) in [(labels, "labels"), (visual_mask, "visual mask")] {
        ensure!(
            t.dims() == [b, seq],
            "{what} have shape {:?}, the logits cover [{b}, {seq}] positions",
            t.dims()
        );
    }
    let response = response_rows(labels)?;
    check_targets(&response, seq, vocab)?;
    let check_cached = |rows: &[u32], top: &TopKRows, what: &str| -> Result<()> {
        ensure!(
            top.rows()? == rows.len(),
            "{what}: the cache holds {} teacher rows for the batch's {} positions",
            top.rows()?,
            rows.len()
        );
        Ok(())
    };
    // The response rows' logits serve both CE and L_res.
    let response_logits = if response.is_empty() {
        None
    } else {
        Some(student_logits.rows(&response.rows)?)
    };
    let ce = response_logits
        .as_ref()
        .map(|rows| ce_of_rows(rows, &response))
        .transpose()?;
    let l_res = match (&response_logits, cfg.alpha_res > 0.0) {
        (Some(rows), true) => check_cached(&response.rows, teacher.response, "L_res")
            .and_then(|()| Ok(topk_per_token(rows, teacher.response, cfg)?.mean_all()?))
            .map(Some)
            .context("response distillation loss (L_res) from the teacher cache")?,
        (None, true) => {
            check_cached(&response.rows, teacher.response, "L_res")
                .context("response distillation loss (L_res) from the teacher cache")?;
            None
        }
        (_, false) => None,
    };
    let visual = visual_rows(visual_mask)?;
    // Unless the caller chose, the student side of L_rel takes the cheaper of Z Zᵀ =
    // H (WᵀW) Hᵀ and the visual-row logits (the teacher's side comes from the cache).
    let student_relation = match (student_relation, student_logits) {
        (Some(relation), _) => Some(relation),
        (None, StudentLogits::AtRows { hidden, head }) if cfg.gamma_rel > 0.0 => {
            let mut per_sample = vec![0usize; b];
            for &row in &visual {
                per_sample[row as usize / seq] += 1;
            }
            student_hidden_form_is_cheaper(&per_sample, vocab, hidden.dim(2)?)
                .then_some(StudentRelation::Hidden { hidden, head })
        }
        (None, _) => None,
    };
    let wants_rows = cfg.beta_vis > 0.0 || (cfg.gamma_rel > 0.0 && student_relation.is_none());
    let visual_logits = if wants_rows && !visual.is_empty() {
        Some(student_logits.rows(&visual)?)
    } else {
        None
    };
    let l_vis = if cfg.beta_vis > 0.0 {
        check_cached(&visual, teacher.visual, "L_vis")
            .context("visual distillation loss (L_vis) from the teacher cache")?;
        visual_logits
            .as_ref()
            .map(|student| -> Result<Tensor> {
                Ok(topk_per_token(student, teacher.visual, cfg)
                    .context("visual distillation loss (L_vis) from the teacher cache")?
                    .mean_all()?)
            })
            .transpose()?
    } else {
        None
    };
    let l_rel = if cfg.gamma_rel > 0.0 {
        match (student_relation, &visual_logits) {
            (Some(relation), _) => {
                relation_loss_to_cached(relation, teacher.relations, visual_mask)?
            }
            (None, Some(rows)) => relation_loss_to_cached(
                StudentRelation::VisualRows(rows),
                teacher.relations,
                visual_mask,
            )?,
            (None, None) => None,
        }
    } else {
        None
    };
    combine(ce, l_res, l_vis, l_rel, cfg)
}

/// L_ce + α·L_res + β·L_vis + γ·L_rel over the terms present.
fn combine(
    ce: Option<Tensor>,
    l_res: Option<Tensor>,
    l_vis: Option<Tensor>,
    l_rel: Option<Tensor>,
    cfg: &DistillLossConfig,
) -> Result<LossTerms> {
    let mut total: Option<Tensor> = None;
    for (term, weight) in [
        (&ce, 1.0),
        (&l_res, cfg.alpha_res),
        (&l_vis, cfg.beta_vis),
        (&l_rel, cfg.gamma_rel),
    ] {
        if let Some(t) = term {
            let weighted = t.affine(weight, 0.0)?;
            total = Some(match total {
                Some(acc) => acc.add(&weighted)?,
                None => weighted,
            });
        }
    }
    let Some(total) = total else {
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

/// Next-token cross-entropy of `[batch, seq, vocab]` logits against unshifted `[batch, seq]`
/// labels: the logit at t is scored against `labels[t + 1]`, positions labelled -100 are
/// skipped, and the result is the mean over the supervised tokens of the whole batch (as
/// `torch.nn.functional.cross_entropy(..., ignore_index=-100)` on shifted tensors).
/// `None` when no token is supervised.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Option<Tensor>> {
    logits.dims3().with_context(|| {
        format!(
            "logits must be [batch, seq, vocab], got {:?}",
            logits.dims()
        )
    })?;
    check_labels(logits, labels, "labels")?;
    ce_rows(logits, &response_rows(labels)?)
}

fn ce_rows(logits: &Tensor, response: &ResponseRows) -> Result<Option<Tensor>> {
    if response.is_empty() {
        return Ok(None);
    }
    let (_, seq, vocab) = logits.dims3()?;
    check_targets(response, seq, vocab)?;
    ce_of_rows(&gather_rows(logits, &response.rows)?, response).map(Some)
}

/// Every response target must index the logits' vocabulary; otherwise name the sample and
/// position.
fn check_targets(response: &ResponseRows, seq: usize, vocab: usize) -> Result<()> {
    if let Some((i, &bad)) = response
        .targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        let row = response.rows[i] as usize;
        bail!(
            "labels: sample {}, position {} holds token {bad}, outside the vocabulary of {vocab} logits",
            row / seq,
            row % seq + 1
        );
    }
    Ok(())
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}

/// Mean cross-entropy of the response rows' logits `[rows, vocab]` against their targets.
fn ce_of_rows(rows: &Tensor, response: &ResponseRows) -> Result<Tensor> {
    let rows = rows.to_dtype(compute_dtype(rows))?;
    let targets = Tensor::from_slice(&response.targets, response.len(), rows.device())?;
    let per_token = mmkd_nn::fused::cross_entropy_rows(&rows, &targets)?;
    Ok(per_token.mean_all()?)
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
    use super::*;
    use candle_core::{DType, Device, Var};
    use mmkd_nn::grad_check::finite_difference;

    #[test]
    fn config_from_toml_with_defaults() {
        let cfg: DistillLossConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, DistillLossConfig::default());
        let cfg: DistillLossConfig =
            toml::from_str("divergence = { kind = \"jsd\", beta = 0.9 }\ntemperature = 2.0\nt2_scaling = true\ngamma_rel = 0.0")
                .unwrap();
        assert_eq!(cfg.divergence, Divergence::GeneralizedJsd { beta: 0.9 });
        assert_eq!(
            (
                cfg.temperature,
                cfg.t2_scaling,
                cfg.alpha_res,
                cfg.gamma_rel
            ),
            (2.0, true, 1.0, 0.0)
        );
        let err = toml::from_str::<DistillLossConfig>("alpha = 1.0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `alpha`"), "{err}");
        let bad = DistillLossConfig {
            beta_vis: -1.0,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "distillation weight `beta_vis` must be ≥ 0, got -1"
        );
    }

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
