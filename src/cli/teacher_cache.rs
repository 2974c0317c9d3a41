//! `mmkd teacher-cache`: write an offline teacher cache for `mmkd dpt|dft --teacher-cache`.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::Args;

use super::train::{data_and_images, resolve_settings, StageArgs};
use crate::config::Stage;
use crate::teacher::describe;
use crate::teacher::{build_cache, BuildRequest};

#[derive(Debug, Args)]
pub struct TeacherCacheArgs {
    /// Teacher checkpoint (directory or hub id).
    #[arg(long)]
    pub teacher: String,
    /// LLaVA JSON/JSONL data (default: the preset's data file of --stage).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image root (default: the preset's `data.images`).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// The cache directory to write (must not hold a finished cache).
    #[arg(long)]
    pub out: PathBuf,
    /// Preset name or TOML file: the stage's template, max_length, temperature and
    /// truncate_vocab come from it, as for `mmkd dpt|dft --config`.
    #[arg(long, default_value = "shapes-small")]
    pub config: String,
    /// The stage the cache is for.
    #[arg(long, value_enum, default_value = "dft")]
    pub stage: CacheStage,
    /// Token ids kept per position (the rest is one bucket).
    #[arg(long, default_value_t = 64)]
    pub top_k: usize,
    /// Override a preset value, as for the stages: `--set distill.temperature=2`; a key
    /// without a dot applies to the stage's train settings (`--set truncate_vocab=100`).
    /// Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Samples per teacher forward pass (default: the stage's train.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Samples per shard file.
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
    /// Where the teacher runs: cpu, cuda or cuda:N (default: the preset's `train.device`).
    #[arg(long)]
    pub device: Option<crate::runtime::DeviceSpec>,
    /// Print the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CacheStage {
    Dpt,
    Dft,
}

pub fn run(args: TeacherCacheArgs) -> Result<()> {
    let stage = match args.stage {
        CacheStage::Dpt => Stage::Dpt,
        CacheStage::Dft => Stage::Dft,
    };
    // The same preset resolution as `mmkd dpt|dft`, so the run checks against what is written.
    let stage_args = StageArgs::preset_only(&args.config, &args.set, &args.out, args.device);
    let settings = resolve_settings(&stage_args, stage)?;
    let (data, images) = data_and_images(args.data.as_ref(), args.images.as_ref(), &settings)?;
    let batch_size = args.batch_size.unwrap_or(settings.train.batch_size);
    ensure!(batch_size > 0, "--batch-size must be at least 1");
    let summary = build_cache(&BuildRequest {
        teacher: args.teacher.clone(),
        data,
        images,
        out: args.out.clone(),
        settings,
        top_k: args.top_k,
        batch_size,
        shard_size: args.shard_size,
        progress: !args.quiet,
    })?;
    if !crate::runtime::world::world().is_leader() {
        return Ok(());
    }
    super::print_report(args.json, &summary, || describe(&summary))
}
