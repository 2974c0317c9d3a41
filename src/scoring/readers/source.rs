//! Reading JSON Lines and JSON documents with errors that name the file and the line.

use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::scoring::ids::SampleId;

/// Where a record came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSON Lines file.
    Line(usize),
    /// Element of an array inside a JSON document, e.g. `annotations[3]`.
    Element { array: &'static str, index: usize },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Element { array, index } => write!(f, "{array}[{index}]"),
        }
    }
}

/// A record with its id and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    pub id: SampleId,
    pub location: Location,
    pub value: T,
}

/// The two shapes evaluation files come in.
pub enum FileContent {
    /// One JSON document (an object such as `{"annotations": [...]}` or an array).
    Document(Value),
    /// JSON Lines: (1-based line number, parsed object) for each non-blank line.
    Lines(Vec<(usize, Value)>),
}

/// serde_json appends " at line L column C" (relative to what it parsed); keep the message and
/// report the column only, since the line is the file's.
fn describe_json_error(err: &serde_json::Error) -> String {
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    format!("{message} (column {})", err.column())
}

/// Read `path` as a single JSON document when the whole file parses as one array, or as one
/// object holding `document_keys`; otherwise as JSON Lines.
pub fn read_file(path: &Path, document_keys: &[&str]) -> Result<FileContent> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(value) = serde_json::from_str::<Value>(&text) {
        let is_document = match &value {
            Value::Array(_) => true,
            Value::Object(map) => document_keys.iter().any(|k| map.contains_key(*k)),
            _ => false,
        };
        if is_document {
            return Ok(FileContent::Document(value));
        }
    }
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            anyhow!(
                "{}: line {}: invalid JSON: {}",
                path.display(),
                i + 1,
                describe_json_error(&e)
            )
        })?;
        lines.push((i + 1, value));
    }
    if lines.is_empty() {
        bail!("{}: no records (the file is empty)", path.display());
    }
    Ok(FileContent::Lines(lines))
}

/// Deserialize one record, naming the file and location on failure.
pub fn parse_record<T: DeserializeOwned>(
    path: &Path,
    location: &Location,
    value: Value,
) -> Result<T> {
    if !value.is_object() {
        bail!(
            "{}: {location}: expected a JSON object, found {}",
            path.display(),
            kind(&value)
        );
    }
    serde_json::from_value(value).map_err(|e| {
        anyhow!(
            "{}: {location}: {}",
            path.display(),
            describe_json_error(&e).replace(" (column 0)", "")
        )
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The array stored under `key` in a JSON document.
pub fn document_array(path: &Path, doc: Value, key: &'static str) -> Result<Vec<Value>> {
    match doc {
        Value::Object(mut map) => match map.remove(key) {
            Some(Value::Array(items)) => Ok(items),
            Some(other) => bail!(
                "{}: \"{key}\" must be an array, found {}",
                path.display(),
                kind(&other)
            ),
            None => bail!(
                "{}: no \"{key}\" array in this JSON document",
                path.display()
            ),
        },
        Value::Array(_) => bail!(
            "{}: expected an object with a \"{key}\" array, found an array",
            path.display()
        ),
        other => bail!(
            "{}: expected a JSON object, found {}",
            path.display(),
            kind(&other)
        ),
    }
}

/// Reject a second record with the same id (naming both locations).
pub fn check_unique<T>(path: &Path, records: &[Record<T>]) -> Result<()> {
    let mut first_seen: std::collections::HashMap<&SampleId, &Location> =
        std::collections::HashMap::new();
    for r in records {
        if let Some(prev) = first_seen.insert(&r.id, &r.location) {
            bail!(
                "{}: duplicate id {} ({} and {})",
                path.display(),
                r.id,
                prev,
                r.location
            );
        }
    }
    Ok(())
}
