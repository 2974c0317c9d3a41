//! Which token positions each loss reads, as row indices into logits flattened to
//! `[batch·seq, vocab]`. Gathering the rows first means the softmax and the divergence run on
//! the few rows a loss needs, not on every position.
//!
//! Conventions (docs/design.md): labels are unshifted and `-100` is ignored, so the logit at
//! position t is supervised by `labels[t + 1]`; visual positions are those holding the image
//! token and are read unshifted.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

/// The label of positions no loss supervises (the data crate's, as transformers writes it).
pub use mmkd_datasets::IGNORE_INDEX;

/// Positions supervised by a next token: `rows[i]` is the flat index `b·seq + t` of a logit
/// whose next label `labels[b, t + 1]` is not ignored, and `targets[i]` is that label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseRows {
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

impl ResponseRows {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }
}

/// Reads a `[batch, seq]` integer tensor to the host.
fn int_matrix(t: &Tensor, what: &str) -> Result<Vec<Vec<i64>>> {
    ensure!(
        t.rank() == 2,
        "{what} must be [batch, seq], got shape {:?}",
        t.dims()
    );
    ensure!(
        t.dtype().is_int(),
        "{what} must be an integer tensor, got {:?}",
        t.dtype()
    );
    t.to_dtype(DType::I64)?
        .to_vec2::<i64>()
        .with_context(|| format!("reading {what}"))
}

/// The supervised next-token positions of a `[batch, seq]` label tensor.
pub fn response_rows(labels: &Tensor) -> Result<ResponseRows> {
    let labels = int_matrix(labels, "labels")?;
    let mut out = ResponseRows::default();
    for (b, row) in labels.iter().enumerate() {
        let seq = row.len();
        for (t, &label) in row.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label > u32::MAX as i64 {
                bail!("labels: sample {b}, position {t} holds {label}, which is neither a token id nor {IGNORE_INDEX}");
            }
            // Label t is predicted by the logit at t − 1; a label at position 0 has no logit.
            if t > 0 {
                out.rows.push(flat_row(b, seq, t - 1)?);
                out.targets.push(label as u32);
            }
        }
    }
    Ok(out)
}

/// The visual positions of a `[batch, seq]` mask (non-zero = visual), as flat row indices.
pub fn visual_rows(visual_mask: &Tensor) -> Result<Vec<u32>> {
    let per_sample = visual_positions_per_sample(visual_mask)?;
    let seq = visual_mask.dim(1)?;
    let mut rows = Vec::new();
    for (b, positions) in per_sample.iter().enumerate() {
        for &t in positions {
            rows.push(flat_row(b, seq, t as usize)?);
        }
    }
    Ok(rows)
}

/// The visual positions of each sample (positions within the sample, in order).
pub fn visual_positions_per_sample(visual_mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    let mask = int_matrix(visual_mask, "visual mask")?;
    Ok(mask
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, &m)| m != 0)
                .map(|(t, _)| t as u32)
                .collect()
        })
        .collect())
}

/// The `[batch, seq]` u8 mask of positions holding `image_token_id`.
pub fn visual_mask_from_ids(input_ids: &Tensor, image_token_id: u32) -> Result<Tensor> {
    ensure!(
        input_ids.rank() == 2 && input_ids.dtype().is_int(),
        "input ids must be an integer [batch, seq] tensor, got {:?} {:?}",
        input_ids.dtype(),
        input_ids.dims()
    );
    Ok(input_ids.to_dtype(DType::I64)?.eq(image_token_id as f64)?)
}

/// The rows `rows` of `[batch, seq, vocab]` logits, as `[rows.len(), vocab]`.
pub fn gather_rows(logits: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (b, s, v) = logits
        .dims3()
        .context("logits must be [batch, seq, vocab]")?;
    let index = Tensor::from_slice(rows, rows.len(), logits.device())?;
    Ok(logits.reshape((b * s, v))?.index_select(&index, 0)?)
}

fn flat_row(b: usize, seq: usize, t: usize) -> Result<u32> {
    u32::try_from(b * seq + t).context("batch·seq exceeds u32 row indices")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn response_rows_are_shifted_by_one() {
        let labels = Tensor::new(
            &[[-100i64, -100, 7, 8], [-100, 3, -100, -100]],
            &Device::Cpu,
        )
        .unwrap();
        let r = response_rows(&labels).unwrap();
        // Sample 0: labels at 2, 3 → logits 1, 2. Sample 1: label at 1 → logit 0 → row 4.
        assert_eq!(r.rows, vec![1, 2, 4]);
        assert_eq!(r.targets, vec![7, 8, 3]);
    }

    #[test]
    fn a_label_at_position_zero_has_no_logit() {
        let labels = Tensor::new(&[[5i64, 6]], &Device::Cpu).unwrap();
        assert_eq!(response_rows(&labels).unwrap().rows, vec![0]);
    }

    #[test]
    fn bad_labels_are_errors() {
        let labels = Tensor::new(&[[-100i64, 2], [-7, 1]], &Device::Cpu).unwrap();
        let err = response_rows(&labels).unwrap_err().to_string();
        assert_eq!(
            err,
            "labels: sample 1, position 0 holds -7, which is neither a token id nor -100"
        );
        let float = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let err = response_rows(&float).unwrap_err().to_string();
        assert!(err.contains("labels must be an integer tensor"), "{err}");
        let flat = Tensor::new(&[1i64, 2], &Device::Cpu).unwrap();
        let err = response_rows(&flat).unwrap_err().to_string();
        assert!(
            err.contains("labels must be [batch, seq], got shape [2]"),
            "{err}"
        );
    }

    #[test]
    fn visual_rows_from_ids() {
        let ids = Tensor::new(&[[1u32, 9, 9, 4], [9, 2, 9, 0]], &Device::Cpu).unwrap();
        let mask = visual_mask_from_ids(&ids, 9).unwrap();
        assert_eq!(
            mask.to_vec2::<u8>().unwrap(),
            vec![vec![0, 1, 1, 0], vec![1, 0, 1, 0]]
        );
        assert_eq!(visual_rows(&mask).unwrap(), vec![1, 2, 4, 6]);
        assert_eq!(
            visual_positions_per_sample(&mask).unwrap(),
            vec![vec![1, 2], vec![0, 2]]
        );
    }
}
