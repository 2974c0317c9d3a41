//! POPE (object hallucination) scoring, as the official POPE `evaluate.py` (and LLaVA's
//! `eval_pope.py`, which copies it) does it.
//!
//! Answer → label: keep the text before the first '.', delete commas, split on single spaces;
//! the answer is "no" if one of the words is exactly `no`, `No` or `not`, otherwise "yes".
//! This is case-sensitive and punctuation-naive on purpose ("NO" or "no!" count as yes), as in
//! the reference. Positive class = yes. Metrics are reported in percent (0–100); a ratio whose
//! denominator is zero (e.g. precision with no "yes" predictions) is reported as 0.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

/// A yes/no label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum YesNo {
    Yes,
    No,
}

impl YesNo {
    /// Parse a ground-truth label; only "yes"/"no" (any case, surrounding spaces ignored).
    pub fn parse_label(label: &str) -> Option<YesNo> {
        match label.trim().to_ascii_lowercase().as_str() {
            "yes" => Some(YesNo::Yes),
            "no" => Some(YesNo::No),
            _ => None,
        }
    }
}

/// The official rule turning a generated answer into yes/no.
pub fn pope_answer_to_label(answer: &str) -> YesNo {
    let first_sentence = answer.split('.').next().unwrap_or("");
    let text = first_sentence.replace(',', "");
    if text
        .split(' ')
        .any(|w| w == "No" || w == "not" || w == "no")
    {
        YesNo::No
    } else {
        YesNo::Yes
    }
}

/// Confusion counts (positive = yes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PopeCounts {
    pub true_pos: usize,
    pub false_pos: usize,
    pub true_neg: usize,
    pub false_neg: usize,
}

impl PopeCounts {
    pub fn add(&mut self, predicted: YesNo, label: YesNo) {
        match (predicted, label) {
            (YesNo::Yes, YesNo::Yes) => self.true_pos += 1,
            (YesNo::Yes, YesNo::No) => self.false_pos += 1,
            (YesNo::No, YesNo::No) => self.true_neg += 1,
            (YesNo::No, YesNo::Yes) => self.false_neg += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.true_pos + self.false_pos + self.true_neg + self.false_neg
    }

    pub fn metrics(&self) -> PopeMetrics {
        let pct = |num: usize, den: usize| {
            if den == 0 {
                0.0
            } else {
                100.0 * num as f64 / den as f64
            }
        };
        let precision = pct(self.true_pos, self.true_pos + self.false_pos);
        let recall = pct(self.true_pos, self.true_pos + self.false_neg);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        PopeMetrics {
            accuracy: pct(self.true_pos + self.true_neg, self.total()),
            precision,
            recall,
            f1,
            yes_ratio: pct(self.true_pos + self.false_pos, self.total()),
            count: self.total(),
            counts: *self,
        }
    }
}

/// POPE metrics in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PopeMetrics {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Share of "yes" predictions.
    pub yes_ratio: f64,
    pub count: usize,
    pub counts: PopeCounts,
}

/// One POPE question: the model's answer, the label and the split (random/popular/adversarial).
#[derive(Debug, Clone, PartialEq)]
pub struct PopeExample {
    pub answer: String,
    pub label: YesNo,
    pub split: Option<String>,
}

/// Overall and per-split metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PopeSummary {
    pub overall: PopeMetrics,
    pub per_split: BTreeMap<String, PopeMetrics>,
}

pub fn evaluate_pope(examples: &[PopeExample]) -> Result<PopeSummary> {
    if examples.is_empty() {
        bail!("no POPE questions to score");
    }
    let mut overall = PopeCounts::default();
    let mut splits: BTreeMap<String, PopeCounts> = BTreeMap::new();
    for ex in examples {
        let predicted = pope_answer_to_label(&ex.answer);
        overall.add(predicted, ex.label);
        if let Some(split) = &ex.split {
            splits
                .entry(split.clone())
                .or_default()
                .add(predicted, ex.label);
        }
    }
    Ok(PopeSummary {
        overall: overall.metrics(),
        per_split: splits.into_iter().map(|(k, c)| (k, c.metrics())).collect(),
    })
}
