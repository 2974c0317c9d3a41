//! A validated LLaVA conversation sample and the checks that make it valid.
//!
//! The raw JSON record is turned into a [`Sample`] by [`Sample::from_json`], which reports the first
//! thing wrong with the record as a [`Problem`]. A `Sample` therefore always has alternating
//! human/gpt turns ending with a non-empty answer, and `<image>` placeholders consistent with its
//! images.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::problem::{Problem, ProblemKind, SampleRef};

/// The placeholder that marks where an image goes in a human turn.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `"from": "human"`: the question or instruction.
    Human,
    /// `"from": "gpt"`: the answer that is supervised.
    Gpt,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub value: String,
}

/// A checked sample: images resolved against the image root, turns alternating from human to gpt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub reference: SampleRef,
    /// Image files in placeholder order, resolved against the image root.
    pub images: Vec<PathBuf>,
    pub turns: Vec<Turn>,
}

/// A question and its answer.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    pub question: &'a str,
    pub answer: &'a str,
}

impl Sample {
    /// The question/answer pairs in order.
    pub fn rounds(&self) -> impl Iterator<Item = Round<'_>> {
        self.turns.chunks(2).map(|pair| Round {
            question: &pair[0].value,
            answer: &pair[1].value,
        })
    }

    pub fn num_rounds(&self) -> usize {
        self.turns.len() / 2
    }

    pub fn has_images(&self) -> bool {
        !self.images.is_empty()
    }

    /// The number of `<image>` placeholders written in the human turns.
    pub fn placeholder_count(&self) -> usize {
        self.turns
            .iter()
            .filter(|t| t.role == Role::Human)
            .map(|t| t.value.matches(IMAGE_PLACEHOLDER).count())
            .sum()
    }

    /// Build a sample from one JSON record, or say what is wrong with it.
    pub fn from_json(
        record: &Value,
        reference: SampleRef,
        image_root: &Path,
    ) -> Result<Sample, Problem> {
        let problem = |kind, msg: String| Problem::new(reference.clone(), kind, msg);
        let Some(obj) = record.as_object() else {
            return Err(problem(
                ProblemKind::NotAnObject,
                format!("record is {}, not a JSON object", json_kind(record)),
            ));
        };

        let images = match obj.get("image") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => {
                vec![image_path(s, image_root).map_err(|m| problem(ProblemKind::BadField, m))?]
            }
            Some(Value::Array(items)) => {
                let mut paths = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let Some(s) = item.as_str() else {
                        return Err(problem(
                            ProblemKind::BadField,
                            format!("`image[{i}]` is {}, not a path string", json_kind(item)),
                        ));
                    };
                    paths.push(
                        image_path(s, image_root).map_err(|m| problem(ProblemKind::BadField, m))?,
                    );
                }
                paths
            }
            Some(other) => {
                return Err(problem(
                    ProblemKind::BadField,
                    format!(
                        "`image` is {}, not a path string or a list of paths",
                        json_kind(other)
                    ),
                ))
            }
        };

        let turns_json = match obj.get("conversations") {
            None | Some(Value::Null) => {
                return Err(problem(
                    ProblemKind::MissingConversations,
                    "no `conversations` field".into(),
                ))
            }
            Some(Value::Array(items)) if items.is_empty() => {
                return Err(problem(
                    ProblemKind::MissingConversations,
                    "`conversations` is empty".into(),
                ))
            }
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(problem(
                    ProblemKind::BadField,
                    format!(
                        "`conversations` is {}, not a list of turns",
                        json_kind(other)
                    ),
                ))
            }
        };

        let mut turns = Vec::with_capacity(turns_json.len());
        for (i, t) in turns_json.iter().enumerate() {
            turns.push(parse_turn(t, i).map_err(|(kind, msg)| problem(kind, msg))?);
        }
        check_turn_order(&turns).map_err(|(kind, msg)| problem(kind, msg))?;

        let sample = Sample {
            reference: reference.clone(),
            images,
            turns,
        };
        sample
            .check_placeholders()
            .map_err(|(kind, msg)| problem(kind, msg))?;
        Ok(sample)
    }

    fn check_placeholders(&self) -> Result<(), (ProblemKind, String)> {
        for (i, t) in self.turns.iter().enumerate() {
            if t.role == Role::Gpt && t.value.contains(IMAGE_PLACEHOLDER) {
                return Err((
                    ProblemKind::PlaceholderInAnswer,
                    format!("turn {i} (gpt) contains `{IMAGE_PLACEHOLDER}`"),
                ));
            }
        }
        let placeholders = self.placeholder_count();
        let images = self.images.len();
        if images == 0 && placeholders > 0 {
            return Err((
                ProblemKind::PlaceholderWithoutImage,
                format!("the text has {placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but the sample has no image"),
            ));
        }
        // No placeholder at all is fine: the template puts the images before the first question.
        if placeholders > 0 && placeholders != images {
            return Err((
                ProblemKind::ImageCountMismatch,
                format!("the sample has {images} image(s) but {placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s)"),
            ));
        }
        Ok(())
    }
}

