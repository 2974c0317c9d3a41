//! `mmkd metrics`: score prediction files against references (no model involved).
//!
//! Without `--json` a markdown table is printed; with `--json` the output is one JSON object on
//! one line (the last line printed):
//! - vqa: `{"accuracy", "processor", "per_answer_type": {type: {"accuracy", "count"}}, "per_category": {..},
//!   "count", "exact_match_count"}` — accuracies in 0–100;
//! - caption: `{"bleu_1".."bleu_4", "rouge_l", "cider", "meteor": null, "meteor_note", "count"}`
//!   on pycocoevalcap's scale (BLEU, ROUGE-L in 0–1; CIDEr-D as pycocoevalcap returns it);
//! - pope: `{"accuracy", "precision", "recall", "f1", "yes_ratio", "count", "per_split": {..}}`
//!   in 0–100.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::scoring::caption::{evaluate_captions, CaptionScores, METEOR_NOTE};
use crate::scoring::pope::{evaluate_pope, PopeMetrics};
use crate::scoring::readers::{load_caption_examples, load_pope_examples, load_vqa_examples};
use crate::scoring::results::MetricsReport;
use crate::scoring::vqa::{evaluate_vqa_with, GroupAccuracy, VqaProcessor};

/// The VQA answer processor, as a command-line value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProcessorArg {
    /// The official vqaEval.py (default).
    Official,
    /// EvalAI's processor as in LLaVA's m4c_evaluator (TextVQA).
    Evalai,
}

impl From<ProcessorArg> for VqaProcessor {
    fn from(p: ProcessorArg) -> Self {
        match p {
            ProcessorArg::Official => VqaProcessor::Official,
            ProcessorArg::Evalai => VqaProcessor::EvalAi,
        }
    }
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    #[command(subcommand)]
    pub task: MetricsTask,
}

#[derive(Debug, Subcommand)]
pub enum MetricsTask {
    /// VQA accuracy (official vqaEval.py normalization; 10-answer soft accuracy).
    Vqa {
        /// Predictions: LLaVA answers JSONL or an official results JSON array.
        #[arg(long)]
        pred: PathBuf,
        /// References: answers JSONL or the official VQAv2 annotation JSON.
        #[arg(long)]
        answers: PathBuf,
        /// Answer normalization.
        #[arg(long, value_enum, default_value = "official")]
        processor: ProcessorArg,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) with pycocoevalcap's tokenization.
    Caption {
        /// Predictions: LLaVA JSONL (`question_id`, `text`) or COCO results `[{image_id, caption}]`.
        #[arg(long)]
        pred: PathBuf,
        /// References: JSONL (`question_id`, `answers`) or a COCO caption annotation JSON.
        #[arg(long)]
        refs: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// POPE hallucination metrics (accuracy, precision, recall, F1, yes-ratio) per split.
    Pope {
        /// Predictions: LLaVA answers JSONL (`question_id`, `text`).
        #[arg(long)]
        pred: PathBuf,
        /// Labels JSONL: `question_id`, `label` ("yes"/"no") or `answers`, optional `category`.
        #[arg(long)]
        answers: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct VqaJson<'a> {
    accuracy: f64,
    processor: VqaProcessor,
    per_answer_type: &'a BTreeMap<String, GroupAccuracy>,
    per_category: &'a BTreeMap<String, GroupAccuracy>,
    count: usize,
    exact_match_count: usize,
}

#[derive(Serialize)]
struct CaptionJson {
    bleu_1: f64,
    bleu_2: f64,
    bleu_3: f64,
    bleu_4: f64,
    rouge_l: f64,
    cider: f64,
    meteor: Option<f64>,
    meteor_note: &'static str,
    count: usize,
}

impl From<&CaptionScores> for CaptionJson {
    fn from(s: &CaptionScores) -> Self {
        CaptionJson {
            bleu_1: s.bleu[0],
            bleu_2: s.bleu[1],
            bleu_3: s.bleu[2],
            bleu_4: s.bleu[3],
            rouge_l: s.rouge_l,
            cider: s.cider,
            meteor: None,
            meteor_note: METEOR_NOTE,
            count: s.count,
        }
    }
}

#[derive(Serialize)]
struct PopeJson<'a> {
    #[serde(flatten)]
    overall: &'a PopeMetrics,
    per_split: &'a BTreeMap<String, PopeMetrics>,
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string(value).context("cannot serialize the metrics")?
    );
    Ok(())
}

pub fn run(args: MetricsArgs) -> Result<()> {
    match args.task {
        MetricsTask::Vqa {
            pred,
            answers,
            processor,
            json,
        } => {
            let examples = load_vqa_examples(&pred, &answers)?;
            let summary = evaluate_vqa_with(&examples, processor.into())?;
            if json {
                print_json(&VqaJson {
                    accuracy: summary.accuracy,
                    processor: summary.processor,
                    per_answer_type: &summary.per_answer_type,
                    per_category: &summary.per_category,
                    count: summary.count,
                    exact_match_count: summary.exact_match_count,
                })
            } else {
                print!("{}", MetricsReport::from_vqa(&summary).to_markdown());
                Ok(())
            }
        }
        MetricsTask::Caption { pred, refs, json } => {
            let examples = load_caption_examples(&pred, &refs)?;
            let scores = evaluate_captions(&examples)?;
            if json {
                print_json(&CaptionJson::from(&scores))
            } else {
                print!("{}", MetricsReport::from_captions(&scores).to_markdown());
                Ok(())
            }
        }
        MetricsTask::Pope {
            pred,
            answers,
            json,
        } => {
            let examples = load_pope_examples(&pred, &answers)?;
            let summary = evaluate_pope(&examples)?;
            if json {
                print_json(&PopeJson {
                    overall: &summary.overall,
                    per_split: &summary.per_split,
                })
            } else {
                print!("{}", MetricsReport::from_pope(&summary).to_markdown());
                Ok(())
            }
        }
    }
}
