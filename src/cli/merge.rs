//! `mmkd merge`: LM-Cocktail merging of checkpoints of one architecture.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::checkpoint::layout::saved_key;
use crate::checkpoint::lock::OutputLock;
use crate::checkpoint::training::TRAINING_FILE;
use crate::checkpoint::{filled_temp_sibling, replace_dir, TOKENIZER_FILES};
use crate::merge::cocktail::{DEFAULT_BATCH_SIZE, DEFAULT_TAU};
use crate::merge::{
    check_compatible, cocktail_weights, example_loss, normalised, weighted_average, ExampleLoss,
    Examples, MergeInput,
};

/// What `merge.json` records next to the merged model.
pub const MERGE_FILE: &str = "merge.json";

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Checkpoint directories of one architecture and vocabulary (two or more).
    #[arg(long, num_args = 2.., required_unless_present = "lora", conflicts_with = "lora")]
    pub models: Vec<PathBuf>,
    /// Fold a LoRA adapter directory into its base instead (W + s·B·A): a full checkpoint.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// One weight per model (normalised to sum to 1): θ = Σ wᵢ·θᵢ.
    #[arg(long, num_args = 1.., conflicts_with = "auto_weights", allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// LM-Cocktail's weights: wᵢ = softmax(−lossᵢ / τ) from each model's loss on --examples.
    #[arg(long, requires = "examples")]
    pub auto_weights: bool,
    /// A few examples of the target task (LLaVA JSON/JSONL) for --auto-weights.
    #[arg(long)]
    pub examples: Option<PathBuf>,
    /// Image root of the examples (default: the examples' directory).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// τ of --auto-weights (LM-Cocktail's default).
    #[arg(long, default_value_t = DEFAULT_TAU)]
    pub tau: f64,
    /// Conversation template of the examples (default: each model's recorded one, else `plain`).
    #[arg(long)]
    pub template: Option<String>,
    /// Examples per batch of the loss (LM-Cocktail's default).
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Longest example in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// The merged checkpoint's directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Print the record as one JSON line.
    #[arg(long)]
    pub json: bool,
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

pub fn run(args: MergeArgs) -> Result<()> {
    if let Some(adapter) = &args.lora {
        let origin = fold_adapter(adapter, &args.out, args.force)?;
        println!("folded {origin} into {}", args.out.display());
        return Ok(());
    }
    let record = merge(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&record)?);
    } else {
        println!("merged {} models into {}", record.models.len(), record.out);
        for (i, (model, w)) in record.models.iter().zip(&record.weights).enumerate() {
            let loss = record
                .losses
                .get(i)
                .map(|l| format!("  example loss {:.4}", l.loss))
                .unwrap_or_default();
            println!("  {w:.4}  {model}{loss}");
        }
        if let Some(tau) = record.tau {
            println!("  (LM-Cocktail weights, τ = {tau})");
        }
    }
    Ok(())
}

/// Writes the adapter folded into its base as a full checkpoint; returns what was folded.
fn fold_adapter(adapter: &Path, out: &Path, force: bool) -> Result<String> {
    ensure!(
        crate::checkpoint::adapter::is_adapter(adapter),
        "{} is not a LoRA adapter directory (no adapter_config.json, or it has a config.json)",
        adapter.display()
    );
    if out.exists() && !force {
        bail!(
            "{} already exists: choose another --out or pass --force to replace it",
            out.display()
        );
    }
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

fn merge(args: &MergeArgs) -> Result<MergeRecord> {
    ensure!(
        args.auto_weights || !args.weights.is_empty(),
        "give --weights (one per model) or --auto-weights --examples FILE"
    );
    if !args.auto_weights {
        ensure!(
            args.weights.len() == args.models.len(),
            "{} models but {} weights",
            args.models.len(),
            args.weights.len()
        );
    }
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists: choose another --out or pass --force to replace it",
            args.out.display()
        );
    }
    let _lock = OutputLock::acquire_beside(&args.out)?;
    let models = args
        .models
        .iter()
        .map(|dir| MergeInput::read(dir))
        .collect::<Result<Vec<_>>>()?;
    check_compatible(&models)?;

    let (weights, losses) = if args.auto_weights {
        let data = args.examples.as_deref().expect("clap requires --examples");
        let images = match &args.images {
            Some(dir) => dir.clone(),
            None => data.parent().unwrap_or(Path::new(".")).to_path_buf(),
        };
        let examples = Examples {
            data,
            images: &images,
            template: args.template.as_deref(),
            batch_size: args.batch_size,
            max_length: args.max_length,
        };
        let losses = args
            .models
            .iter()
            .map(|m| example_loss(m, &examples))
            .collect::<Result<Vec<_>>>()?;
        let values: Vec<f64> = losses.iter().map(|l| l.loss).collect();
        (cocktail_weights(&values, args.tau)?, losses)
    } else {
        (normalised(&args.weights)?, Vec::new())
    };
    let merged = weighted_average(&models, &weights)?;

    let record = MergeRecord {
        models: args
            .models
            .iter()
            .map(|m| m.display().to_string())
            .collect(),
        weights,
        rule: if args.auto_weights { "auto" } else { "given" },
        tau: args.auto_weights.then_some(args.tau),
        examples: args
            .examples
            .as_ref()
            .filter(|_| args.auto_weights)
            .map(|e| e.display().to_string()),
        losses,
        out: args.out.display().to_string(),
    };
    let tmp = filled_temp_sibling(&args.out, |dir| {
        copy_model_files(&args.models[0], dir)?;
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
    replace_dir(&tmp, &args.out)?;
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
