//! `mmkd data select`: keep the samples a teacher and/or a student rank highest (task-driven
//! data selection; see `selection`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::selection::{select, Budget, Criterion, SelectRequest};

#[derive(Debug, Args)]
pub struct SelectArgs {
    /// The teacher (read by `divergence` and `teacher-confidence`).
    #[arg(long)]
    pub teacher: Option<String>,
    /// The student (read by `divergence` and `student-loss`).
    #[arg(long)]
    pub student: Option<String>,
    /// LLaVA JSON/JSONL data to select from.
    #[arg(long)]
    pub data: PathBuf,
    /// Image root of --data.
    #[arg(long)]
    pub images: PathBuf,
    /// divergence: KL(teacher ‖ student) at the answer tokens; teacher-confidence: the
    /// teacher's mean log-probability of the answer; student-loss: the student's cross-entropy;
    /// random: a seeded random subset of the samples the student can train on (the baseline).
    #[arg(long, value_enum, default_value = "divergence")]
    pub criterion: Criterion,
    /// Samples kept: a count (`500`) or a share of the scored ones (`25%`).
    #[arg(long)]
    pub budget: Budget,
    /// Conversation template (default: the scoring model's recorded one, else `plain`).
    #[arg(long)]
    pub template: Option<String>,
    /// Seed of `--criterion random`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per forward.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Longest sample in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// The selected records (a LLaVA JSON list, in file order); the scores go to
    /// OUT.selection.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as one JSON line (without the per-sample scores).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: SelectArgs) -> Result<()> {
    let selection = select(&SelectRequest {
        teacher: args.teacher,
        student: args.student,
        data: args.data,
        images: args.images,
        criterion: args.criterion,
        budget: args.budget,
        template: args.template,
        batch_size: args.batch_size,
        max_length: args.max_length,
        seed: args.seed,
        out: args.out.clone(),
        force: args.force,
        progress: !args.quiet,
    })?;
    if args.json {
        let mut summary = serde_json::to_value(&selection)?;
        if let Some(obj) = summary.as_object_mut() {
            obj.remove("samples");
        }
        println!("{summary}");
    } else {
        let skipped: usize = selection.skipped.values().sum();
        println!(
            "data select ({}): kept {} of {} scored samples ({} of {} records not scored), \
             scores ≥ {:.4}; written to {} (scores: {})",
            selection.criterion.name(),
            selection.selected,
            selection.scored,
            skipped,
            selection.records,
            selection.threshold,
            args.out.display(),
            crate::selection::record_path(&args.out).display()
        );
    }
    Ok(())
}
