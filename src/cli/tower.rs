//! `mmkd tower`: pre-train a vision tower as a stage (see [`crate::tower`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::keys::{describe_sources, provenance};
use crate::config::settings::expand_override_into;
use crate::config::tower::{TowerObjective, TowerSettings};
use crate::config::{load_document, Role, Stage, StageSettings};
use crate::tower::{run_tower, TowerRun};

#[derive(Debug, Args)]
pub struct TowerArgs {
    /// What the tower learns from: `labels` (the shapes world's per-cell ground truth,
    /// `scenes.jsonl`) or `contrastive` (SigLIP's sigmoid loss against a small text encoder on
    /// the captions of LLaVA pre-training data: any image–text data). Default: the preset's
    /// `tower.objective`.
    #[arg(long, value_enum)]
    pub objective: Option<TowerObjective>,
    /// Preset name (shapes-tiny, shapes-small, llava-kd-qwen1.5-0.5b, llava-kd-qwen2.5-0.5b) or
    /// TOML file: its `[tower]` table and the tower architecture of `models.<role>`.
    #[arg(long, default_value = "shapes-small")]
    pub config: String,
    /// Override a preset value: `key.path=value`; a key without a dot applies to `[tower]`
    /// (`--set lr=3e-4` = `--set tower.lr=3e-4`, `--set text.embed_dim=128`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Whose tower architecture (`models.<role>.vision_config`) and image statistics to train.
    #[arg(long, value_enum, default_value = "teacher")]
    pub role: Role,
    /// Training data: `scenes.jsonl` of `mmkd data synth` (labels), or LLaVA JSON/JSONL whose
    /// first answer is the image's caption (contrastive; default: the preset's
    /// `data.pretrain_data`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image root the data's image paths are relative to (default: the preset's `data.images`).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Held-out data of the same kind, for the figures in summary.json: per-attribute patch
    /// accuracy (labels), or loss and image→text retrieval (contrastive).
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Tokenizer (tokenizer.json) of the contrastive objective's text encoder (default: the
    /// preset's `data.tokenizer`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output directory: the tower as a SigLIP/CLIP vision checkpoint (config.json,
    /// model.safetensors, preprocessor_config.json), metrics.jsonl, loss.png, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after N optimizer steps (`tower.max_steps`; default: `tower.epochs` over the data).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Write a resumable checkpoint to OUT/checkpoints every N steps (`tower.save_every`;
    /// default 0: none).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Train again into an --out that holds a finished tower or an earlier run's checkpoints,
    /// replacing them.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Seed of the data order (`tower.seed`; default 0). The tower's initial weights have their
    /// own seed, --init-seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seed of the fresh tower's weights (`models.<role>.seed`).
    #[arg(long)]
    pub init_seed: Option<u64>,
    /// Print the summary as one JSON line at the end.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `--set` as the `[tower]` table reads it: a key without a dot (or under `text.`) is a tower
/// setting.
fn expand(assignment: &str) -> String {
    if assignment.trim_start().starts_with("text.") {
        return format!("tower.{}", assignment.trim_start());
    }
    expand_override_into(assignment, "tower", &[])
}

/// The run the command asks for (the preset with its overrides, flags over both), and its
/// settings that are not defaults with where each came from, for the user.
pub fn tower_run(args: &TowerArgs) -> Result<(TowerRun, String)> {
    let mut doc = load_document(&args.config)?;
    let mut sets: Vec<String> = args.set.iter().map(|s| expand(s)).collect();
    if let Some(objective) = args.objective {
        sets.push(format!("tower.objective=\"{}\"", objective.name()));
    }
    if let Some(n) = args.max_steps {
        sets.push(format!("tower.max_steps={n}"));
    }
    if let Some(n) = args.save_every {
        sets.push(format!("tower.save_every={n}"));
    }
    if let Some(seed) = args.seed {
        sets.push(format!("tower.seed={seed}"));
    }
    if let Some(seed) = args.init_seed {
        sets.push(format!("models.{}.seed={seed}", args.role.name()));
    }
    for set in &sets {
        doc.set(set)?;
    }
    let settings = TowerSettings::resolve(&doc)?;
    let sources = provenance(&doc, Stage::Pretrain, args.role);
    let described = describe_sources(
        "tower",
        &serde_json::json!({ "tower": settings.as_json() }),
        sources.iter().filter(|(key, _)| key.starts_with("tower.")),
    );
    // The role's model (architecture, image statistics, feature layer, seed) and the preset's
    // data paths, as its pre-training stage resolves them.
    let stage = StageSettings::resolve(&doc, Stage::Pretrain, args.role)?;
    let data =
        match (&args.data, settings.objective) {
            (Some(data), _) => data.clone(),
            (None, TowerObjective::Contrastive) => stage.data.pretrain_data.clone().context(
                "no data for `tower`: pass --data FILE (LLaVA JSON/JSONL with captions)",
            )?,
            (None, TowerObjective::Labels) => anyhow::bail!(
                "no data for `tower --objective labels`: pass --data scenes.jsonl (written by \
             `mmkd data synth`)"
            ),
        };
    let images = args
        .images
        .clone()
        .or_else(|| stage.data.images.clone())
        .context("no image root: pass --images DIR")?;
    let run = TowerRun {
        settings,
        model: stage.model,
        data,
        images,
        val_data: args.val_data.clone(),
        tokenizer: args.tokenizer.clone().or(stage.data.tokenizer),
        out: args.out.clone(),
        resume: args.resume,
        force: args.force,
        progress: !args.quiet,
    };
    Ok((run, described))
}

pub fn run(args: TowerArgs) -> Result<()> {
    let (run, described) = tower_run(&args)?;
    if !args.quiet {
        eprint!("{described}");
    }
    let summary = run_tower(&run)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let figures: Vec<String> = summary
        .validation
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    let held_out = if figures.is_empty() {
        String::new()
    } else {
        format!("; val {}", figures.join(", "))
    };
    let skipped: usize = summary
        .data_skipped
        .iter()
        .filter(|(reason, _)| !reason.ends_with("(kept)"))
        .map(|(_, n)| n)
        .sum();
    let dropped = if skipped > 0 {
        format!(
            " ({skipped} of {} records left out: {:?})",
            summary.data_records, summary.data_skipped
        )
    } else {
        String::new()
    };
    println!(
        "tower ({}): {} steps, {} samples{dropped}, loss {:.4} → {:.4}{held_out}; features \
         rescaled by {:.3}; {:.1}s. Tower in {}: a fresh model takes it with --vision {} or \
         models.<role>.vision",
        summary.objective.name(),
        summary.steps,
        summary.samples_seen,
        summary.first_loss,
        summary.final_loss,
        summary.scale,
        summary.wall_seconds,
        args.out.display(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn a_key_without_a_dot_is_a_tower_setting() {
        assert_eq!(expand("lr=3e-4"), "tower.lr=3e-4");
        assert_eq!(expand("text.embed_dim=8"), "tower.text.embed_dim=8");
        assert_eq!(expand("models.teacher.seed=3"), "models.teacher.seed=3");
        assert_eq!(expand("tower.epochs=2"), "tower.epochs=2");
    }
}
