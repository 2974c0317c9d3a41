//! A run's output directory: what `--resume` continues from, and claiming the directory for a
//! fresh run without ever mixing an earlier run's work into this one's (`--force` replaces it).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::SUMMARY_FILE;
use crate::train::state::{
    checkpoints_dir, latest_checkpoint, read_state, BatchLayout, TrainerState,
};

/// `--out` with the run's `--resume` and `--force`.
#[derive(Clone, Copy, Debug)]
pub struct OutputDir<'a> {
    pub path: &'a Path,
    pub resume: bool,
    pub force: bool,
}

impl OutputDir<'_> {
    /// The checkpoint `--resume` continues from (refused when it was written with other
    /// settings: `digest`), or `None` for a fresh run (refused when the directory holds an
    /// earlier run's checkpoints).
    /// A job of another batch layout than the checkpoint's is refused naming both, unless its
    /// global batch is the same (another number of ranks, the same steps).
    pub fn resume_point(
        &self,
        digest: &str,
        layout: Option<BatchLayout>,
    ) -> Result<Option<(PathBuf, TrainerState)>> {
        if !self.resume {
            if !self.force && latest_checkpoint(self.path)?.is_some() {
                bail!(
                    "{} holds checkpoints of an earlier run: pass --resume to continue it, \
                     --force to start over, or choose another --out",
                    self.path.display()
                );
            }
            return Ok(None);
        }
        let ckpt = latest_checkpoint(self.path)?.with_context(|| {
            format!(
                "--resume: no complete checkpoint in {}",
                checkpoints_dir(self.path).display()
            )
        })?;
        let state = read_state(&ckpt)?;
        if let (Some(was), Some(now)) = (state.layout, layout) {
            if was.global_batch() != now.global_batch() {
                bail!(
                    "--resume: {} was written by {was}; this run is {now}: a checkpoint resumes \
                     on another number of ranks only with the same global batch (set \
                     train.grad_accum so that ranks × grad_accum × batch_size = {})",
                    ckpt.display(),
                    was.global_batch()
                );
            }
        }
        anyhow::ensure!(
            state.settings_digest == digest,
            "--resume: {} was written with other settings, data or models; resume with the same \
             command",
            ckpt.display()
        );
        Ok(Some((ckpt, state)))
    }

    /// Makes the directory this run's, once every input has been checked and before anything
    /// is written: a finished stage there is refused, and with `--force` it and an earlier run's
    /// checkpoints are removed first, so nothing of them can be taken for this run's.
    pub fn claim(&self) -> Result<()> {
        if self.resume {
            return Ok(());
        }
        let summary = self.path.join(SUMMARY_FILE);
        if !self.force {
            if summary.exists() {
                bail!(
                    "{} holds a finished stage (its summary.json): choose another --out, or pass \
                     --force to train again and replace it",
                    self.path.display()
                );
            }
            return Ok(());
        }
        let old_checkpoints = checkpoints_dir(self.path);
        if old_checkpoints.exists() {
            std::fs::remove_dir_all(&old_checkpoints)
                .with_context(|| format!("removing {}", old_checkpoints.display()))?;
        }
        if summary.exists() {
            std::fs::remove_file(&summary)
                .with_context(|| format!("removing {}", summary.display()))?;
        }
        Ok(())
    }
}
