//! Training stages from the command line: a stage's models built or loaded, its teacher signal
//! and data set up, the learner's step run to the end with metrics, checkpoints and resume.

pub mod init;
pub mod progress;
pub mod run;
pub mod validate;

pub use run::{run_stage, stage_finished, StageRun, StageSummary, SUMMARY_FILE};
