//! The records `mmkd data synth` writes, and byte-stable JSON / JSONL writers.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::scene::{Object, Scene};
use crate::atomic::write_atomically;

/// One LLaVA training sample (`pretrain.json`, `instruct.json`).
#[derive(Debug, Clone, Serialize)]
pub struct LlavaRecord {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub conversations: Vec<ConversationTurn>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversationTurn {
    pub from: &'static str,
    pub value: String,
}

impl ConversationTurn {
    pub fn human(value: String) -> Self {
        ConversationTurn {
            from: "human",
            value,
        }
    }
    pub fn gpt(value: String) -> Self {
        ConversationTurn { from: "gpt", value }
    }
}

/// A line of `questions.jsonl` (LLaVA's evaluation question format).
#[derive(Debug, Clone, Serialize)]
pub struct QuestionLine {
    pub question_id: u64,
    pub image: String,
    pub text: String,
    pub category: &'static str,
}

/// A line of `answers.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerLine {
    pub question_id: u64,
    /// The answer as trained (one reference: VQA's soft accuracy is for 10 human answers).
    pub answers: Vec<String>,
    /// Every form counted fully correct (the answer first, then synonyms such as "3"/"three").
    pub accepted: Vec<String>,
    pub answer_type: &'static str,
}

/// A line of `captions.jsonl`: the prompt and the reference captions of one image.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionLine {
    pub image_id: String,
    pub image: String,
    pub text: &'static str,
    pub references: Vec<String>,
}

/// A line of `pope_{random,popular,adversarial}.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct PopeLine {
    pub question_id: u64,
    pub image: String,
    pub text: String,
    pub label: &'static str,
    pub category: &'static str,
}

/// A line of `scenes.jsonl`: the ground truth of one image.
#[derive(Debug, Clone, Serialize)]
pub struct SceneLine {
    pub id: String,
    pub image: String,
    pub objects: Vec<ObjectLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectLine {
    pub shape: &'static str,
    pub color: &'static str,
    pub size: &'static str,
    pub row: u8,
    pub col: u8,
    pub position: &'static str,
}

impl SceneLine {
    pub fn new(id: String, image: String, scene: &Scene) -> Self {
        let objects = scene.objects.iter().map(ObjectLine::from).collect();
        SceneLine { id, image, objects }
    }
}

impl From<&Object> for ObjectLine {
    fn from(o: &Object) -> Self {
        ObjectLine {
            shape: o.shape.name(),
            color: o.color.name(),
            size: o.size.name(),
            row: o.cell.row,
            col: o.cell.col,
            position: o.cell.name(),
        }
    }
}

/// A JSON list with one compact record per line.
pub fn write_json_list<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut w = b"[\n".to_vec();
    for (i, r) in records.iter().enumerate() {
        serde_json::to_writer(&mut w, r)
            .with_context(|| format!("cannot serialise a record of {}", path.display()))?;
        w.extend_from_slice(if i + 1 < records.len() { b",\n" } else { b"\n" });
    }
    w.extend_from_slice(b"]\n");
    write_atomically(path, &w)
}

/// One compact JSON record per line.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut w = Vec::new();
    for r in records {
        serde_json::to_writer(&mut w, r)
            .with_context(|| format!("cannot serialise a record of {}", path.display()))?;
        w.push(b'\n');
    }
    write_atomically(path, &w)
}

/// Pretty-printed JSON (the manifest).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut w = serde_json::to_vec_pretty(value)
        .with_context(|| format!("cannot serialise {}", path.display()))?;
    w.push(b'\n');
    write_atomically(path, &w)
}