fn image_path(s: &str, image_root: &Path) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        return Err("`image` is an empty path".into());
    }
    Ok(image_root.join(s))
}

fn parse_turn(t: &Value, i: usize) -> Result<Turn, (ProblemKind, String)> {
    let Some(obj) = t.as_object() else {
        return Err((
            ProblemKind::BadField,
            format!("turn {i} is {}, not an object", json_kind(t)),
        ));
    };
    let role = match obj.get("from") {
        Some(Value::String(s)) if s == "human" => Role::Human,
        Some(Value::String(s)) if s == "gpt" => Role::Gpt,
        Some(Value::String(s)) => {
            return Err((
                ProblemKind::UnknownRole,
                format!("turn {i} has unknown `from` {s:?} (expected \"human\" or \"gpt\")"),
            ))
        }
        None => {
            return Err((
                ProblemKind::BadField,
                format!("turn {i} has no `from` field"),
            ))
        }
        Some(other) => {
            return Err((
                ProblemKind::BadField,
                format!("turn {i} `from` is {}, not a string", json_kind(other)),
            ))
        }
    };
    let value = match obj.get("value") {
        Some(Value::String(s)) => s.clone(),
        None => {
            return Err((
                ProblemKind::BadField,
                format!("turn {i} has no `value` field"),
            ))
        }
        Some(other) => {
            return Err((
                ProblemKind::BadField,
                format!("turn {i} `value` is {}, not a string", json_kind(other)),
            ))
        }
    };
    Ok(Turn { role, value })
}

fn check_turn_order(turns: &[Turn]) -> Result<(), (ProblemKind, String)> {
    for (i, t) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { Role::Human } else { Role::Gpt };
        if t.role != expected {
            return Err((
                ProblemKind::BadTurnOrder,
                format!("turn {i} is from {} but {} was expected (turns must alternate human, gpt, ...)", role_name(t.role), role_name(expected)),
            ));
        }
        if t.role == Role::Gpt && t.value.trim().is_empty() {
            return Err((
                ProblemKind::EmptyAnswer,
                format!("turn {i} (gpt) is an empty answer"),
            ));
        }
    }
    if turns.len() % 2 == 1 {
        return Err((
            ProblemKind::BadTurnOrder,
            format!(
                "the last turn ({}) is a human turn without an answer",
                turns.len() - 1
            ),
        ));
    }
    Ok(())
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Human => "human",
        Role::Gpt => "gpt",
    }
}

/// "a string", "a number", ... for messages about wrongly typed fields.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The record's id as text: its `id`, else `question_id`, `sample_id` or `image_id` (the
/// evaluation files' ids), when a string or number.
pub(crate) fn record_id(record: &Value) -> Option<String> {
    ["id", "question_id", "sample_id", "image_id"]
        .iter()
        .find_map(|key| match record.get(*key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
}
