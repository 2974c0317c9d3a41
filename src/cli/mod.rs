//! The `mmkd` command line: one module per subcommand, this file only dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod data;

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
    /// Data sets: synthetic data, tokenizer training, data checks.
    Data(data::DataArgs),
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Data(args) => data::run(args),
    }
}
