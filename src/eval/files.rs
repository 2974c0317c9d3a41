//! Benchmark files read by `mmkd eval` and the predictions it writes.
//!
//! Questions are LLaVA's `model_vqa` question lines `{question_id, image?, text, category?}`;
//! VQA answers `{question_id, answers: [...], answer_type?}`; caption items
//! `{image_id | question_id, image, text?, references?}`; POPE lines
//! `{question_id, image, text, label, category?}`; multiple-choice lines
//! `{question_id, image?, question, options: [...], answer: "B"}`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Reads a JSONL file (or a JSON list) into records; errors name the file and line.
pub fn read_records<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed JSON list", path.display()))?;
        return values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value(v).with_context(|| format!("{}: item {i}", path.display()))
            })
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: malformed record", path.display(), i + 1))
        })
        .collect()
}

/// Ids may be numbers or strings in the field's files; mmkd compares them as strings.
fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "an id must be a string or number, found {other}"
        ))),
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct QuestionLine {
    #[serde(deserialize_with = "id_string")]
    pub question_id: String,
    pub image: Option<String>,
    pub text: String,
    pub category: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AnswerLine {
    #[serde(deserialize_with = "id_string")]
    pub question_id: String,
    pub answers: Vec<String>,
    /// Equivalent forms, any of which is fully correct (synthetic sets list synonyms here);
    /// when present, the question is scored by exact match against them.
    #[serde(default)]
    pub accepted: Vec<String>,
    pub answer_type: Option<String>,
    pub category: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CaptionItem {
    #[serde(alias = "question_id", deserialize_with = "id_string")]
    pub image_id: String,
    pub image: String,
    /// The prompt (a default caption prompt when absent).
    pub text: Option<String>,
    #[serde(default)]
    pub references: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PopeLine {
    #[serde(deserialize_with = "id_string")]
    pub question_id: String,
    pub image: String,
    pub text: String,
    pub label: String,
    pub category: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChoiceLine {
    #[serde(deserialize_with = "id_string")]
    pub question_id: String,
    pub image: Option<String>,
    pub question: String,
    pub options: Vec<String>,
    /// The correct option's letter.
    pub answer: String,
}

/// One prediction line in LLaVA's `model_vqa` format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PredictionLine {
    pub question_id: String,
    pub prompt: String,
    pub text: String,
    pub answer_id: String,
    pub model_id: String,
    pub metadata: Value,
}

pub fn write_predictions(path: &Path, lines: &[PredictionLine]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for line in lines {
        writeln!(file, "{}", serde_json::to_string(line)?)?;
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Checks that every question has a reference and vice versa, naming a few missing ids.
pub fn check_ids_match<'a>(
    questions: impl Iterator<Item = &'a str>,
    references: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<()> {
    let q: std::collections::BTreeSet<&str> = questions.collect();
    let r: std::collections::BTreeSet<&str> = references.collect();
    let missing: Vec<&&str> = q.difference(&r).take(5).collect();
    if !missing.is_empty() {
        bail!(
            "{} question(s) have no {what}, e.g. {:?}",
            q.difference(&r).count(),
            missing
        );
    }
    Ok(())
}
