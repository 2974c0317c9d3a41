//! Writing a cache directory atomically and restartably, and reading it back memory-mapped.
//!
//! Writing happens in the hidden sibling `.NAME.partial/`: each shard is written to a
//! temporary file and renamed, then `progress.json` (the job's identity and the finished
//! shards) is replaced. An interrupted run restarted with the same job keeps the finished
//! shards and continues after them; a different job starts the partial directory afresh. The
//! manifest is written last and the directory renamed to NAME, so NAME is either absent or a
//! finished cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::manifest::{Manifest, ShardInfo, MANIFEST_FILE};
use super::shard::{Part, SampleRecord, SampleSlot, ShardBuffer, ShardReader};
use crate::distill::{TopKHost, TopKRows};

const PROGRESS_FILE: &str = "progress.json";

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    job: serde_json::Value,
    shards: Vec<ShardInfo>,
}

/// Writes a cache shard by shard.
pub struct CacheWriter {
    out: PathBuf,
    partial: PathBuf,
    shard_size: usize,
    progress: Progress,
    buffer: ShardBuffer,
}

fn partial_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} has no directory name", out.display()))?
        .to_string_lossy()
        .to_string();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.partial")))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}

/// Writes shard number `index` of a cache's `records` (top-`k`) into `dir` atomically.
pub fn write_shard_of(dir: &Path, index: usize, k: usize, records: &[SampleRecord]) -> Result<()> {
    let mut buffer = ShardBuffer::new(k);
    for record in records {
        buffer.push(record)?;
    }
    write_shard(dir, index, &buffer).map(|_| ())
}

