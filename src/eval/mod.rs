//! Evaluation metrics that need no model: VQA accuracy, COCO caption metrics, POPE,
//! multiple choice; readers for prediction and reference files; report types.
//!
//! The model-driven evaluation (`mmkd eval ...`) produces predictions and calls into these.

pub mod caption;
pub mod choice;
pub mod ids;
pub mod pope;
pub mod pytext;
pub mod readers;
pub mod results;
pub mod vqa;
