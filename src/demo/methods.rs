//! Methods beyond LLaVA-KD that the demo can add as rows next to it (`--methods`), each built
//! on the seed's own teacher and students and evaluated like them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{run_plan, say, stage_finished, StagePlan};
use crate::config::{Document, LoraSettings, Module, Role, Stage};

/// An opt-in row of the demo.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DemoMethod {
    /// The distilled student's DFT through LoRA adapters on every linear layer of its LLM
    /// (rank 16, alpha 32; lr ×10, LLaVA-1.5's LoRA recipe) instead of full weights.
    Lora,
    /// LM-Cocktail: the distilled student merged with the baseline, weights from each one's
    /// loss on 16 held-out instructions (τ = 5).
    Merge,
}

impl DemoMethod {
    /// Its row in the report (and its directory under each seed).
    pub fn row(self) -> &'static str {
        match self {
            DemoMethod::Lora => "distilled-lora",
            DemoMethod::Merge => "merged",
        }
    }

    /// One line for the report.
    pub fn describe(self) -> &'static str {
        match self {
            DemoMethod::Lora => {
                "`distilled-lora`: DPT → SFT as the distilled student, then its DFT through LoRA \
                 adapters (rank 16, alpha 32, every linear layer of the LLM; the projector trains \
                 fully; learning rate ×10 as in LLaVA-1.5's LoRA recipe) — the same steps."
            }
            DemoMethod::Merge => {
                "`merged`: LM-Cocktail — the distilled and the baseline student averaged, each \
                 weighted by softmax(−loss/5) of its loss on 16 held-out instructions; no training."
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

/// Builds the method's model for one seed (unless done earlier); returns its directory and
/// the seconds spent.
pub fn run_method(method: DemoMethod, run: &SeedRun<'_>) -> Result<(PathBuf, f64)> {
    let SeedRun {
        doc,
        seed_dir,
        data,
        template,
        dft_epochs,
        seed,
        progress,
    } = *run;
    let out = seed_dir.join(method.row());
    match method {
        DemoMethod::Lora => {
            let plan = StagePlan {
                stage: Stage::Dft,
                role: Role::Student,
                dir: method.row(),
                init: Some("distilled/sft"),
                teacher: Some("teacher/sft"),
                tower: None,
                epochs: dft_epochs,
                lora: Some(lora_settings()),
            };
            let seconds = run_plan(doc, seed_dir, data, &plan, seed, progress)?;
            Ok((out, seconds))
        }
        DemoMethod::Merge => {
            if stage_finished(&out) || out.join(crate::merge::MERGE_FILE).exists() {
                say(
                    progress,
                    &format!("{}: done earlier, skipped", method.row()),
                );
                return Ok((out, 0.0));
            }
            say(progress, &format!("{}: LM-Cocktail merge", method.row()));
            let started = Instant::now();
            let examples = seed_dir.join("merge-examples.json");
            let records: Vec<serde_json::Value> = serde_json::from_str(
                &std::fs::read_to_string(data.join("val/instruct.json"))
                    .context("reading the held-out instructions")?,
            )?;
            std::fs::write(
                &examples,
                serde_json::to_string(&records[..records.len().min(16)])?,
            )?;
            crate::merge::merge(&crate::merge::MergeRequest {
                models: vec![
                    seed_dir.join("distilled/dft"),
                    seed_dir.join("baseline/sft"),
                ],
                weights: crate::merge::MergeWeights::Auto {
                    examples,
                    images: data.to_path_buf(),
                    tau: crate::merge::cocktail::DEFAULT_TAU,
                    template: Some(template.to_string()),
                    batch_size: crate::merge::cocktail::DEFAULT_BATCH_SIZE,
                    max_length: 2048,
                },
                out: out.clone(),
                force: false,
            })?;
            Ok((out, started.elapsed().as_secs_f64()))
        }
    }
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
