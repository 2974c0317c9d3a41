//! Readers for prediction and reference files, and joining them by id.
//!
//! Accepted formats (detected from the content, not the file name):
//! - predictions: LLaVA `model_vqa` JSON Lines `{"question_id", "text", ...}` (other fields such
//!   as `prompt`, `answer_id`, `model_id`, `metadata` are ignored); the official VQA results array
//!   `[{"question_id", "answer"}]`; COCO caption results `[{"image_id", "caption"}]`;
//! - VQA references: JSON Lines `{"question_id", "answers": [..], "answer_type"?, "category"?}`
//!   or the official VQAv2 annotation file `{"annotations": [{"question_id", "answers":
//!   [{"answer", ..}], "answer_type", "question_type", ..}]}` (`question_type` → category);
//! - VQA questions: the official `{"questions": [{"question_id", "image_id", "question"}]}`;
//! - caption references: JSON Lines `{"question_id", "answers": [..]}` or the COCO annotation file
//!   `{"annotations": [{"image_id", "caption"}]}` (grouped by image, in order of appearance);
//! - POPE labels: JSON Lines `{"question_id", "label": "yes"|"no", "category"?}` or
//!   `{"question_id", "answers": ["yes"], "category"?}`; `category` is the split
//!   (random / popular / adversarial).
//!
//! Every error names the file and the line (or array element). Ids must be unique per file, and
//! predictions and references must cover the same ids: a mismatch lists a few ids and the count.

mod source;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;

use super::caption::CaptionExample;
use super::ids::SampleId;
use super::pope::{PopeExample, YesNo};
use super::vqa::VqaExample;
use source::{check_unique, document_array, parse_record, read_file, FileContent};
pub use source::{Location, Record};

/// How many ids an error message lists.
const IDS_SHOWN: usize = 5;

/// Turn a file into (location, JSON object) pairs: the document's `key` array, or the lines.
fn items(path: &Path, key: &'static str) -> Result<Vec<(Location, Value)>> {
    Ok(match read_file(path, &[key])? {
        FileContent::Document(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(index, v)| {
                (
                    Location::Element {
                        array: "array",
                        index,
                    },
                    v,
                )
            })
            .collect(),
        FileContent::Document(doc) => document_array(path, doc, key)?
            .into_iter()
            .enumerate()
            .map(|(index, v)| (Location::Element { array: key, index }, v))
            .collect(),
        FileContent::Lines(lines) => lines
            .into_iter()
            .map(|(n, v)| (Location::Line(n), v))
            .collect(),
    })
}

#[derive(Deserialize)]
struct RawPrediction {
    question_id: Option<SampleId>,
    image_id: Option<SampleId>,
    text: Option<String>,
    answer: Option<String>,
    caption: Option<String>,
}

/// Read model outputs: id → generated text.
pub fn read_predictions(path: &Path) -> Result<Vec<Record<String>>> {
    let mut out = Vec::new();
    for (location, value) in items(path, "predictions")? {
        let raw: RawPrediction = parse_record(path, &location, value)?;
        let Some(id) = raw.question_id.or(raw.image_id) else {
            bail!(
                "{}: {location}: no \"question_id\" (or \"image_id\")",
                path.display()
            );
        };
        let Some(text) = raw.text.or(raw.answer).or(raw.caption) else {
            bail!(
                "{}: {location}: no \"text\" (or \"answer\", \"caption\") field",
                path.display()
            );
        };
        out.push(Record {
            id,
            location,
            value: text,
        });
    }
    check_unique(path, &out)?;
    Ok(out)
}

/// Reference answers of one VQA question.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaReference {
    pub answers: Vec<String>,
    /// Equivalent forms, any of which is fully correct (empty: score `answers` as VQA does).
    pub accepted: Vec<String>,
    pub answer_type: Option<String>,
    pub category: Option<String>,
}

/// `answers` as a list of strings, or of official `{"answer": ..., ...}` objects.
fn parse_answers(value: Value) -> std::result::Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err("\"answers\" must be a list".to_string());
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s),
            Value::Object(mut o) => match o.remove("answer") {
                Some(Value::String(s)) => Ok(s),
                _ => Err(format!("answers[{i}] has no string \"answer\"")),
            },
            _ => Err(format!(
                "answers[{i}] must be a string or an {{\"answer\": ...}} object"
            )),
        })
        .collect()
}

