//! Resumable training state: periodic checkpoints under `OUT/checkpoints/step-NNNNNNNN/`, each a
//! loadable model directory plus `optimizer.safetensors` and `trainer_state.json`, written
//! atomically (temporary directory + rename) with the last K kept.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mmkd_datasets::Cursor;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{filled_temp_sibling, replace_dir, write_llava_files, SaveAssets};
use crate::models::llava::LlavaModel;
use crate::train::AdamW;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The objective's own trained parameters (e.g. hidden-state projections): training state,
/// not part of the model.
pub const OBJECTIVE_FILE: &str = "objective.safetensors";

/// Everything besides weights and moments that a resumed run needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub stage: String,
    /// Optimizer steps taken.
    pub step: usize,
    pub total_steps: usize,
    /// Where the next batch comes from.
    pub cursor: Cursor,
    pub samples_seen: usize,
    /// Digest of the resolved settings, so a resume with other settings is refused.
    pub settings_digest: String,
    /// How the job that wrote it split its global batch (absent: one process, or a build
    /// before data-parallel training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<BatchLayout>,
}

/// How a step's global batch is split: ranks × micro-batches per rank × samples each.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchLayout {
    pub ranks: usize,
    pub grad_accum: usize,
    pub batch_size: usize,
}

impl BatchLayout {
    /// Samples per optimizer step over the job.
    pub fn global_batch(&self) -> usize {
        self.ranks * self.grad_accum * self.batch_size
    }
}

impl std::fmt::Display for BatchLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rank(s) × grad_accum {} × batch_size {} (global batch {})",
            self.ranks,
            self.grad_accum,
            self.batch_size,
            self.global_batch()
        )
    }
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn step_dir(out: &Path, step: usize) -> PathBuf {
    checkpoints_dir(out).join(format!("step-{step:08}"))
}

/// Writes a LLaVA stage's checkpoint atomically and prunes old ones.
pub fn save_checkpoint(
    out: &Path,
    model: &LlavaModel,
    assets: SaveAssets<'_>,
    optimizer: &AdamW,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    save_checkpoint_with(
        out,
        |dir| write_llava_files(model, dir, assets),
        optimizer,
        state,
        keep_last,
    )
}

/// Writes a checkpoint atomically (the model's files by `write_model`, then the optimizer and
/// the state) and prunes old ones.
pub fn save_checkpoint_with(
    out: &Path,
    write_model: impl FnOnce(&Path) -> Result<()>,
    optimizer: &AdamW,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let final_dir = step_dir(out, state.step);
    remove_abandoned_temporaries(&checkpoints_dir(out))?;
    let tmp = filled_temp_sibling(&final_dir, |tmp| {
        write_model(tmp)?;
        optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
        let path = tmp.join(STATE_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(state)?)
            .with_context(|| format!("writing {}", path.display()))
    })
    .with_context(|| format!("writing the checkpoint {}", final_dir.display()))?;
    replace_dir(&tmp, &final_dir)?;
    prune(out, keep_last.max(1))?;
    Ok(final_dir)
}

/// Half-written checkpoints a killed run left behind (`.step-N.tmp-PID`): the caller holds the
/// output's lock, so no live run is writing them, and on a full disk they are space to win back.
fn remove_abandoned_temporaries(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let ours = format!(".tmp-{}", std::process::id());
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(".step-") && name.contains(".tmp-") && !name.ends_with(&ours) {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the abandoned {}", path.display()))?;
        }
    }
    Ok(())
}

fn list_checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoints_dir(out);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        // Only complete checkpoints have their state file (it is written last, before the rename).
        if path.join(STATE_FILE).exists() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

fn prune(out: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(out)?;
    let excess = all.len().saturating_sub(keep);
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(out)?.pop().map(|(_, p)| p))
}

/// "the last good checkpoint is DIR", or that none was written yet: for a stopped run's message.
pub fn describe_last_checkpoint(out: &Path) -> Result<String> {
    Ok(latest_checkpoint(out)?
        .map(|p| format!("the last good checkpoint is {}", p.display()))
        .unwrap_or_else(|| "no checkpoint was written yet".into()))
}

/// A run's error, explained when the storage caused it (a full disk, a read-only `out`): what
/// was kept and how to resume.
pub fn explain_storage_fault(err: anyhow::Error, out: &Path) -> anyhow::Error {
    let kept = || describe_last_checkpoint(out).unwrap_or_else(|e| format!("{e:#}"));
    crate::checkpoint::storage::explain(
        err,
        out,
        kept,
        "continue with the same command and --resume",
    )
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", path.display()))
}

/// A stable digest of a JSON value (FNV-1a over its canonical text).
pub fn digest(value: &serde_json::Value) -> String {
    let text = value.to_string();
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in text.as_bytes() {
        hash ^= *b as u64;
        hash = hash.wrapping_mul(0x100000001b3);
    }
    format!("{hash:016x}")
}
