//! The one batch layer: a stage's data read and tokenized for a model, and a collated
//! `mmkd_datasets::Batch` turned into what the models and losses take (token ids, labels,
//! pixel values, and the visual mask computed once). The trainer, the teacher-cache builder,
//! the bench and evaluation all go through here.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use mmkd_datasets::{
    collate, Batch, CollateConfig, ImageCheck, LlavaDataset, PaddingSide, Template, TokenizeConfig,
    TokenizedDataset, TokenizedSample, Truncation,
};
use mmkd_vision::ImageProcessor;

use crate::checkpoint::LoadedModel;
use crate::models::llava::{LlavaModel, TokenBatch};
use crate::models::splice::VisualPositions;

/// How every stage pads: on the right with id 0, to the longest sample.
pub const TRAINING_COLLATE: CollateConfig = CollateConfig {
    pad_token_id: 0,
    padding_side: PaddingSide::Right,
    pad_to_multiple_of: 1,
};

/// How a stage tokenizes for `model`: its image token and visual tokens per image, long
/// samples truncated (never inside an image block).
pub fn training_tokenize_config(model: &LlavaModel, max_length: usize) -> TokenizeConfig {
    TokenizeConfig {
        image_token_id: model.image_token_id(),
        tokens_per_image: model.tokens_per_image(),
        max_length,
        truncation: Truncation::Truncate,
    }
}

/// Reads and tokenizes a stage's data (images must exist), reporting skipped records on
/// stderr; fails when nothing is left.
pub fn prepare_data(
    data: &Path,
    images: &Path,
    tokenizer: &tokenizers::Tokenizer,
    template: &Template,
    tokenize: &TokenizeConfig,
    what: &str,
) -> Result<TokenizedDataset> {
    let mut dataset = LlavaDataset::read(data, images)?;
    dataset.verify_images(ImageCheck::Exists, 2, &|_| {});
    let prepared = TokenizedDataset::build(&dataset, tokenizer, template, tokenize, 2, &|_| {})?;
    let report = &prepared.report;
    if !report.problems.is_empty() {
        eprintln!(
            "{what}: {} of {} records skipped ({}); first: {}",
            report.problems.len(),
            report.records,
            report
                .skipped_by_kind()
                .iter()
                .map(|(k, n)| format!("{k:?}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            report.problems[0]
        );
    }
    ensure!(
        !prepared.samples.is_empty(),
        "no usable sample in {}",
        data.display()
    );
    Ok(prepared)
}

/// One collated micro-batch as the models and losses take it.
pub struct ModelInputs {
    /// The collated batch (sample ids and indices, image paths).
    pub collated: Batch,
    pub tokens: TokenBatch,
    /// `[batch, seq]` unshifted labels, -100 = ignored.
    pub labels: Tensor,
    /// `[images, 3, H, W]`, `None` when the batch has no image.
    pub pixels: Option<Tensor>,
    /// `[batch, seq]` u8, 1 at the image-token positions (L_vis, L_rel).
    pub visual_mask: Tensor,
    /// The same positions per sample.
    pub visual: VisualPositions,
}

impl ModelInputs {
    /// Collates `indices` of `samples` for `model` (right padding) and loads their images.
    pub fn collate(
        samples: &[TokenizedSample],
        indices: Vec<usize>,
        model: &LoadedModel,
    ) -> Result<Self> {
        let refs: Vec<_> = indices.iter().map(|&i| &samples[i]).collect();
        let collated = collate(&refs, &indices, &TRAINING_COLLATE);
        Self::new(collated, &model.processor, &model.model)
    }

    /// A collated batch for `model`, its images preprocessed with `processor`.
    pub fn new(collated: Batch, processor: &ImageProcessor, model: &LlavaModel) -> Result<Self> {
        let pixels = pixel_values(&collated, processor, model.device())?;
        Self::with_pixels(collated, pixels, model)
    }

    /// A collated batch for `model` whose images are already preprocessed (`pixels`, in the
    /// batch's image order).
    pub fn with_pixels(
        collated: Batch,
        pixels: Option<Tensor>,
        model: &LlavaModel,
    ) -> Result<Self> {
        let device = model.device();
        let tokens = token_batch(&collated);
        let visual = VisualPositions::find(&tokens.ids, model.image_token_id());
        Ok(Self {
            labels: labels_tensor(&collated.labels, device)?,
            pixels,
            visual_mask: visual_mask(&visual, tokens.batch_size(), tokens.seq_len(), device)?,
            visual,
            tokens,
            collated,
        })
    }

    /// The samples' records in the data set the batch was collated from.
    pub fn samples<'s>(&self, samples: &'s [TokenizedSample]) -> Vec<&'s TokenizedSample> {
        self.collated
            .sample_indices
            .iter()
            .map(|&i| &samples[i])
            .collect()
    }
}

/// `[batch, seq]` u8 mask of the image-token positions.
pub fn visual_mask(
    visual: &VisualPositions,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<u8> = visual.mask.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(mask, (batch, seq), device)?)
}

pub fn labels_tensor(labels: &ndarray::Array2<i64>, device: &Device) -> Result<Tensor> {
    let (b, s) = labels.dim();
    Ok(Tensor::from_vec(
        labels.iter().copied().collect::<Vec<_>>(),
        (b, s),
        device,
    )?)
}

pub fn token_batch(batch: &Batch) -> TokenBatch {
    TokenBatch {
        ids: batch
            .input_ids
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect(),
        mask: batch
            .attention_mask
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect(),
    }
}

/// The batch's images, preprocessed; `None` when it has none. An unreadable image is an
/// error naming the sample and the file.
pub fn pixel_values(
    batch: &Batch,
    processor: &ImageProcessor,
    device: &Device,
) -> Result<Option<Tensor>> {
    if batch.images.is_empty() {
        return Ok(None);
    }
    let images = batch.load_images(2)?;
    let arrays = images
        .iter()
        .zip(&batch.images)
        .map(|(img, meta)| {
            processor.preprocess(img).with_context(|| {
                format!(
                    "sample {}: image {}",
                    batch.sample_ids[meta.row],
                    meta.path.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(mmkd_vision::to_tensor(&arrays, device)?))
}

/// Positions t whose logit L_res distils in one sample: label t + 1 supervised.
pub fn response_positions(sample: &TokenizedSample) -> Vec<u32> {
    (1..sample.labels.len())
        .filter(|&t| sample.labels[t] != mmkd_datasets::IGNORE_INDEX)
        .map(|t| (t - 1) as u32)
        .collect()
}

/// Image-token positions of one sample (L_vis, L_rel).
pub fn visual_positions(sample: &TokenizedSample, image_token_id: u32) -> Vec<u32> {
    sample
        .input_ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id == image_token_id)
        .map(|(t, _)| t as u32)
        .collect()
}
