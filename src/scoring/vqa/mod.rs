//! VQA accuracy (VQAv2 / VizWiz / TextVQA style) with the official normalization.
//!
//! A question with n ≥ 2 human answers scores, as in `vqaEval.py`,
//! `acc = (1/n) Σ_i min(1, #{j ≠ i : gt_j = pred} / 3)` — the average over the n leave-one-out
//! subsets, which for n = 10 gives 0, .3, .6, .9, 1 for 0, 1, 2, 3, ≥4 matching humans.
//! With a single reference answer that formula is always 0, so such questions are scored by
//! **exact match** instead, after applying the full prediction normalization to both the
//! prediction and the reference (GQA-style single-answer sets); the summary counts them.
//!
//! The answer processor is the official `vqaEval.py` one unless [`VqaProcessor::EvalAi`] is
//! chosen (see [`normalize`] for the differences).

pub mod normalize;

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::ids::SampleId;
pub use normalize::VqaProcessor;
use normalize::{evalai_normalize, normalize_prediction, process_ground_truths};

/// How one question was scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VqaScoring {
    /// The official average over leave-one-out subsets (two or more reference answers).
    LeaveOneOut,
    /// Exact match after normalizing both sides (exactly one reference answer).
    ExactMatch,
    /// Exact match against any of the listed equivalent forms (after normalizing).
    AnyAccepted,
}

/// The score of one question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VqaQuestionScore {
    /// In [0, 1].
    pub accuracy: f64,
    pub scoring: VqaScoring,
    /// The prediction after normalization (what was compared).
    pub normalized_prediction: String,
    /// How many reference answers (after their processing) equal the normalized prediction.
    pub matching_answers: usize,
}

/// Score one prediction against its reference answers with the official processor.
pub fn score_vqa_answer(prediction: &str, answers: &[String]) -> Result<VqaQuestionScore> {
    score_vqa_answer_with(prediction, answers, VqaProcessor::Official)
}

/// The normalization a processor applies to predictions.
fn prediction_normalizer(processor: VqaProcessor) -> fn(&str) -> String {
    match processor {
        VqaProcessor::Official => normalize_prediction,
        VqaProcessor::EvalAi => evalai_normalize,
    }
}

/// Score one prediction against its reference answers with the chosen processor.
pub fn score_vqa_answer_with(
    prediction: &str,
    answers: &[String],
    processor: VqaProcessor,
) -> Result<VqaQuestionScore> {
    let full = prediction_normalizer(processor);
    let normalized = full(prediction);
    match answers.len() {
        0 => bail!("no reference answers"),
        1 => {
            let hit = full(&answers[0]) == normalized;
            Ok(VqaQuestionScore {
                accuracy: if hit { 1.0 } else { 0.0 },
                scoring: VqaScoring::ExactMatch,
                normalized_prediction: normalized,
                matching_answers: usize::from(hit),
            })
        }
        n => {
            let gts = match processor {
                VqaProcessor::Official => process_ground_truths(answers),
                VqaProcessor::EvalAi => answers.iter().map(|a| evalai_normalize(a)).collect(),
            };
            let matching = gts.iter().filter(|g| **g == normalized).count();
            // Leave answer i out: the others match `matching` times, minus one if i matched.
            let sum: f64 = gts
                .iter()
                .map(|g| {
                    let others = matching - usize::from(*g == normalized);
                    (others as f64 / 3.0).min(1.0)
                })
                .sum();
            Ok(VqaQuestionScore {
                accuracy: sum / n as f64,
                scoring: VqaScoring::LeaveOneOut,
                normalized_prediction: normalized,
                matching_answers: matching,
            })
        }
    }
}

