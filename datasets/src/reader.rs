//! Reading LLaVA-format data files: a JSON list of samples or JSONL with one sample per line.
//!
//! A JSON syntax error in a list is fatal (the rest of the file cannot be trusted) and names the
//! file, line and column. In JSONL each line stands alone, so a bad line becomes a
//! [`ProblemKind::MalformedJson`] problem and reading goes on. Everything else wrong with a record
//! is a per-sample [`Problem`]. The list is read element by element, so the raw JSON of the whole
//! file is never held in memory; images are not read at all here.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::thread;

use anyhow::{bail, Context, Result};
use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde_json::Value;

use crate::image_io::{check_image, ImageCheck};
use crate::problem::{Problem, ProblemKind, SampleRef};
use crate::sample::{record_id, Sample};

/// The two file layouts LLaVA data comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON list of sample objects (LLaVA's `llava_v1_5_mix665k.json`).
    JsonList,
    /// One sample object per line.
    JsonLines,
}

/// A data file read into checked samples plus the problems of the records that were not usable.
#[derive(Debug, Clone)]
pub struct LlavaDataset {
    pub path: PathBuf,
    pub image_root: PathBuf,
    pub format: FileFormat,
    /// Records found in the file (usable or not).
    pub records: usize,
    /// Usable samples, in file order.
    pub samples: Vec<Sample>,
    /// One entry per record that is not in `samples`.
    pub problems: Vec<Problem>,
}

impl LlavaDataset {
    /// Read `path` (format from its first non-blank byte: `[` = JSON list, else JSONL),
    /// resolving image paths against `image_root`. Images are not opened.
    pub fn read(path: &Path, image_root: &Path) -> Result<LlavaDataset> {
        let format = detect_format(path)?;
        let mut samples = Vec::new();
        let mut problems = Vec::new();
        let mut records = 0usize;
        let mut accept = |record: Result<Value, String>, line: Option<usize>| {
            let index = records;
            records += 1;
            match record {
                Ok(record) => {
                    let reference = SampleRef {
                        index,
                        id: record_id(&record),
                        line,
                    };
                    match Sample::from_json(&record, reference, image_root) {
                        Ok(s) => samples.push(s),
                        Err(p) => problems.push(p),
                    }
                }
                Err(message) => {
                    let reference = SampleRef {
                        index,
                        id: None,
                        line,
                    };
                    problems.push(Problem::new(reference, ProblemKind::MalformedJson, message));
                }
            }
        };
        match format {
            FileFormat::JsonList => read_list(path, &mut accept)?,
            FileFormat::JsonLines => read_lines(path, &mut accept)?,
        }
        Ok(LlavaDataset {
            path: path.to_path_buf(),
            image_root: image_root.to_path_buf(),
            format,
            records,
            samples,
            problems,
        })
    }

    /// Check every image of every sample at `level`, moving samples with an unusable image to
    /// `problems`. Runs on `threads` threads; `progress` is called with the number of samples done.
    pub fn verify_images(
        &mut self,
        level: ImageCheck,
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) {
        if level == ImageCheck::None {
            return;
        }
        let threads = threads.max(1);
        let samples = std::mem::take(&mut self.samples);
        let chunk = samples.len().div_ceil(threads).max(1);
        let verdicts: Vec<Option<Problem>> = thread::scope(|scope| {
            let handles: Vec<_> = samples
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|s| {
                                let verdict = s
                                    .images
                                    .iter()
                                    .find_map(|p| check_image(p, level).err())
                                    .map(|fault| {
                                        Problem::new(
                                            s.reference.clone(),
                                            fault.kind,
                                            format!("image {}: {}", fault.path, fault.reason),
                                        )
                                    });
                                progress(1);
                                verdict
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for (sample, verdict) in samples.into_iter().zip(verdicts) {
            match verdict {
                Some(p) => self.problems.push(p),
                None => self.samples.push(sample),
            }
        }
        self.problems.sort_by_key(|p| p.sample.index);
    }

    /// Number of images over all usable samples.
    pub fn image_count(&self) -> usize {
        self.samples.iter().map(|s| s.images.len()).sum()
    }
}

fn detect_format(path: &Path) -> Result<FileFormat> {
    let file =
        File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut buf = [0u8; 4096];
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("cannot read data file {}", path.display()))?;
        if n == 0 {
            bail!("data file {} is empty", path.display());
        }
        if let Some(&b) = buf[..n]
            .iter()
            .find(|b| !b.is_ascii_whitespace() && **b != 0xEF && **b != 0xBB && **b != 0xBF)
        {
            return Ok(if b == b'[' {
                FileFormat::JsonList
            } else {
                FileFormat::JsonLines
            });
        }
    }
}

/// A serde_json error as "line L, column C: message" (serde's own text repeats the position).
pub(crate) struct JsonErrorAt<'a>(pub &'a serde_json::Error);

impl fmt::Display for JsonErrorAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.0.line(),
            self.0.column(),
            message_of(self.0)
        )
    }
}

/// Every record of the LLaVA file `path` in file order as parsed (`None` where its JSON is
/// malformed), to write a subset of the file back unchanged.
pub fn raw_records(path: &Path) -> Result<Vec<Option<Value>>> {
    let mut records = Vec::new();
    let mut accept = |record: Result<Value, String>, _: Option<usize>| records.push(record.ok());
    match detect_format(path)? {
        FileFormat::JsonList => read_list(path, &mut accept)?,
        FileFormat::JsonLines => read_lines(path, &mut accept)?,
    }
    Ok(records)
}

/// A record as parsed, or the message saying why its JSON is malformed.
type Accept<'a> = &'a mut dyn FnMut(Result<Value, String>, Option<usize>);

fn read_list(path: &Path, accept: Accept) -> Result<()> {
    struct Elements<'a>(Accept<'a>);
    impl<'de> Visitor<'de> for Elements<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON list of samples")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while let Some(v) = seq.next_element::<Value>()? {
                (self.0)(Ok(v), None);
            }
            Ok(())
        }
    }
    let file =
        File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(1 << 20, file));
    de.deserialize_seq(Elements(accept))
        .and_then(|()| de.end())
        .map_err(|e| {
            anyhow::anyhow!(
                "malformed JSON in {} at {}",
                path.display(),
                JsonErrorAt(&e)
            )
        })
}

/// Feeds every non-blank line to `accept`, parsed or with the reason it is malformed.
fn read_lines(path: &Path, accept: Accept) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    for (i, line) in BufReader::with_capacity(1 << 20, file).lines().enumerate() {
        let line_no = i + 1;
        let line =
            line.with_context(|| format!("cannot read {} line {line_no}", path.display()))?;
        let text = line.trim_start_matches('\u{feff}');
        if text.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(text).map_err(|e| {
            format!(
                "malformed JSON in {} at line {line_no}, column {}: {}",
                path.display(),
                e.column(),
                message_of(&e)
            )
        });
        accept(parsed, Some(line_no));
    }
    Ok(())
}

/// serde_json's message without the " at line L column C" it appends.
fn message_of(e: &serde_json::Error) -> String {
    let text = e.to_string();
    text.rsplit_once(" at line ")
        .map(|(m, _)| m.to_string())
        .unwrap_or(text)
}
