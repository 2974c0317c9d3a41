//! `mmkd merge`: LM-Cocktail merging of checkpoints of one architecture, or a LoRA adapter
//! folded into its base.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use clap::Args;

use crate::merge::cocktail::{DEFAULT_BATCH_SIZE, DEFAULT_TAU};
use crate::merge::{fold_adapter, merge, MergeRequest, MergeWeights};

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

pub fn run(args: MergeArgs) -> Result<()> {
    if let Some(adapter) = &args.lora {
        let origin = fold_adapter(adapter, &args.out, args.force)?;
        println!("folded {origin} into {}", args.out.display());
        return Ok(());
    }
    let weights = if args.auto_weights {
        let examples = args.examples.clone().expect("clap requires --examples");
        let images = match &args.images {
            Some(dir) => dir.clone(),
            None => examples.parent().unwrap_or(Path::new(".")).to_path_buf(),
        };
        MergeWeights::Auto {
            examples,
            images,
            tau: args.tau,
            template: args.template.clone(),
            batch_size: args.batch_size,
            max_length: args.max_length,
        }
    } else {
        ensure!(
            !args.weights.is_empty(),
            "give --weights (one per model) or --auto-weights --examples FILE"
        );
        MergeWeights::Given(args.weights.clone())
    };
    let record = merge(&MergeRequest {
        models: args.models.clone(),
        weights,
        out: args.out.clone(),
        force: args.force,
    })?;
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
