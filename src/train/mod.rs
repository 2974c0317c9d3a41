//! Training machinery shared by every stage: the optimizer, gradient clipping and
//! accumulation, and learning-rate schedules.

pub mod grads;
pub mod optim;
pub mod schedule;

pub use grads::{clip_grad_norm, grad_global_norm, GradAccumulator};
pub use optim::{is_decay_exempt, AdamW, AdamWConfig, GroupSummary, ParamGroupConfig, StepStats};
pub use schedule::{Decay, LrSchedule, ScheduleConfig, Warmup};
