//! The benchmark's batch: random token ids and pixels of the spec's shapes, seeded so every
//! run times the same work.

use anyhow::Result;
use candle_core::{Device, Shape, Tensor};
use mmkd_nn::SeededRng;

use super::spec::BenchSpec;
use crate::batch::visual_mask;
use crate::distill::IGNORE_INDEX;
use crate::models::llava::TokenBatch;
use crate::models::splice::VisualPositions;

/// One step's inputs.
pub struct BenchBatch {
    /// `[batch, seq]`: prefix, the image block, prompt, response (no padding).
    pub tokens: TokenBatch,
    /// `[batch, 3, image_size, image_size]`, standard normal.
    pub pixels: Tensor,
    /// `[batch, seq]` i64: the response tokens, −100 elsewhere (unshifted).
    pub labels: Tensor,
    /// `[batch, seq]` u8: 1 at image-token positions.
    pub visual_mask: Tensor,
}

impl BenchBatch {
    /// Text ids are uniform in `0..vocab − 2` (as in the peer); one image per sample.
    pub fn random(spec: &BenchSpec, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = SeededRng::new(seed);
        let (seq, image) = (spec.seq_len(), spec.image_tokens());
        let image_start = spec.prefix_tokens;
        let response_start = seq - spec.response_tokens;
        let mut ids = Vec::with_capacity(spec.batch);
        let mut labels = Vec::with_capacity(spec.batch * seq);
        for _ in 0..spec.batch {
            let row: Vec<u32> = (0..seq)
                .map(|t| {
                    if (image_start..image_start + image).contains(&t) {
                        spec.image_token_id()
                    } else {
                        rng.below(spec.vocab - 2) as u32
                    }
                })
                .collect();
            for (t, &id) in row.iter().enumerate() {
                labels.push(if t >= response_start {
                    id as i64
                } else {
                    IGNORE_INDEX
                });
            }
            ids.push(row);
        }
        let side = spec.vision.image_size;
        // The visual positions as every batch gets them (the batch layer's mask).
        let visual = VisualPositions::find(&ids, spec.image_token_id());
        Ok(Self {
            visual_mask: visual_mask(&visual, spec.batch, seq, device)?,
            tokens: TokenBatch::right_padded(&ids, 0),
            pixels: normal_tensor((spec.batch, 3, side, side), seed ^ 0x5eed, device)?,
            labels: Tensor::from_vec(labels, (spec.batch, seq), device)?,
        })
    }
}

impl BenchBatch {
    /// Rows `rows` of the batch (views of its tensors).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Self> {
        let (start, len) = (rows.start, rows.len());
        Ok(Self {
            tokens: TokenBatch {
                ids: self.tokens.ids[rows.clone()].to_vec(),
                mask: self.tokens.mask[rows].to_vec(),
            },
            pixels: self.pixels.narrow(0, start, len)?,
            labels: self.labels.narrow(0, start, len)?,
            visual_mask: self.visual_mask.narrow(0, start, len)?,
        })
    }
}

/// A standard-normal f32 tensor from a seeded generator.
pub fn normal_tensor(shape: impl Into<Shape>, seed: u64, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let values = SeededRng::new(seed).normal_vec(shape.elem_count(), 1.0);
    Ok(Tensor::from_vec(values, shape, device)?)
}
