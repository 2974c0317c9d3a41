//! `mmkd bench`: times one LLaVA-KD distillation step of a benchmark spec (random weights and
//! data) and prints samples/s, GFLOP/s, the phase split and peak memory.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::bench::{self, BenchOptions, BenchSpec};
use crate::runtime::DeviceSpec;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmark spec (JSON: vocab, batch, token counts, vision/student/teacher sizes).
    #[arg(long)]
    pub spec: PathBuf,
    /// Timed steps; the report gives their median.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Untimed steps run first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of the random weights and batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the square f32 matmul whose best GFLOP/s is reported as the machine's peak.
    #[arg(long, default_value_t = 1024)]
    pub matmul_peak: usize,
    /// Skip the matmul peak measurement.
    #[arg(long)]
    pub no_matmul_peak: bool,
    /// End with one JSON line holding every figure (`samples_per_s`, `split_s`, `gflops`, …);
    /// with --teacher-cache: `{"online": …, "cached": …, "cached_over_online": …}`.
    #[arg(long)]
    pub json: bool,
    /// Also time the step with the teacher read from an offline teacher cache (written first
    /// for the spec's random teacher and batch, not timed), and report both.
    #[arg(long)]
    pub teacher_cache: bool,
    /// Run the phases one after another instead of running the teacher's forward for the
    /// next step alongside the student's update.
    #[arg(long)]
    pub sequential: bool,
    /// Split the batch into this many row ranges whose student forward and backward run
    /// concurrently (gradients averaged: micro-batches side by side).
    #[arg(long, default_value_t = 1)]
    pub student_shards: usize,
    /// k of that cache (token ids kept per position).
    #[arg(long, default_value_t = 64, requires = "teacher_cache")]
    pub top_k: usize,
    /// Train the student's LLM through LoRA adapters of this rank on all its linear layers
    /// (alpha = 2·rank; the projector trains fully) instead of full DFT.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Where the models run: cpu, cuda or cuda:N (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Logit rows the loss computes at once from hidden states, as `train.loss_chunk_rows`
    /// (0: all at once; default: 1024 on CUDA, all at once on the CPU).
    #[arg(long)]
    pub loss_chunk_rows: Option<usize>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let spec = BenchSpec::from_file(&args.spec)?;
    let options = BenchOptions {
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
        matmul_peak_size: (!args.no_matmul_peak).then_some(args.matmul_peak),
        teacher_overlap: !args.sequential,
        student_shards: args.student_shards,
        lora_rank: args.lora_rank,
        device: args.device,
        loss_chunk_rows: args.loss_chunk_rows,
    };
    // Under mpirun every rank times its share of the step; rank 0 reports the job's.
    let leader = crate::runtime::world::world().is_leader();
    ensure!(
        !args.teacher_cache || crate::runtime::world::world().size() == 1,
        "--teacher-cache times one process; run it without mpirun"
    );
    let bar = match leader {
        true => ProgressBar::new((args.warmup + args.steps) as u64),
        false => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")?
            .progress_chars("=> "),
    );
    bar.set_prefix("bench");
    let report = bench::run(&spec, &options, |i, outcome| {
        let phase = if i < args.warmup { "warm-up" } else { "timed" };
        bar.set_message(format!(
            "({phase}) {:.3} s, loss {:.4}",
            outcome.wall, outcome.loss
        ));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    if !leader {
        return Ok(());
    }
    if !args.teacher_cache {
        println!("{}", report.to_text());
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        return Ok(());
    }
    let bar = ProgressBar::new((args.warmup + args.steps) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")?
            .progress_chars("=> "),
    );
    bar.set_prefix("bench (teacher cache)");
    let cached = bench::run_cached(&spec, &options, args.top_k, |i, outcome| {
        let phase = if i < args.warmup { "warm-up" } else { "timed" };
        bar.set_message(format!(
            "({phase}) {:.3} s, loss {:.4}",
            outcome.wall, outcome.loss
        ));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let ratio = cached.samples_per_s / report.samples_per_s;
    println!("online teacher\n{}\n", report.to_text());
    println!(
        "teacher cache (top-{})\n{}\n\ncached / online: {ratio:.2}× samples/s",
        args.top_k,
        cached.to_text()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"online": report, "cached": cached, "cached_over_online": ratio})
        );
    }
    Ok(())
}