fn shard_file(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

fn write_shard(dir: &Path, index: usize, buffer: &ShardBuffer) -> Result<ShardInfo> {
    let file = shard_file(index);
    let path = dir.join(&file);
    let tmp = path.with_extension("safetensors.tmp");
    if let Err(err) = buffer.write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(ShardInfo {
        file,
        samples: buffer.samples(),
        bytes: std::fs::metadata(&path)?.len(),
    })
}

/// What an interrupted cache build of `out` has kept: its finished shards and their samples.
pub fn describe_partial(out: &Path) -> String {
    let progress = partial_dir(out).ok().and_then(|partial| {
        let text = std::fs::read_to_string(partial.join(PROGRESS_FILE)).ok()?;
        let p = serde_json::from_str::<Progress>(&text).ok()?;
        Some((partial, p))
    });
    match progress {
        Some((partial, p)) => format!(
            "{} finished shard(s) with {} samples are kept in {}",
            p.shards.len(),
            p.shards.iter().map(|s| s.samples).sum::<usize>(),
            partial.display()
        ),
        None => "no shard was finished yet".into(),
    }
}

impl CacheWriter {
    /// Prepares to write the cache `out` for `job` (everything that determines its content).
    /// Returns the writer and how many samples (in the job's order) an interrupted run with
    /// the same job already cached.
    pub fn open(
        out: &Path,
        job: serde_json::Value,
        k: usize,
        shard_size: usize,
    ) -> Result<(CacheWriter, usize)> {
        ensure!(shard_size > 0, "--shard-size must be at least 1");
        if out.exists() {
            let empty = out.is_dir() && std::fs::read_dir(out)?.next().is_none();
            if out.join(MANIFEST_FILE).exists() {
                bail!(
                    "{} already holds a teacher cache: delete it or choose another --out",
                    out.display()
                );
            }
            ensure!(
                empty,
                "{} exists and is not a teacher cache: choose another --out",
                out.display()
            );
            std::fs::remove_dir(out)?;
        }
        let partial = partial_dir(out)?;
        let previous = std::fs::read_to_string(partial.join(PROGRESS_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<Progress>(&t).ok())
            .filter(|p| p.job == job && p.shards.iter().all(|s| partial.join(&s.file).exists()));
        let progress = match previous {
            Some(p) => p,
            None => {
                if partial.exists() {
                    std::fs::remove_dir_all(&partial)
                        .with_context(|| format!("removing {}", partial.display()))?;
                }
                std::fs::create_dir_all(&partial)
                    .with_context(|| format!("creating {}", partial.display()))?;
                let p = Progress {
                    job,
                    shards: Vec::new(),
                };
                write_atomic(&partial.join(PROGRESS_FILE), &serde_json::to_string(&p)?)?;
                p
            }
        };
        let done = progress.shards.iter().map(|s| s.samples).sum();
        Ok((
            CacheWriter {
                out: out.to_path_buf(),
                partial,
                shard_size,
                progress,
                buffer: ShardBuffer::new(k),
            },
            done,
        ))
    }

    pub fn push(&mut self, record: &SampleRecord) -> Result<()> {
        self.buffer.push(record)?;
        if self.buffer.samples() >= self.shard_size {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buffer.samples() == 0 {
            return Ok(());
        }
        let shard = write_shard(&self.partial, self.progress.shards.len(), &self.buffer)?;
        self.register(shard)?;
        self.buffer = ShardBuffer::new(self.buffer.k());
        Ok(())
    }

    /// Where the shards of cache `out` are written before it is moved into place (the
    /// processes of a data-parallel build write theirs there with [`write_shard_of`]).
    pub fn shards_dir(out: &Path) -> Result<PathBuf> {
        partial_dir(out)
    }

    /// Records shard `index` of `samples` samples, written by [`write_shard_of`]: shards are
    /// added in order, so the finished ones stay a prefix of the job's samples, which a
    /// resumed build continues after.
    pub fn add_shard(&mut self, index: usize, samples: usize) -> Result<()> {
        ensure!(
            index == self.progress.shards.len(),
            "shard {index} added out of order (after {} shards)",
            self.progress.shards.len()
        );
        let file = shard_file(index);
        let path = self.partial.join(&file);
        let bytes = std::fs::metadata(&path)
            .with_context(|| format!("shard {} was not written", path.display()))?
            .len();
        self.register(ShardInfo {
            file,
            samples,
            bytes,
        })
    }

    fn register(&mut self, shard: ShardInfo) -> Result<()> {
        self.progress.shards.push(shard);
        write_atomic(
            &self.partial.join(PROGRESS_FILE),
            &serde_json::to_string(&self.progress)?,
        )
    }

    /// Writes the last shard and the manifest (its `shards` filled in here), and moves the
    /// finished cache into place.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<Manifest> {
        self.flush()?;
        manifest.shards = self.progress.shards.clone();
        let cached: usize = manifest.shards.iter().map(|s| s.samples).sum();
        ensure!(
            cached == manifest.samples,
            "the shards hold {cached} samples, the manifest says {}",
            manifest.samples
        );
        write_atomic(
            &self.partial.join(MANIFEST_FILE),
            &serde_json::to_string_pretty(&manifest)?,
        )?;
        std::fs::remove_file(self.partial.join(PROGRESS_FILE))?;
        std::fs::rename(&self.partial, &self.out).with_context(|| {
            format!(
                "moving {} to {}",
                self.partial.display(),
                self.out.display()
            )
        })?;
        Ok(manifest)
    }
}

/// A finished cache, memory-mapped.
pub struct TeacherCache {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<ShardReader>,
    /// Record index → (shard, slot).
    lookup: HashMap<usize, (usize, usize)>,
}

/// One batch's teacher rows, lined up with the batch.
#[derive(Debug)]
pub struct CachedBatch {
    pub response: TopKRows,
    pub visual: TopKRows,
    /// One per batch row.
    pub relations: Vec<Option<Tensor>>,
    /// Flat row indices (`b·seq + t`) of the cached rows, to check against the batch's own.
    pub response_rows: Vec<u32>,
    pub visual_rows: Vec<u32>,
}

impl TeacherCache {
    /// Reads the manifest and maps every shard.
    pub fn open(dir: &Path) -> Result<TeacherCache> {
        let manifest = Manifest::read(dir)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut lookup = HashMap::new();
        for (s, info) in manifest.shards.iter().enumerate() {
            let reader = ShardReader::open(&dir.join(&info.file), manifest.top_k)?;
            ensure!(
                reader.slots.len() == info.samples,
                "teacher cache shard {} holds {} samples, its manifest says {}",
                reader.file(),
                reader.slots.len(),
                info.samples
            );
            for (i, slot) in reader.slots.iter().enumerate() {
                if lookup.insert(slot.index, (s, i)).is_some() {
                    bail!(
                        "teacher cache {}: record {} is stored twice",
                        dir.display(),
                        slot.index
                    );
                }
            }
            shards.push(reader);
        }
        ensure!(
            lookup.len() == manifest.samples,
            "teacher cache {}: the shards hold {} samples, the manifest says {}",
            dir.display(),
            lookup.len(),
            manifest.samples
        );
        Ok(TeacherCache {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            lookup,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, index: usize) -> bool {
        self.lookup.contains_key(&index)
    }

    fn slot(&self, index: usize, id: &str) -> Result<(&ShardReader, &SampleSlot)> {
        let &(s, i) = self.lookup.get(&index).with_context(|| {
            format!(
                "sample {id} (record {index} of the data) is not in teacher cache {}: it was written \
                 for other data or skipped the sample; rebuild it",
                self.dir.display()
            )
        })?;
        Ok((&self.shards[s], &self.shards[s].slots[i]))
    }

    /// Everything stored for one record.
    pub fn record(&self, index: usize, id: &str) -> Result<SampleRecord> {
        let (shard, slot) = self.slot(index, id)?;
        let k = self.manifest.top_k;
        let mut r = SampleRecord {
            index,
            response: TopKHost::empty(k),
            visual: TopKHost::empty(k),
            ..Default::default()
        };
        shard.read_rows(
            slot,
            Part::Response,
            &mut r.response_positions,
            &mut r.response,
        )?;
        shard.read_rows(slot, Part::Visual, &mut r.visual_positions, &mut r.visual)?;
        r.relation = shard.relation(slot)?;
        Ok(r)
    }

    /// The teacher rows of a batch: `samples[b]` = (record index, sample id) of batch row b,
    /// whose sequences are padded to `seq_len`.
    pub fn batch(
        &self,
        samples: &[(usize, &str)],
        seq_len: usize,
        device: &Device,
    ) -> Result<CachedBatch> {
        let k = self.manifest.top_k;
        let (mut response, mut visual) = (TopKHost::empty(k), TopKHost::empty(k));
        let (mut response_rows, mut visual_rows) = (Vec::new(), Vec::new());
        let mut relations = Vec::with_capacity(samples.len());
        for (b, &(index, id)) in samples.iter().enumerate() {
            let (shard, slot) = self.slot(index, id)?;
            let mut positions = Vec::new();
            shard.read_rows(slot, Part::Response, &mut positions, &mut response)?;
            let r_end = positions.len();
            shard.read_rows(slot, Part::Visual, &mut positions, &mut visual)?;
            for (i, &t) in positions.iter().enumerate() {
                ensure!(
                    (t as usize) < seq_len,
                    "sample {id}: the teacher cache has position {t}, the batch is {seq_len} long"
                );
                let row = u32::try_from(b * seq_len + t as usize)
                    .context("batch·seq exceeds u32 row indices")?;
                if i < r_end {
                    response_rows.push(row);
                } else {
                    visual_rows.push(row);
                }
            }
            relations.push(match shard.relation(slot)? {
                Some(values) => Some(Tensor::from_vec(
                    values,
                    (slot.relation_side, slot.relation_side),
                    device,
                )?),
                None => None,
            });
        }
        let vocab = self.manifest.vocab as u32;
        if let Some(bad) = response
            .ids
            .iter()
            .chain(&visual.ids)
            .find(|&&id| id >= vocab)
        {
            bail!(
                "teacher cache {}: token id {bad} outside the vocabulary of {vocab} (corrupt shard?)",
                self.dir.display()
            );
        }
        Ok(CachedBatch {
            response: response.to_tensors(device)?,
            visual: visual.to_tensors(device)?,
            relations,
            response_rows,
            visual_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher_cache::manifest::{RunIdentity, TeacherIdentity, FORMAT_VERSION};

    const K: usize = 3;
    const VOCAB: usize = 10;

    /// A record with `r` response rows, `v` visual rows and values derived from `index`.
    fn record(index: usize, r: usize, v: usize) -> SampleRecord {
        let top = |rows: usize, salt: usize| TopKHost {
            k: K,
            ids: (0..rows * K)
                .map(|i| ((i + index + salt) % VOCAB) as u32)
                .collect(),
            log_probs: (0..rows * K).map(|i| -(i as f32) - index as f32).collect(),
            rest: (0..rows).map(|i| -10.0 - i as f32).collect(),
        };
        SampleRecord {
            index,
            response_positions: (0..r as u32).map(|t| 2 * t + 1).collect(),
            response: top(r, 0),
            visual_positions: (0..v as u32).collect(),
            visual: top(v, 5),
            relation: (v > 0).then(|| (0..v * v).map(|i| i as f32 + index as f32).collect()),
        }
    }

    fn manifest(samples: usize) -> Manifest {
        Manifest {
            run: RunIdentity {
                format_version: FORMAT_VERSION,
                stage_kind: "chat".into(),
                data_digest: "d".into(),
                images: "i".into(),
                template: "t".into(),
                template_digest: "td".into(),
                tokenizer_digest: "tk".into(),
                processor_digest: "p".into(),
                max_length: 32,
                temperature: 1.0,
                truncate_vocab: None,
                teacher_routings: 1,
                routing_seed: 0,
            },
            teacher: TeacherIdentity {
                path: "teacher".into(),
                digest: "x".into(),
            },
            top_k: K,
            vocab: VOCAB,
            image_token_id: 1,
            tokens_per_image: 2,
            relations: true,
            visual: true,
            data: "data.json".into(),
            samples,
            response_positions: 0,
            visual_positions: 0,
            skipped: Default::default(),
            shards: Vec::new(),
        }
    }

    fn records() -> Vec<SampleRecord> {
        // Record indices with a gap (a skipped record), text-only samples, several shards.
        [(0, 3, 2), (1, 1, 0), (3, 0, 4), (4, 2, 2), (5, 4, 0)]
            .iter()
            .map(|&(i, r, v)| record(i, r, v))
            .collect()
    }

    fn write(out: &Path) -> Manifest {
        let (mut w, done) = CacheWriter::open(out, serde_json::json!({"job": 1}), K, 2).unwrap();
        assert_eq!(done, 0);
        for r in records() {
            w.push(&r).unwrap();
        }
        w.finish(manifest(5)).unwrap()
    }

    #[test]
    fn shards_round_trip_through_the_mmapped_reader() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cache");
        let m = write(&out);
        assert_eq!(m.shards.len(), 3);
        assert!(!dir.path().join(".cache.partial").exists());
        let cache = TeacherCache::open(&out).unwrap();
        assert_eq!(cache.manifest(), &m);
        for r in records() {
            assert_eq!(cache.record(r.index, "s").unwrap(), r);
        }
        assert!(!cache.contains(2));
    }

    #[test]
    fn shuffled_batches_look_rows_up_by_record_index() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cache");
        write(&out);
        let cache = TeacherCache::open(&out).unwrap();
        let seq = 12;
        let batch = cache
            .batch(&[(4, "d"), (0, "a"), (1, "b")], seq, &Device::Cpu)
            .unwrap();
        let (r4, r0, r1) = (record(4, 2, 2), record(0, 3, 2), record(1, 1, 0));
        let mut rows = Vec::new();
        for (b, r) in [&r4, &r0, &r1].iter().enumerate() {
            rows.extend(r.response_positions.iter().map(|t| (b * seq) as u32 + t));
        }
        assert_eq!(batch.response_rows, rows);
        assert_eq!(batch.visual_rows, vec![0, 1, 12, 13]);
        let mut want = r4.response.clone();
        want.extend(&r0.response).unwrap();
        want.extend(&r1.response).unwrap();
        assert_eq!(
            batch.response.ids.to_vec2::<u32>().unwrap().concat(),
            want.ids
        );
        assert_eq!(batch.response.rest.to_vec1::<f32>().unwrap(), want.rest);
        assert_eq!(
            batch.relations[1]
                .as_ref()
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![0.0, 1.0], vec![2.0, 3.0]]
        );
        assert!(batch.relations[2].is_none());
        let err = cache
            .batch(&[(0, "a"), (2, "sample-two")], seq, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("sample sample-two (record 2 of the data) is not in teacher cache"),
            "{err}"
        );
    }

    #[test]
    fn an_interrupted_write_keeps_finished_shards_and_is_never_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cache");
        let job = serde_json::json!({"job": 1});
        {
            let (mut w, _) = CacheWriter::open(&out, job.clone(), K, 2).unwrap();
            for r in &records()[..3] {
                w.push(r).unwrap();
            }
            // Dropped without `finish`: one shard of 2 samples written, 1 sample lost.
        }
        assert!(!out.exists());
        let err = TeacherCache::open(&out).err().unwrap().to_string();
        assert!(err.contains("does not exist"), "{err}");
        let (mut w, done) = CacheWriter::open(&out, job, K, 2).unwrap();
        assert_eq!(done, 2);
        for r in &records()[done..] {
            w.push(r).unwrap();
        }
        w.finish(manifest(5)).unwrap();
        let cache = TeacherCache::open(&out).unwrap();
        for r in records() {
            assert_eq!(cache.record(r.index, "s").unwrap(), r);
        }
        // A finished cache is never overwritten; another job restarts the partial directory.
        let err = CacheWriter::open(&out, serde_json::json!({}), K, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already holds a teacher cache"), "{err}");
        let other = dir.path().join("other");
        {
            let (mut w, _) = CacheWriter::open(&other, serde_json::json!({"a": 1}), K, 1).unwrap();
            w.push(&records()[0]).unwrap();
        }
        let (_, done) = CacheWriter::open(&other, serde_json::json!({"a": 2}), K, 1).unwrap();
        assert_eq!(done, 0);
    }

    #[test]
    fn missing_manifest_shard_or_garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cache");
        write(&out);
        let shard = out.join("shard-00001.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", TeacherCache::open(&out).err().unwrap());
        assert!(
            err.contains("shard-00001.safetensors is unreadable"),
            "{err}"
        );
        std::fs::remove_file(&shard).unwrap();
        let err = format!("{:#}", TeacherCache::open(&out).err().unwrap());
        assert!(err.contains("shard-00001.safetensors is missing"), "{err}");
        std::fs::write(out.join(MANIFEST_FILE), "{not json").unwrap();
        let err = format!("{:#}", TeacherCache::open(&out).err().unwrap());
        assert!(err.contains("not a teacher-cache manifest"), "{err}");
        std::fs::remove_file(out.join(MANIFEST_FILE)).unwrap();
        let err = format!("{:#}", TeacherCache::open(&out).err().unwrap());
        assert!(err.contains("is incomplete (no manifest.json)"), "{err}");
    }
}
