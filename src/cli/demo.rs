//! `mmkd demo`: distil a student on built-in synthetic data and show whether KD helps.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::demo::{run_demo, DemoOptions};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Demo preset (its [demo] table sets data sizes and epochs).
    #[arg(long, default_value = "shapes-small")]
    pub preset: String,
    /// Output directory; re-running with the same one skips finished stages.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Train and evaluate with this many seeds; the report gives mean ± std.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// The first seed: `--first-seed 3 --seeds 2` runs seeds 3 and 4 (e.g. to spread a study
    /// over machines, each with its own `--out`).
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Override preset values (`key.path=value`), e.g. `demo.train=500`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Methods added as rows next to LLaVA-KD, each built on the seed's own teacher and
    /// students: `lora` (DFT through LoRA adapters), `merge` (LM-Cocktail merge of the
    /// distilled and baseline students). Comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<crate::demo::methods::DemoMethod>,
    /// Self-improvement rounds: the baseline student writes data about the training images
    /// (recipe shapes-vqa, its confident in-set answers kept) and is fine-tuned on the union
    /// with the ground truth, N times (at most 5); rows `self-1..N` and the control `sft-more`.
    #[arg(long, default_value_t = 0)]
    pub self_improve: usize,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let report = run_demo(&DemoOptions {
        methods: args.methods,
        self_improve: args.self_improve,
        preset: args.preset,
        out: args.out.clone(),
        seeds: args.seeds,
        first_seed: args.first_seed,
        overrides: args.set,
        progress: !args.quiet,
    })?;
    let text = std::fs::read_to_string(&report)?;
    // The headline table: everything up to the verdict.
    for line in text
        .lines()
        .take_while(|l| !l.starts_with("| VQA category"))
    {
        println!("{line}");
    }
    println!("full report: {} (and report.json)", report.display());
    Ok(())
}
