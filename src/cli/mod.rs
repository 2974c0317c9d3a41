//! The `mmkd` command line: one module per subcommand, this file only dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod metrics;

#[derive(Debug, Parser)]
#[command(name = "mmkd", version, about = "Distil multimodal LLMs (LLaVA-KD) from the command line")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score prediction files against references (VQA, captions, POPE); no model needed.
    Metrics(metrics::MetricsArgs),
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Metrics(args) => metrics::run(args),
    }
}