/// Score one prediction against equivalent accepted forms: 1 if it equals any of them after
/// normalizing both sides.
pub fn score_accepted(
    prediction: &str,
    accepted: &[String],
    processor: VqaProcessor,
) -> Result<VqaQuestionScore> {
    let full = prediction_normalizer(processor);
    if accepted.is_empty() {
        bail!("no accepted answers");
    }
    let normalized = full(prediction);
    let matching = accepted.iter().filter(|a| full(a) == normalized).count();
    Ok(VqaQuestionScore {
        accuracy: if matching > 0 { 1.0 } else { 0.0 },
        scoring: VqaScoring::AnyAccepted,
        normalized_prediction: normalized,
        matching_answers: matching,
    })
}

/// One question to score: the model's answer and the references.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaExample {
    pub id: SampleId,
    pub prediction: String,
    pub answers: Vec<String>,
    /// Equivalent forms, any of which is fully correct; when non-empty they replace the
    /// soft accuracy over `answers` (which is meant for 10 human answers, so a list of
    /// synonyms would give a correct answer only 1/3).
    pub accepted: Vec<String>,
    /// "yes/no", "number", "other" in VQAv2.
    pub answer_type: Option<String>,
    /// Any other grouping (VQAv2's `question_type`, a benchmark's category).
    pub category: Option<String>,
}

/// Accuracy of a group of questions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupAccuracy {
    /// In [0, 100].
    pub accuracy: f64,
    pub count: usize,
}

/// Dataset-level VQA accuracy with breakdowns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VqaSummary {
    pub processor: VqaProcessor,
    /// Mean accuracy × 100 (the official script rounds this to 2 decimals; not rounded here).
    pub accuracy: f64,
    pub count: usize,
    /// Questions scored by exact match (a single reference, or a list of accepted forms).
    pub exact_match_count: usize,
    pub per_answer_type: BTreeMap<String, GroupAccuracy>,
    pub per_category: BTreeMap<String, GroupAccuracy>,
    /// Per question, in input order.
    pub questions: Vec<(SampleId, VqaQuestionScore)>,
}

fn group_means(groups: BTreeMap<String, Vec<f64>>) -> BTreeMap<String, GroupAccuracy> {
    groups
        .into_iter()
        .map(|(k, accs)| {
            let accuracy = 100.0 * accs.iter().sum::<f64>() / accs.len() as f64;
            let count = accs.len();
            (k, GroupAccuracy { accuracy, count })
        })
        .collect()
}

/// Score every question with the official processor and aggregate.
pub fn evaluate_vqa(examples: &[VqaExample]) -> Result<VqaSummary> {
    evaluate_vqa_with(examples, VqaProcessor::Official)
}

/// Score every question and aggregate. Errors name the question that has no reference answers.
pub fn evaluate_vqa_with(examples: &[VqaExample], processor: VqaProcessor) -> Result<VqaSummary> {
    if examples.is_empty() {
        bail!("no questions to score");
    }
    let mut questions = Vec::with_capacity(examples.len());
    let mut by_type: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut by_category: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for ex in examples {
        let score = if ex.accepted.is_empty() {
            score_vqa_answer_with(&ex.prediction, &ex.answers, processor)
        } else {
            score_accepted(&ex.prediction, &ex.accepted, processor)
        }
        .map_err(|e| anyhow::anyhow!("question {}: {e}", ex.id))?;
        if let Some(t) = &ex.answer_type {
            by_type.entry(t.clone()).or_default().push(score.accuracy);
        }
        if let Some(c) = &ex.category {
            by_category
                .entry(c.clone())
                .or_default()
                .push(score.accuracy);
        }
        questions.push((ex.id.clone(), score));
    }
    let total: f64 = questions.iter().map(|(_, s)| s.accuracy).sum();
    let exact_match_count = questions
        .iter()
        .filter(|(_, s)| s.scoring != VqaScoring::LeaveOneOut)
        .count();
    Ok(VqaSummary {
        processor,
        accuracy: 100.0 * total / questions.len() as f64,
        count: questions.len(),
        exact_match_count,
        per_answer_type: group_means(by_type),
        per_category: group_means(by_category),
        questions,
    })
}
