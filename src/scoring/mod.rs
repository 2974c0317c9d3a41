//! Evaluation metrics that need no model, their file readers and report types.
//!
//! Entry points for the model-driven evaluation (`mmkd eval ...`), which produces predictions and
//! scores them here:
//! - VQA: [`vqa::evaluate_vqa`] / [`vqa::evaluate_vqa_with`] over [`vqa::VqaExample`]s
//!   (official `vqaEval.py` normalization by default, EvalAI's as an option);
//!   [`vqa::score_vqa_answer`] for one question;
//! - captions: [`caption::evaluate_captions`] over [`caption::CaptionExample`]s (pycocoevalcap's
//!   PTB tokenization, BLEU-1..4, ROUGE-L, CIDEr-D; METEOR/SPICE not computed);
//! - POPE: [`pope::evaluate_pope`] over [`pope::PopeExample`]s;
//! - multiple choice: [`choice::extract_choice`], [`choice::evaluate_choices`],
//!   [`choice::pick_by_likelihood`];
//! - files: [`readers`] (LLaVA JSONL, official VQAv2 and COCO formats, joined by id);
//! - reports: [`results::MetricsReport`] and markdown tables.

pub mod caption;
pub mod choice;
pub mod ids;
pub mod pope;
pub mod pytext;
pub mod readers;
pub mod results;
pub mod vqa;
