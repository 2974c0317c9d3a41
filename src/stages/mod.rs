//! Training stages from the command line: a stage's models built or loaded, its teacher signal
//! and data set up, the learner's step run to the end with metrics, checkpoints and resume.

mod batches;
pub mod init;
pub mod lora;
pub mod memory;
pub mod output;
pub mod progress;
mod rewards;
pub mod rollout;
pub mod run;
mod setup;
mod shard;
pub mod validate;

pub use run::{run_stage, StageSummary};

use std::path::{Path, PathBuf};

use crate::config::StageSettings;

/// Written last: its presence marks a finished stage.
pub const SUMMARY_FILE: &str = "summary.json";

/// Whether `out` holds a finished stage (its summary is written last).
pub fn stage_finished(out: &Path) -> bool {
    out.join(SUMMARY_FILE).exists()
}

/// One stage run as the CLI (or the demo) asks for it.
#[derive(Clone, Debug)]
pub struct StageRun {
    pub settings: StageSettings,
    /// Previous stage's checkpoint (required for SFT and DFT).
    pub init: Option<String>,
    /// Teacher checkpoint (objectives that read a teacher).
    pub teacher: Option<String>,
    /// Offline teacher cache (written by `mmkd teacher-cache`) instead of `teacher`.
    pub teacher_cache: Option<PathBuf>,
    pub data: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    /// Tokenizer for freshly built models.
    pub tokenizer: Option<PathBuf>,
    pub resume: bool,
    /// Train into an `out` that holds a finished stage or an earlier run's checkpoints,
    /// replacing them (without it such an `out` is refused).
    pub force: bool,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
}

impl StageRun {
    pub fn output(&self) -> output::OutputDir<'_> {
        output::OutputDir {
            path: &self.out,
            resume: self.resume,
            force: self.force,
        }
    }
}
