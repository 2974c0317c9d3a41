//! MDist: multimodal output-distribution distillation (LLaVA-KD).
//!
//! - L_res: mean divergence over the response positions (logit t whose next label
//!   `labels[t + 1]` is supervised).
//! - L_vis: mean divergence over the visual positions (logits at the image-token positions,
//!   unshifted), over the whole vocabulary.
//!
//! Both are token means over the whole batch. Text-only samples have no visual positions and
//! so contribute to L_res only. The teacher logits are detached.

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

use super::config::DistillLossConfig;
use super::positions::{gather_rows, response_rows, visual_rows};

/// L_res, or `None` when no position of the batch is supervised.
pub fn response_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    labels: &Tensor,
    cfg: &DistillLossConfig,
) -> Result<Option<Tensor>> {
    check_pair(student_logits, teacher_logits)?;
    check_labels(student_logits, labels, "labels")?;
    let rows = response_rows(labels)?;
    rows_loss(student_logits, teacher_logits, &rows.rows, cfg)
        .context("response distillation loss (L_res)")
}

/// L_vis, or `None` when the batch has no visual position.
pub fn visual_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    visual_mask: &Tensor,
    cfg: &DistillLossConfig,
) -> Result<Option<Tensor>> {
    check_pair(student_logits, teacher_logits)?;
    check_labels(student_logits, visual_mask, "visual mask")?;
    let rows = visual_rows(visual_mask)?;
    rows_loss(student_logits, teacher_logits, &rows, cfg)
        .context("visual distillation loss (L_vis)")
}

/// Mean divergence (with the config's temperature and optional T² factor) over the given
/// flat rows of `[batch, seq, vocab]` logits; `None` when `rows` is empty.
pub fn rows_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    rows: &[u32],
    cfg: &DistillLossConfig,
) -> Result<Option<Tensor>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let student = gather_rows(student_logits, rows)?;
    let teacher = gather_rows(&teacher_logits.detach(), rows)?;
    let per_token = cfg.per_token(&student, &teacher)?;
    Ok(Some(per_token.mean_all()?))
}

/// Student and teacher logits must line up position by position and share the vocabulary.
pub(crate) fn check_pair(student_logits: &Tensor, teacher_logits: &Tensor) -> Result<()> {
    let (sb, ss, sv) = student_logits.dims3().with_context(|| {
        format!(
            "student logits must be [batch, seq, vocab], got {:?}",
            student_logits.dims()
        )
    })?;
    let (tb, ts, tv) = teacher_logits.dims3().with_context(|| {
        format!(
            "teacher logits must be [batch, seq, vocab], got {:?}",
            teacher_logits.dims()
        )
    })?;
    ensure!(
        (sb, ss) == (tb, ts),
        "student logits [{sb}, {ss}, {sv}] and teacher logits [{tb}, {ts}, {tv}] cover different positions"
    );
    ensure!(
        sv == tv,
        "student vocabulary ({sv}) and teacher vocabulary ({tv}) differ; cut both to the shared \
         vocabulary explicitly (distill::truncate_vocab) if they differ only by padding"
    );
    Ok(())
}

/// A `[batch, seq]` tensor must match the logits' first two dimensions.
pub(crate) fn check_labels(logits: &Tensor, t: &Tensor, what: &str) -> Result<()> {
    let (b, s, _) = logits.dims3()?;
    ensure!(
        t.dims() == [b, s],
        "{what} have shape {:?}, the logits cover [{b}, {s}] positions",
        t.dims()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::Divergence;
    use candle_core::{DType, Device, IndexOp};

    fn logits(seed: f32, b: usize, s: usize, v: usize) -> Tensor {
        let data: Vec<f32> = (0..b * s * v)
            .map(|i| ((i as f32 + seed) * 0.37).sin() * 3.0)
            .collect();
        Tensor::from_vec(data, (b, s, v), &Device::Cpu).unwrap()
    }

    #[test]
    fn response_loss_reads_the_shifted_rows_only() {
        let s = logits(0.0, 2, 4, 5);
        let t = logits(1.0, 2, 4, 5);
        let labels = Tensor::new(
            &[[-100i64, -100, 3, -100], [-100, 1, -100, -100]],
            &Device::Cpu,
        )
        .unwrap();
        let cfg = DistillLossConfig::default();
        let got = response_loss(&s, &t, &labels, &cfg)
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Rows (0, 1) and (1, 0).
        let kl = |b: usize, p: usize| {
            Divergence::ForwardKl
                .per_token(
                    &s.i((b, p..p + 1)).unwrap(),
                    &t.i((b, p..p + 1)).unwrap(),
                    1.0,
                )
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
        };
        let want = (kl(0, 1) + kl(1, 0)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn nothing_to_distil_is_none() {
        let s = logits(0.0, 1, 3, 4);
        let labels = Tensor::new(&[[-100i64, -100, -100]], &Device::Cpu).unwrap();
        let mask = Tensor::zeros((1, 3), DType::U8, &Device::Cpu).unwrap();
        let cfg = DistillLossConfig::default();
        assert!(response_loss(&s, &s, &labels, &cfg).unwrap().is_none());
        assert!(visual_loss(&s, &s, &mask, &cfg).unwrap().is_none());
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let cfg = DistillLossConfig::default();
        let s = logits(0.0, 1, 3, 4);
        let labels = Tensor::new(&[[-100i64, 1, 2]], &Device::Cpu).unwrap();
        let err = response_loss(&s, &logits(0.0, 1, 3, 6), &labels, &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("student vocabulary (4) and teacher vocabulary (6) differ"),
            "{err}"
        );
        let err = response_loss(&s, &logits(0.0, 1, 2, 4), &labels, &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cover different positions"), "{err}");
        let short = Tensor::new(&[[-100i64, 1]], &Device::Cpu).unwrap();
        let err = response_loss(&s, &s, &short, &cfg).unwrap_err().to_string();
        assert_eq!(
            err,
            "labels have shape [1, 2], the logits cover [1, 3] positions"
        );
    }
}