#[derive(Deserialize)]
struct RawVqaReference {
    question_id: SampleId,
    answers: Value,
    #[serde(default)]
    accepted: Vec<String>,
    answer_type: Option<String>,
    category: Option<String>,
    question_type: Option<String>,
}

/// Read VQA reference answers (JSON Lines or the official annotation file).
pub fn read_vqa_references(path: &Path) -> Result<Vec<Record<VqaReference>>> {
    let mut out = Vec::new();
    for (location, value) in items(path, "annotations")? {
        let raw: RawVqaReference = parse_record(path, &location, value)?;
        let answers = parse_answers(raw.answers)
            .map_err(|e| anyhow::anyhow!("{}: {location}: {e}", path.display()))?;
        if answers.is_empty() {
            bail!(
                "{}: {location}: question {} has an empty \"answers\" list",
                path.display(),
                raw.question_id
            );
        }
        out.push(Record {
            id: raw.question_id,
            location,
            value: VqaReference {
                answers,
                accepted: raw.accepted,
                answer_type: raw.answer_type,
                category: raw.category.or(raw.question_type),
            },
        });
    }
    check_unique(path, &out)?;
    Ok(out)
}

/// One question of the official VQAv2 question file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VqaQuestion {
    pub question_id: SampleId,
    pub image_id: SampleId,
    pub question: String,
}

/// Read the official VQAv2 question file (`{"questions": [...]}`) or the same records as JSON Lines.
pub fn read_vqa_questions(path: &Path) -> Result<Vec<Record<VqaQuestion>>> {
    let mut out = Vec::new();
    for (location, value) in items(path, "questions")? {
        let q: VqaQuestion = parse_record(path, &location, value)?;
        out.push(Record {
            id: q.question_id.clone(),
            location,
            value: q,
        });
    }
    check_unique(path, &out)?;
    Ok(out)
}

#[derive(Deserialize)]
struct RawCaptionRefs {
    question_id: SampleId,
    answers: Vec<String>,
}

#[derive(Deserialize)]
struct RawCocoCaption {
    image_id: SampleId,
    caption: String,
}

/// Read caption references: id → reference captions.
pub fn read_caption_references(path: &Path) -> Result<Vec<Record<Vec<String>>>> {
    let mut out: Vec<Record<Vec<String>>> = Vec::new();
    match read_file(path, &["annotations"])? {
        FileContent::Document(doc) => {
            // COCO: one annotation per caption; group by image in order of first appearance.
            let mut index_of: HashMap<SampleId, usize> = HashMap::new();
            for (index, value) in document_array(path, doc, "annotations")?
                .into_iter()
                .enumerate()
            {
                let location = Location::Element {
                    array: "annotations",
                    index,
                };
                let ann: RawCocoCaption = parse_record(path, &location, value)?;
                match index_of.get(&ann.image_id) {
                    Some(&i) => out[i].value.push(ann.caption),
                    None => {
                        index_of.insert(ann.image_id.clone(), out.len());
                        out.push(Record {
                            id: ann.image_id,
                            location,
                            value: vec![ann.caption],
                        });
                    }
                }
            }
        }
        FileContent::Lines(lines) => {
            for (n, value) in lines {
                let location = Location::Line(n);
                let raw: RawCaptionRefs = parse_record(path, &location, value)?;
                if raw.answers.is_empty() {
                    bail!(
                        "{}: {location}: image {} has no reference captions",
                        path.display(),
                        raw.question_id
                    );
                }
                out.push(Record {
                    id: raw.question_id,
                    location,
                    value: raw.answers,
                });
            }
            check_unique(path, &out)?;
        }
    }
    Ok(out)
}

/// A POPE ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct PopeLabel {
    pub label: YesNo,
    pub split: Option<String>,
}

#[derive(Deserialize)]
struct RawPopeLabel {
    question_id: SampleId,
    label: Option<String>,
    answers: Option<Vec<String>>,
    category: Option<String>,
}

