//! `manifest.json`: what a finished cache holds and what it was computed from. It is written
//! last, so a directory without it is an incomplete cache.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::digest::digest_str;

/// Version of the on-disk layout; a cache of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

/// Everything the cached teacher outputs depend on besides the teacher: a training run may use
/// the cache only if its own values are the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunIdentity {
    pub format_version: u32,
    /// `pretraining` (DPT: caption data, `plain` template) or `chat` (DFT).
    pub stage_kind: String,
    /// Digest of the data file's content.
    pub data_digest: String,
    /// The image root the data's image paths were resolved against.
    pub images: String,
    pub template: String,
    /// Digest of the template's content (a template file may change under the same name).
    pub template_digest: String,
    pub tokenizer_digest: String,
    /// Digest of the image preprocessing settings.
    pub processor_digest: String,
    pub max_length: usize,
    /// The distillation temperature the log-probabilities were taken at.
    pub temperature: f64,
    pub truncate_vocab: Option<usize>,
    /// Knowledge augmentation: the routings each teacher output averages (absent: 1), and
    /// the seed of their draws (absent: 0, no draw).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub teacher_routings: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub routing_seed: u64,
}

fn yes() -> bool {
    true
}
fn is_yes(b: &bool) -> bool {
    *b
}
fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The teacher a cache was written from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherIdentity {
    /// The checkpoint as given to `mmkd teacher-cache`.
    pub path: String,
    /// Digest of its `config.json` and weight files.
    pub digest: String,
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub samples: usize,
    pub bytes: u64,
}

/// The manifest of a finished cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub run: RunIdentity,
    pub teacher: TeacherIdentity,
    /// Token ids kept per distilled position.
    pub top_k: usize,
    /// The teacher's vocabulary after `truncate_vocab`.
    pub vocab: usize,
    pub image_token_id: u32,
    pub tokens_per_image: usize,
    /// Whether the teacher's visual relation matrices (RDist) are stored.
    pub relations: bool,
    /// Whether the teacher's distributions at the image tokens are stored (a black-box
    /// teacher's cache has none: its server reports the generated tokens only).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub visual: bool,
    /// The data file as given (for messages; the digest binds it).
    pub data: String,
    pub samples: usize,
    pub response_positions: usize,
    pub visual_positions: usize,
    /// Data records not cached (not trainable either), by reason.
    pub skipped: BTreeMap<String, usize>,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            bail!("teacher cache {} does not exist", dir.display());
        }
        if !path.exists() {
            bail!(
                "teacher cache {} is incomplete (no {MANIFEST_FILE}): its writing was interrupted; \
                 rerun `mmkd teacher-cache` to finish it",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a teacher-cache manifest (invalid JSON)",
                path.display()
            )
        })?;
        let version = value
            .get("run")
            .and_then(|r| r.get("format_version"))
            .and_then(|v| v.as_u64());
        if let Some(v) = version {
            if v != FORMAT_VERSION as u64 {
                bail!(
                    "{}: cache format version {v}, this mmkd reads version {FORMAT_VERSION}; rebuild the cache",
                    path.display()
                );
            }
        }
        serde_json::from_value(value)
            .with_context(|| format!("{}: not a teacher-cache manifest", path.display()))
    }

    /// What binds the cache for a run's settings digest (resume refuses another cache).
    pub fn identity_digest(&self) -> String {
        let json = serde_json::json!({
            "run": self.run, "teacher": self.teacher, "top_k": self.top_k,
            "relations": self.relations, "samples": self.samples, "shards": self.shards,
        });
        digest_str(&json.to_string())
    }
}

/// The fields of `cached` that differ from `run`, as (field, cached value, run value).
pub fn mismatches(cached: &RunIdentity, run: &RunIdentity) -> Vec<(String, String, String)> {
    let as_map = |r: &RunIdentity| match serde_json::to_value(r) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (c, r) = (as_map(cached), as_map(run));
    let show = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "none".into(),
        Some(other) => other.to_string(),
    };
    c.keys()
        .filter(|k| c.get(*k) != r.get(*k))
        .map(|k| (k.clone(), show(c.get(k)), show(r.get(k))))
        .collect()
}

/// Fails, naming every differing field, when the cache was written for another run.
pub fn check_run(dir: &Path, cached: &RunIdentity, run: &RunIdentity) -> Result<()> {
    let diff = mismatches(cached, run);
    if diff.is_empty() {
        return Ok(());
    }
    let fields = diff
        .iter()
        .map(|(k, c, r)| format!("`{k}`: cache {c}, this run {r}"))
        .collect::<Vec<_>>()
        .join("; ");
    bail!(
        "teacher cache {} was written for another run ({fields}); rebuild it with `mmkd teacher-cache` \
         for this data, template, tokenizer and settings",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> RunIdentity {
        RunIdentity {
            format_version: FORMAT_VERSION,
            stage_kind: "chat".into(),
            data_digest: "aa".into(),
            images: "/img".into(),
            template: "phi".into(),
            template_digest: "bb".into(),
            tokenizer_digest: "cc".into(),
            processor_digest: "dd".into(),
            max_length: 64,
            temperature: 1.0,
            truncate_vocab: None,
            teacher_routings: 1,
            routing_seed: 0,
        }
    }

    #[test]
    fn mismatches_name_the_field_and_both_values() {
        let a = identity();
        assert!(mismatches(&a, &a).is_empty());
        let b = RunIdentity {
            temperature: 2.0,
            truncate_vocab: Some(10),
            ..identity()
        };
        let err = check_run(Path::new("C"), &a, &b).unwrap_err().to_string();
        assert!(
            err.contains(
                "`temperature`: cache 1.0, this run 2.0; `truncate_vocab`: cache none, this run 10"
            ),
            "{err}"
        );
    }
}
