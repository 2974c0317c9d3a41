//! The learner: one training step for every stage, the bench and the demo's tower stage
//! ([`step`]), the micro-batch forward and objective it runs ([`forward`]), AdamW, gradient
//! clipping and accumulation, learning-rate schedules, per-step metrics and resumable
//! checkpoint state. It reads no preset: `crate::stages` turns settings into its inputs.

pub mod forward;
pub mod grads;
pub mod guard;
pub mod interrupt;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod step;

pub use grads::{clip_grad_norm, grad_global_norm, GradAccumulator};
pub use optim::{is_decay_exempt, AdamW, AdamWConfig, GroupSummary, ParamGroupConfig, StepStats};
pub use schedule::{Decay, LrSchedule, ScheduleConfig, Warmup};
pub use step::{MicroBatch, MicroBatchSource, MicroLoss, StepReport, StepTimes, TrainStep};
