//! `mmkd moe-to-dense`: a Mixture-of-Experts LLaVA gathered into a dense one (knowledge
//! aggregation; see `experts::to_dense`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::experts::{describe, moe_to_dense, Aggregation, ToDenseRequest, UsageData};

#[derive(Debug, Args)]
pub struct MoeToDenseArgs {
    /// The Mixture-of-Experts checkpoint (Qwen2-MoE or Mixtral language model).
    #[arg(long)]
    pub teacher: String,
    /// LLaVA JSON/JSONL data the router usage is measured on.
    #[arg(long)]
    pub data: PathBuf,
    /// Image root of --data.
    #[arg(long)]
    pub images: PathBuf,
    /// usage-avg: the experts' weights averaged by measured router weight (the expert width);
    /// top-k: the k experts with the most router weight side by side (k × the expert width);
    /// svd: the principal neurons of all experts at --width.
    #[arg(long, value_enum)]
    pub method: Aggregation,
    /// The SVD's dense width for the routed experts (default: top-k × the expert width).
    #[arg(long)]
    pub width: Option<usize>,
    /// Conversation template of --data (default: the model's recorded one, else `plain`).
    #[arg(long)]
    pub template: Option<String>,
    /// Samples per forward while measuring.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Longest sample in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// The dense checkpoint's directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Print the record (with the router usage) as one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: MoeToDenseArgs) -> Result<()> {
    let record = moe_to_dense(&ToDenseRequest {
        teacher: args.teacher.clone(),
        data: UsageData {
            data: &args.data,
            images: &args.images,
            template: args.template.as_deref(),
            batch_size: args.batch_size,
            max_length: args.max_length,
        },
        method: args.method,
        width: args.width,
        out: args.out.clone(),
        force: args.force,
    })?;
    super::print_report(args.json, &record, || {
        format!("{}{}", record.usage.table(), describe(&record, &args.out))
    })
}
