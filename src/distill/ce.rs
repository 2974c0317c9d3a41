//! Masked next-token cross-entropy, the language loss of every stage.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::logprob::compute_dtype;
use super::mdist::check_labels;
use super::positions::{gather_rows, response_rows, ResponseRows};

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

pub(crate) fn ce_rows(logits: &Tensor, response: &ResponseRows) -> Result<Option<Tensor>> {
    if response.is_empty() {
        return Ok(None);
    }
    let (_, seq, vocab) = logits.dims3()?;
    check_targets(response, seq, vocab)?;
    ce_of_rows(&gather_rows(logits, &response.rows)?, response).map(Some)
}

/// Every response target must index the logits' vocabulary; otherwise name the sample and
/// position.
pub(crate) fn check_targets(response: &ResponseRows, seq: usize, vocab: usize) -> Result<()> {
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

pub(crate) fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}

/// Mean cross-entropy of the response rows' logits `[rows, vocab]` against their targets.
pub(crate) fn ce_of_rows(rows: &Tensor, response: &ResponseRows) -> Result<Tensor> {
    let rows = rows.to_dtype(compute_dtype(rows))?;
    let targets = Tensor::from_slice(&response.targets, response.len(), rows.device())?;
    let per_token = mmkd_nn::fused::cross_entropy_rows(&rows, &targets)?;
    Ok(per_token.mean_all()?)
}
