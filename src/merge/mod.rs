//! `mmkd merge`: LM-Cocktail model merging (a weighted average of checkpoints of one
//! architecture, with weights given or derived from each model's loss on a few examples).

pub mod average;
pub mod cocktail;
pub mod job;

pub use average::{check_compatible, normalised, weighted_average, MergeInput};
pub use cocktail::{cocktail_weights, example_loss, ExampleLoss, Examples};
pub use job::{fold_adapter, merge, MergeRecord, MergeRequest, MergeWeights, MERGE_FILE};
