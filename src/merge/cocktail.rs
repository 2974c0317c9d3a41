//! LM-Cocktail's merging weights (Xiao et al. 2023, arXiv 2311.13534, §3.2): each model's loss
//! on a few examples of the target task, wᵢ = softmax(−Lᵢ / τ). The loss of a model is its
//! next-token cross-entropy over the examples' answer tokens, averaged per batch and then over
//! batches, as the LM-Cocktail package's `llm_loss` does (its defaults: τ = 5, batches of 2).

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use crate::batch::{prepare_data, training_tokenize_config, ModelInputs};
use crate::checkpoint::LoadedModel;
use crate::distill::DistillLossConfig;
use crate::models::llava::{BuildOptions, ImageInput, Trainable};
use crate::objective::{Objective, TermSpec};
use crate::train::forward::{objective_loss, StudentBatch, TeacherRows};

/// The LM-Cocktail package's default temperature.
pub const DEFAULT_TAU: f64 = 5.0;
/// The LM-Cocktail package's default batch size for the example loss.
pub const DEFAULT_BATCH_SIZE: usize = 2;

/// The examples a model's loss is measured on.
pub struct Examples<'a> {
    pub data: &'a Path,
    pub images: &'a Path,
    /// The conversation template; `None`: each model's recorded one, else `plain`.
    pub template: Option<&'a str>,
    pub batch_size: usize,
    pub max_length: usize,
}

/// One model's loss on the examples.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ExampleLoss {
    pub model: String,
    pub loss: f64,
    pub examples: usize,
}

/// `model`'s mean cross-entropy on the examples (no gradient).
pub fn example_loss(model: &Path, examples: &Examples<'_>) -> Result<ExampleLoss> {
    ensure!(examples.batch_size > 0, "--batch-size must be at least 1");
    let bundle = LoadedModel::load(
        model.to_str().context("model path is not UTF-8")?,
        &BuildOptions::new(Trainable::NONE, 0),
    )?;
    let template = crate::checkpoint::training::template_for(
        bundle.training.as_ref(),
        &bundle.model_dir,
        examples.template,
        "plain",
    )?;
    let data = prepare_data(
        examples.data,
        examples.images,
        &bundle.tokenizer,
        &template,
        &training_tokenize_config(&bundle.model, examples.max_length),
        "merge examples",
    )?;
    let objective = Objective::new(&[TermSpec::new("ce", 1.0)], &DistillLossConfig::default())?;
    let indices: Vec<usize> = (0..data.samples.len()).collect();
    let mut batch_losses = Vec::new();
    for chunk in indices.chunks(examples.batch_size) {
        let inputs = ModelInputs::collate(&data.samples, chunk.to_vec(), &bundle)?;
        let loss = objective_loss(
            &bundle.model,
            StudentBatch::of_data(
                &inputs.tokens,
                &inputs.labels,
                &inputs.visual_mask,
                inputs.pixels.as_ref().map(ImageInput::Pixels),
            ),
            TeacherRows::None,
            &objective,
        )
        .with_context(|| {
            format!(
                "{}: the loss on examples {}",
                model.display(),
                inputs.collated.sample_ids.join(", ")
            )
        })?;
        batch_losses.push(loss.value as f64);
    }
    Ok(ExampleLoss {
        model: model.display().to_string(),
        loss: batch_losses.iter().sum::<f64>() / batch_losses.len() as f64,
        examples: data.samples.len(),
    })
}

/// wᵢ = exp(−Lᵢ/τ) / Σⱼ exp(−Lⱼ/τ), computed stably (shifted by the smallest loss).
pub fn cocktail_weights(losses: &[f64], tau: f64) -> Result<Vec<f64>> {
    ensure!(
        tau.is_finite() && tau > 0.0,
        "τ must be a positive number, got {tau}"
    );
    ensure!(
        losses.iter().all(|l| l.is_finite()),
        "a model's example loss is not a finite number: {losses:?}"
    );
    let best = losses.iter().cloned().fold(f64::INFINITY, f64::min);
    let scores: Vec<f64> = losses.iter().map(|l| (-(l - best) / tau).exp()).collect();
    let total: f64 = scores.iter().sum();
    Ok(scores.iter().map(|s| s / total).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_the_softmax_of_minus_the_losses_over_tau() {
        // By hand: losses 1 and 2, τ = 1: e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1) = 0.7310585786.
        let w = cocktail_weights(&[1.0, 2.0], 1.0).unwrap();
        assert!((w[0] - 0.731_058_578_6).abs() < 1e-9, "{w:?}");
        assert!((w[1] - 0.268_941_421_4).abs() < 1e-9, "{w:?}");
        // τ = 5 (the default) flattens them: 1 / (1 + e^-0.2) = 0.5498339973.
        let w = cocktail_weights(&[1.0, 2.0], DEFAULT_TAU).unwrap();
        assert!((w[0] - 0.549_833_997_3).abs() < 1e-9, "{w:?}");
        // Three models, equal losses: equal weights; huge losses do not overflow.
        let w = cocktail_weights(&[900.0, 900.0, 900.0], 0.01).unwrap();
        assert!(w.iter().all(|x| (x - 1.0 / 3.0).abs() < 1e-12), "{w:?}");
        assert!(cocktail_weights(&[1.0, f64::NAN], 1.0).is_err());
        assert!(cocktail_weights(&[1.0], 0.0).is_err());
    }
}
