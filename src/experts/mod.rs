//! Mixture-of-Experts models beyond their forward (issue 21): how a model's routers use the
//! experts on a data set (`mmkd inspect --router-stats`), and knowledge aggregation — the
//! experts of each sparse layer gathered into one dense feed-forward block, written as a dense
//! Qwen2/Llama checkpoint (`mmkd moe-to-dense`).

pub mod aggregate;
pub mod to_dense;
pub mod usage;

pub use aggregate::{Aggregation, DenseFfn};
pub use to_dense::{describe, moe_to_dense, DenseRecord, ToDenseRequest};
pub use usage::{measure_usage, LayerUsage, RouterUsage, UsageData};