/// Read POPE labels.
pub fn read_pope_labels(path: &Path) -> Result<Vec<Record<PopeLabel>>> {
    let mut out = Vec::new();
    for (location, value) in items(path, "annotations")? {
        let raw: RawPopeLabel = parse_record(path, &location, value)?;
        let text = match (raw.label, raw.answers) {
            (Some(l), None) => l,
            (None, Some(a)) if a.len() == 1 => a.into_iter().next().unwrap_or_default(),
            (None, Some(a)) => bail!(
                "{}: {location}: POPE needs exactly one answer, found {}",
                path.display(),
                a.len()
            ),
            (Some(_), Some(_)) => bail!(
                "{}: {location}: give \"label\" or \"answers\", not both",
                path.display()
            ),
            (None, None) => bail!(
                "{}: {location}: no \"label\" (or \"answers\")",
                path.display()
            ),
        };
        let Some(label) = YesNo::parse_label(&text) else {
            bail!(
                "{}: {location}: label must be \"yes\" or \"no\", found {text:?}",
                path.display()
            );
        };
        out.push(Record {
            id: raw.question_id,
            location,
            value: PopeLabel {
                label,
                split: raw.category,
            },
        });
    }
    check_unique(path, &out)?;
    Ok(out)
}

fn list_ids<'a>(ids: impl Iterator<Item = &'a SampleId>, total: usize) -> String {
    let shown: Vec<String> = ids.take(IDS_SHOWN).map(|i| i.to_string()).collect();
    let more = if total > IDS_SHOWN {
        format!(", … ({} more)", total - IDS_SHOWN)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// Pair predictions with references by id, in reference order. Fails when either side has ids
/// the other lacks, listing a few of them and how many there are.
pub fn join_by_id<P, R>(
    predictions: Vec<Record<P>>,
    pred_path: &Path,
    references: Vec<Record<R>>,
    ref_path: &Path,
) -> Result<Vec<(SampleId, P, R)>> {
    let mut preds: HashMap<SampleId, P> =
        predictions.into_iter().map(|r| (r.id, r.value)).collect();
    let missing: Vec<&SampleId> = references
        .iter()
        .map(|r| &r.id)
        .filter(|id| !preds.contains_key(id))
        .collect();
    let ref_ids: std::collections::HashSet<&SampleId> = references.iter().map(|r| &r.id).collect();
    let mut extra: Vec<&SampleId> = preds.keys().filter(|id| !ref_ids.contains(id)).collect();
    extra.sort();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "{} has no prediction for {} of the {} ids in {}: {}",
            pred_path.display(),
            missing.len(),
            references.len(),
            ref_path.display(),
            list_ids(missing.iter().copied(), missing.len())
        ));
    }
    if !extra.is_empty() {
        problems.push(format!(
            "{} has {} ids that are not in {}: {}",
            pred_path.display(),
            extra.len(),
            ref_path.display(),
            list_ids(extra.iter().copied(), extra.len())
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(references
        .into_iter()
        .filter_map(|r| preds.remove(&r.id).map(|p| (r.id, p, r.value)))
        .collect())
}

/// Predictions and VQA references joined into scoring examples.
pub fn load_vqa_examples(pred_path: &Path, answers_path: &Path) -> Result<Vec<VqaExample>> {
    let joined = join_by_id(
        read_predictions(pred_path)?,
        pred_path,
        read_vqa_references(answers_path)?,
        answers_path,
    )?;
    Ok(joined
        .into_iter()
        .map(|(id, prediction, r)| VqaExample {
            id,
            prediction,
            answers: r.answers,
            accepted: r.accepted,
            answer_type: r.answer_type,
            category: r.category,
        })
        .collect())
}

/// Predictions and caption references joined into scoring examples.
pub fn load_caption_examples(pred_path: &Path, refs_path: &Path) -> Result<Vec<CaptionExample>> {
    let joined = join_by_id(
        read_predictions(pred_path)?,
        pred_path,
        read_caption_references(refs_path)?,
        refs_path,
    )?;
    Ok(joined
        .into_iter()
        .map(|(id, candidate, references)| CaptionExample {
            id,
            candidate,
            references,
        })
        .collect())
}

/// Predictions and POPE labels joined into scoring examples.
pub fn load_pope_examples(pred_path: &Path, labels_path: &Path) -> Result<Vec<PopeExample>> {
    let joined = join_by_id(
        read_predictions(pred_path)?,
        pred_path,
        read_pope_labels(labels_path)?,
        labels_path,
    )?;
    Ok(joined
        .into_iter()
        .map(|(_, answer, l)| PopeExample {
            answer,
            label: l.label,
            split: l.split,
        })
        .collect())
}
