//! A merge job: the inputs checked, the weights given or LM-Cocktail's, the merged checkpoint
//! written atomically with a record of how (`merge.json`); or a LoRA adapter folded into its
//! base.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{
    check_compatible, cocktail_weights, example_loss, normalised, weighted_average, ExampleLoss,
    Examples, MergeInput,
};
use crate::checkpoint::layout::saved_key;
use crate::checkpoint::lock::OutputLock;
use crate::checkpoint::training::TRAINING_FILE;
use crate::checkpoint::{filled_temp_sibling, replace_dir, TOKENIZER_FILES};

/// What `merge.json` records next to the merged model.
pub const MERGE_FILE: &str = "merge.json";

/// How the merge weights are chosen.
pub enum MergeWeights {
    /// One per model (normalised to sum to 1).
    Given(Vec<f64>),
    /// LM-Cocktail's, from each model's loss on `examples` (LLaVA data, images under
    /// `images`) with temperature `tau`.
    Auto {
        examples: PathBuf,
        images: PathBuf,
        tau: f64,
        template: Option<String>,
        batch_size: usize,
        max_length: usize,
    },
}

pub struct MergeRequest {
    pub models: Vec<PathBuf>,
    pub weights: MergeWeights,
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub force: bool,
}

/// What was merged, how and why.
#[derive(Debug, Serialize)]
pub struct MergeRecord {
    pub models: Vec<String>,
    /// The normalised weights used.
    pub weights: Vec<f64>,
    /// `given` or `auto` (LM-Cocktail).
    pub rule: &'static str,
    /// With `auto`: each model's example loss, τ and the examples file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub losses: Vec<ExampleLoss>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub examples: Option<String>,
    pub out: String,
}

fn refuse_existing(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{} already exists: choose another --out or pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

/// Writes the adapter folded into its base as a full checkpoint; returns what was folded.
pub fn fold_adapter(adapter: &Path, out: &Path, force: bool) -> Result<String> {
    ensure!(
        crate::checkpoint::adapter::is_adapter(adapter),
        "{} is not a LoRA adapter directory (no adapter_config.json, or it has a config.json)",
        adapter.display()
    );
    refuse_existing(out, force)?;
    let _lock = OutputLock::acquire_beside(out)?;
    let spec = adapter.to_str().context("adapter path is not UTF-8")?;
    let bundle = crate::checkpoint::LoadedModel::load(
        spec,
        &crate::models::llava::BuildOptions::new(crate::models::llava::Trainable::NONE, 0),
    )?;
    crate::checkpoint::save_llava(
        &bundle.model,
        out,
        crate::checkpoint::SaveAssets {
            tokenizer_dir: Some(&bundle.dir),
            tokenizer: None,
            processor: Some(&bundle.processor),
            training: bundle.training.as_ref(),
        },
    )?;
    Ok(bundle.origin)
}

/// Runs a merge job (the `mmkd merge` command, the demo's `merged` row).
pub fn merge(req: &MergeRequest) -> Result<MergeRecord> {
    if let MergeWeights::Given(weights) = &req.weights {
        ensure!(
            weights.len() == req.models.len(),
            "{} models but {} weights",
            req.models.len(),
            weights.len()
        );
    }
    ensure!(req.models.len() >= 2, "merging needs two or more models");
    refuse_existing(&req.out, req.force)?;
    let _lock = OutputLock::acquire_beside(&req.out)?;
    let models = req
        .models
        .iter()
        .map(|dir| MergeInput::read(dir))
        .collect::<Result<Vec<_>>>()?;
    check_compatible(&models)?;

    let (weights, losses, tau, examples_file) = match &req.weights {
        MergeWeights::Given(weights) => (normalised(weights)?, Vec::new(), None, None),
        MergeWeights::Auto {
            examples,
            images,
            tau,
            template,
            batch_size,
            max_length,
        } => {
            let spec = Examples {
                data: examples,
                images,
                template: template.as_deref(),
                batch_size: *batch_size,
                max_length: *max_length,
            };
            let losses = req
                .models
                .iter()
                .map(|m| example_loss(m, &spec))
                .collect::<Result<Vec<_>>>()?;
            let values: Vec<f64> = losses.iter().map(|l| l.loss).collect();
            let weights = cocktail_weights(&values, *tau)?;
            (
                weights,
                losses,
                Some(*tau),
                Some(examples.display().to_string()),
            )
        }
    };
    let merged = weighted_average(&models, &weights)?;
    let record = MergeRecord {
        models: req.models.iter().map(|m| m.display().to_string()).collect(),
        weights,
        rule: if tau.is_some() { "auto" } else { "given" },
        tau,
        examples: examples_file,
        losses,
        out: req.out.display().to_string(),
    };
    let tmp = filled_temp_sibling(&req.out, |dir| {
        copy_model_files(&req.models[0], dir)?;
        let tensors = merged
            .iter()
            .map(|(name, t)| (saved_key(name), t.clone()))
            .collect();
        mmkd_nn::weights::save_safetensors(
            &tensors,
            &dir.join(mmkd_nn::weights::SAFETENSORS_SINGLE),
        )?;
        let path = dir.join(MERGE_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&record)?)
            .with_context(|| format!("writing {}", path.display()))
    })?;
    replace_dir(&tmp, &req.out)?;
    Ok(record)
}

/// The first model's config, tokenizer, image processor and training record: the merged
/// model is of its architecture and vocabulary.
fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    let extra = [
        "config.json",
        "preprocessor_config.json",
        "processor_config.json",
        TRAINING_FILE,
    ];
    for name in TOKENIZER_FILES.iter().copied().chain(extra) {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}
