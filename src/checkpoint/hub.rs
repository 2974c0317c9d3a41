//! Resolving `MODEL` arguments: a local directory, or a Hugging Face Hub id (`org/name`) fetched
//! through hf-hub's cache. `HF_HOME` and `HF_HUB_OFFLINE=1` are respected.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

const OPTIONAL: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution.
fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").ok().as_deref(),
        Some("1" | "true" | "TRUE" | "yes" | "ON" | "on")
    )
}

fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// A local model directory for `spec`: the directory itself, or the hub snapshot holding the
/// checkpoint's files (downloaded unless offline).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!(
            "model `{spec}` is a file; expected a checkpoint directory or a hub id like `org/name`"
        );
    }
    if !looks_like_repo_id(spec) {
        bail!("model directory `{spec}` does not exist (and it is not a hub id like `org/name`)");
    }
    let fetcher = Fetcher::new(spec)?;
    let config = fetcher.fetch("config.json", true)?.expect("required file");
    for name in OPTIONAL {
        fetcher.fetch(name, false)?;
    }
    // Weights: an index and its shards, or one file.
    if let Some(index) = fetcher.fetch(mmkd_nn::weights::SAFETENSORS_INDEX, false)? {
        let text = std::fs::read_to_string(&index)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("invalid JSON in {}", index.display()))?;
        let mut shards: Vec<String> = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for shard in shards {
            fetcher.fetch(&shard, true)?;
        }
    } else {
        fetcher.fetch(mmkd_nn::weights::SAFETENSORS_SINGLE, true)?;
    }
    Ok(config
        .parent()
        .context("hub cache path has no parent")?
        .to_path_buf())
}

struct Fetcher {
    repo_id: String,
    cache: Cache,
}

impl Fetcher {
    fn new(repo_id: &str) -> Result<Self> {
        Ok(Self {
            repo_id: repo_id.to_string(),
            cache: Cache::from_env(),
        })
    }

    /// The local path of `file`, from the cache or downloaded. `Ok(None)` for an optional file
    /// that the repo does not have.
    fn fetch(&self, file: &str, required: bool) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cache.model(self.repo_id.clone()).get(file) {
            return Ok(Some(path));
        }
        if offline() {
            if required {
                bail!(
                    "`{file}` of hub model `{}` is not in the local cache ({}) and HF_HUB_OFFLINE is set",
                    self.repo_id,
                    self.cache.path().display()
                );
            }
            return Ok(None);
        }
        let api = ApiBuilder::from_cache(self.cache.clone())
            .with_progress(true)
            .build()
            .context("cannot set up the Hugging Face Hub client")?;
        match api.model(self.repo_id.clone()).get(file) {
            Ok(path) => Ok(Some(path)),
            Err(e) if required => Err(anyhow::anyhow!(
                "cannot fetch `{file}` of hub model `{}`: {e}. It is not in the local cache ({}); \
                 check the network or the repo id, or pass a local checkpoint directory",
                self.repo_id,
                self.cache.path().display()
            )),
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_missing_dirs() {
        assert!(looks_like_repo_id("Qwen/Qwen1.5-0.5B"));
        assert!(!looks_like_repo_id("./runs/x"));
        assert!(!looks_like_repo_id("a/b/c"));
        let err = resolve_model("/definitely/not/here")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
