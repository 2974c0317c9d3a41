//! The offline teacher cache: a frozen teacher's outputs computed once (`mmkd teacher-cache`)
//! so that DPT/DFT (`--teacher-cache`) train without loading or running it.
//!
//! Per sample it keeps, at the positions MDist reads (response positions: label t + 1
//! supervised; visual positions: image tokens), the teacher's top-k token ids, their
//! log-probabilities at the distillation temperature and the log of the remaining mass
//! ([`crate::distill::topk`]), and for RDist the teacher's visual relation matrix Z Zᵀ.
//! Samples are keyed by their record index in the data file, so shuffled batches look rows up.
//!
//! - [`manifest`]: `manifest.json` and the identity checks (data, template, tokenizer, image
//!   preprocessing, max length, stage kind, temperature, vocabulary cut, teacher digest).
//! - [`shard`]: the safetensors shard layout, written whole and read memory-mapped.
//! - [`store`]: atomic, restartable writing of a cache directory and reading it back.
//!
//! Writing a cache is `crate::teacher::cache_writer` (the online teacher plus this store).
//! - [`digest`]: content digests.

pub mod digest;
pub mod manifest;
pub mod shard;
pub mod store;

use std::path::Path;

use anyhow::{Context, Result};

pub use manifest::{check_run, Manifest, RunIdentity, TeacherIdentity, FORMAT_VERSION};
pub use shard::SampleRecord;
pub use store::{write_shard_of, CacheWriter, CachedBatch, TeacherCache};

use digest::digest_checkpoint;

/// The identity of a teacher checkpoint directory.
pub fn teacher_identity(dir: &Path) -> Result<TeacherIdentity> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    Ok(TeacherIdentity {
        path: dir.display().to_string(),
        digest: digest_checkpoint(&dir)
            .with_context(|| format!("teacher checkpoint {}", dir.display()))?,
    })
}

/// Refuses a cache whose teacher checkpoint has changed since (retrained or replaced in
/// place). A teacher that is no longer there cannot be checked: the cache is self-contained,
/// so it is used, with a note.
pub fn check_teacher_unchanged(cache: &Path, teacher: &TeacherIdentity) -> Result<()> {
    let dir = Path::new(&teacher.path);
    if !dir.join("config.json").exists() && !crate::checkpoint::adapter::is_adapter(dir) {
        eprintln!(
            "note: teacher cache {}: its teacher {} is not here to verify; using the cache as written",
            cache.display(),
            teacher.path
        );
        return Ok(());
    }
    let now = digest_checkpoint(dir)?;
    anyhow::ensure!(
        now == teacher.digest,
        "teacher cache {} is stale: `teacher` {} had digest {} when the cache was written, it has {} \
         now (retrained or replaced); rebuild the cache with `mmkd teacher-cache`",
        cache.display(),
        teacher.path,
        teacher.digest,
        now
    );
    Ok(())
}
