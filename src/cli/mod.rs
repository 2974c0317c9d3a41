//! The `mmkd` command line: one module per subcommand, this file only dispatches.

pub mod bench;
pub mod data;
pub mod generate;
pub mod inspect;
pub mod score;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mmkd",
    version,
    about = "Distil multimodal LLMs (LLaVA-KD) from the command line"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Architecture, parameters per module, dtype, image tokens per image.
    Inspect(inspect::InspectArgs),
    /// Log-probability of each answer token given image and prompt.
    Score(score::ScoreArgs),
    /// Generate an answer to a prompt about an image.
    Generate(generate::GenerateArgs),
    /// Data sets: synthetic data, tokenizer training, data checks.
    Data(data::DataArgs),
    /// Time one distillation step of a benchmark spec (samples/s, GFLOP/s, memory).
    Bench(bench::BenchArgs),
}

pub fn run() -> Result<()> {
    keep_element_wise_ops_on_the_calling_thread();
    let cli = Cli::parse();
    // The command runs on a rayon worker thread, so the parallel kernels and matmuls it starts
    // share the pool's threads directly instead of waking a sleeping pool from outside (two
    // futex round trips) for every op.
    rayon::scope(|_| match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Score(args) => score::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Data(args) => data::run(args),
        Command::Bench(args) => bench::run(args),
    })
}

/// candle runs element-wise ops on its own busy-waiting thread pool, next to the rayon pool
/// its matmuls use; on a machine with few cores the two pools fight for them (the DFT step ran
/// 2× slower on 2 cores, see docs/performance.md). Unless the user chose, element-wise work
/// stays on the calling thread. Must run before the first tensor op (the pool is built once).
fn keep_element_wise_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
