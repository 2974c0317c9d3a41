//! Per-sample problems: what is wrong with one sample, where it is, and whether it is a data error.
//!
//! Nothing is dropped silently: every sample that is skipped is skipped because of a [`Problem`],
//! and every problem is kept (and counted by [`ProblemKind`]) in the report of the step that found it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Where a sample is: its position in the file, its `id` field and (for JSONL) its line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SampleRef {
    /// 0-based position among the file's records.
    pub index: usize,
    /// The sample's `id` field (numbers are written as text); `None` when absent.
    pub id: Option<String>,
    /// 1-based line of the record in a JSONL file; `None` in a JSON list.
    pub line: Option<usize>,
}

impl SampleRef {
    /// The name used in messages and reports: the id when there is one, else `#index`.
    pub fn name(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => format!("#{}", self.index),
        }
    }
}

impl fmt::Display for SampleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(f, "sample {id:?} (record {})", self.index)?,
            None => write!(f, "sample #{} (no id)", self.index)?,
        }
        if let Some(line) = self.line {
            write!(f, " at line {line}")?;
        }
        Ok(())
    }
}

/// What kind of problem a sample has. Ordered so reports list counts in a stable order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A JSONL line that is not valid JSON.
    MalformedJson,
    /// A record that is not a JSON object.
    NotAnObject,
    /// A record without a `conversations` list (or with an empty one).
    MissingConversations,
    /// A field of the wrong type (`value` not a string, `image` not a string or list, ...).
    BadField,
    /// A turn whose `from` is not `human` or `gpt`.
    UnknownRole,
    /// Turns that do not alternate human, gpt, human, gpt, ... ending with gpt.
    BadTurnOrder,
    /// A gpt turn whose text is empty or only whitespace.
    EmptyAnswer,
    /// `<image>` in a sample that has no image.
    PlaceholderWithoutImage,
    /// Images whose number differs from the number of `<image>` placeholders.
    ImageCountMismatch,
    /// `<image>` inside a gpt turn.
    PlaceholderInAnswer,
    /// An image file that does not exist.
    MissingImage,
    /// An image file that exists but cannot be decoded.
    CorruptImage,
    /// An image in a format this build cannot decode.
    UnsupportedImage,
    /// A sample the template cannot lay out (e.g. several rounds for `plain`).
    TemplateMismatch,
    /// The supervised tokens do not decode to the answers.
    TokenizationMismatch,
    /// Longer than `max_length` and cannot be cut without splitting an image or losing every answer.
    TooLong,
}

impl ProblemKind {
    /// Data errors are defects in the data set; the others (only [`ProblemKind::TooLong`]) are
    /// expected consequences of a setting and are counted but not treated as defects.
    pub fn is_data_error(self) -> bool {
        !matches!(self, ProblemKind::TooLong)
    }

    /// The snake_case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::MalformedJson => "malformed_json",
            ProblemKind::NotAnObject => "not_an_object",
            ProblemKind::MissingConversations => "missing_conversations",
            ProblemKind::BadField => "bad_field",
            ProblemKind::UnknownRole => "unknown_role",
            ProblemKind::BadTurnOrder => "bad_turn_order",
            ProblemKind::EmptyAnswer => "empty_answer",
            ProblemKind::PlaceholderWithoutImage => "placeholder_without_image",
            ProblemKind::ImageCountMismatch => "image_count_mismatch",
            ProblemKind::PlaceholderInAnswer => "placeholder_in_answer",
            ProblemKind::MissingImage => "missing_image",
            ProblemKind::CorruptImage => "corrupt_image",
            ProblemKind::UnsupportedImage => "unsupported_image",
            ProblemKind::TemplateMismatch => "template_mismatch",
            ProblemKind::TokenizationMismatch => "tokenization_mismatch",
            ProblemKind::TooLong => "too_long",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One problem with one sample. The sample is not used for training.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub sample: SampleRef,
    pub kind: ProblemKind,
    /// A sentence saying what is wrong, naming the field, turn or file involved.
    pub message: String,
}

impl Problem {
    pub fn new(sample: SampleRef, kind: ProblemKind, message: impl Into<String>) -> Self {
        Problem {
            sample,
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [{}]", self.sample, self.message, self.kind)
    }
}

/// Counts of problems by kind.
pub fn count_by_kind<'a>(
    problems: impl IntoIterator<Item = &'a Problem>,
) -> BTreeMap<ProblemKind, usize> {
    let mut counts = BTreeMap::new();
    for p in problems {
        *counts.entry(p.kind).or_insert(0) += 1;
    }
    counts
}
