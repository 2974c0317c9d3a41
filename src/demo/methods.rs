//! Methods beyond LLaVA-KD that the demo can add as rows next to it (`--methods`), each built
//! on the seed's own teacher and students and evaluated like them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{run_plan, say, StagePlan};
use crate::config::{Document, LoraSettings, Module, Role, Stage};

/// An opt-in row of the demo.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DemoMethod {
    /// The distilled student's DFT through LoRA adapters on every linear layer of its LLM
    /// (rank 16, alpha 32, the full DFT's learning rate) instead of full weights.
    Lora,
    /// LM-Cocktail, twice: the distilled student merged with the baseline (`merged`), and with
    /// its own SFT checkpoint, the model its DFT fine-tuned (`merged-sft`); weights from each
    /// one's loss on 16 held-out instructions (τ = 5).
    Merge,
}

impl DemoMethod {
    /// Its rows in the report (and their directories under each seed).
    pub fn rows(self) -> &'static [&'static str] {
        match self {
            DemoMethod::Lora => &["distilled-lora"],
            DemoMethod::Merge => &["merged", "merged-sft"],
        }
    }

    /// One line for the report.
    pub fn describe(self) -> &'static str {
        match self {
            DemoMethod::Lora => {
                "`distilled-lora`: DPT → SFT as the distilled student, then its DFT through LoRA \
                 adapters (rank 16, alpha 32, every linear layer of the LLM) — the same steps \
                 and learning rate; the projector trains fully. (LLaVA-1.5's 10× learning rate \
                 for adapters diverged here: these models already train at 3e-3.)"
            }
            DemoMethod::Merge => {
                "`merged`, `merged-sft`: LM-Cocktail — the distilled student averaged with the \
                 baseline student, or with its own SFT checkpoint (the model its DFT fine-tuned), \
                 each weighted by softmax(−loss/5) of its loss on 16 held-out instructions; no \
                 training."
            }
        }
    }
}

/// The DFT stage of the LoRA row.
pub fn lora_settings() -> LoraSettings {
    LoraSettings {
        rank: 16,
        alpha: 32.0,
        targets: vec![mmkd_nn::lora::ALL_LINEAR.into()],
        modules: vec![Module::Llm],
        rslora: false,
        dropout: 0.0,
    }
}

/// One seed of the demo, as a method building on it sees it.
pub struct SeedRun<'a> {
    pub doc: &'a Document,
    pub seed_dir: &'a Path,
    pub data: &'a Path,
    pub template: &'a str,
    pub dft_epochs: usize,
    pub seed: u64,
    pub progress: bool,
}

/// Builds the method's models for one seed (unless done earlier); returns each row's name,
/// directory and the seconds spent.
pub fn run_method(method: DemoMethod, run: &SeedRun<'_>) -> Result<Vec<(String, PathBuf, f64)>> {
    let seed_dir = run.seed_dir;
    match method {
        DemoMethod::Lora => {
            let row = method.rows()[0];
            let plan = StagePlan {
                stage: Stage::Dft,
                role: Role::Student,
                dir: row,
                init: Some("distilled/sft"),
                teacher: Some("teacher/sft"),
                tower: None,
                epochs: run.dft_epochs,
                lora: Some(lora_settings()),
            };
            let seconds = run_plan(run.doc, seed_dir, run.data, &plan, run.seed, run.progress)?;
            Ok(vec![(row.to_string(), seed_dir.join(row), seconds)])
        }
        DemoMethod::Merge => {
            let with_baseline = cocktail(run, "merged", "baseline/sft")?;
            let with_sft = cocktail(run, "merged-sft", "distilled/sft")?;
            Ok(vec![with_baseline, with_sft])
        }
    }
}

/// LM-Cocktail of the distilled student and `other` into `row`, with weights from 16
/// held-out instructions.
fn cocktail(run: &SeedRun<'_>, row: &str, other: &str) -> Result<(String, PathBuf, f64)> {
    let out = run.seed_dir.join(row);
    if out.join(crate::merge::MERGE_FILE).exists() {
        say(run.progress, &format!("{row}: done earlier, skipped"));
        return Ok((row.to_string(), out, 0.0));
    }
    say(
        run.progress,
        &format!("{row}: LM-Cocktail merge of distilled/dft and {other}"),
    );
    let started = Instant::now();
    let examples = run.seed_dir.join("merge-examples.json");
    let records: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(run.data.join("val/instruct.json"))
            .context("reading the held-out instructions")?,
    )?;
    std::fs::write(
        &examples,
        serde_json::to_string(&records[..records.len().min(16)])?,
    )?;
    crate::merge::merge(&crate::merge::MergeRequest {
        models: vec![run.seed_dir.join("distilled/dft"), run.seed_dir.join(other)],
        weights: crate::merge::MergeWeights::Auto {
            examples,
            images: run.data.to_path_buf(),
            tau: crate::merge::cocktail::DEFAULT_TAU,
            template: Some(run.template.to_string()),
            batch_size: crate::merge::cocktail::DEFAULT_BATCH_SIZE,
            max_length: 2048,
        },
        out: out.clone(),
        force: false,
    })?;
    Ok((row.to_string(), out, started.elapsed().as_secs_f64()))
}

/// Parameters of the model in `dir` as deployed (an adapter folded into its base has its
/// base's count).
pub fn parameter_count(dir: &Path) -> Result<usize> {
    let weights_dir = if crate::checkpoint::adapter::is_adapter(dir) {
        let base = crate::checkpoint::adapter::read_adapter(dir)?.base;
        PathBuf::from(base)
    } else {
        dir.to_path_buf()
    };
    let weights = crate::checkpoint::read_weights(&weights_dir, &candle_core::Device::Cpu)?;
    Ok(weights
        .names()
        .filter_map(|n| weights.get(n))
        .map(|t| t.elem_count())
        .sum())
}
