//! Training: the optimizer, gradient clipping and accumulation, learning-rate schedules, model
//! initialisation per stage, metrics, resumable checkpoints and the stage loop.

pub mod grads;
pub mod init;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod trainer;

pub use grads::{clip_grad_norm, grad_global_norm, GradAccumulator};
pub use optim::{is_decay_exempt, AdamW, AdamWConfig, GroupSummary, ParamGroupConfig, StepStats};
pub use schedule::{Decay, LrSchedule, ScheduleConfig, Warmup};
pub use trainer::{run_stage, stage_finished, StageRun, StageSummary};
