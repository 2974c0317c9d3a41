//! One `mmkd distill-data` run: every image under the image root is asked the recipe's
//! prompts, the replies are filtered, and the kept rounds become one LLaVA conversation per
//! image in `OUT/data.json`, with `OUT/manifest.json` accounting for every prompt.
//!
//! Images are handled in chunks; each finished chunk is written atomically to `OUT/progress/`,
//! so a killed run started again with the same job keeps them and goes on after them. The data
//! file and the manifest are written last (the manifest after the data), each atomically, and
//! the progress directory removed: `OUT` holds a finished run exactly when it has a manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::ProgressBar;
use mmkd_datasets::atomic::write_atomically;
use mmkd_datasets::{check_image, ImageCheck};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::filters::{accept, DuplicateFilter, Reject, RejectCounts, Written};
use super::logprobs::{ApiCache, SampleRows};
use super::recipe::Recipe;
use super::teacher::{conversation, DataTeacher, SpanCheck, TeacherRequest};
use crate::checkpoint::lock::OutputLock;
use crate::teacher_cache::digest::digest_str;

pub const DATA_FILE: &str = "data.json";
pub const MANIFEST_FILE: &str = "manifest.json";
const PROGRESS_DIR: &str = "progress";
const JOB_FILE: &str = "job.json";
pub const CACHE_DIR: &str = "teacher-cache";
/// Messages of failed requests and undecodable images kept in the manifest.
const KEPT_MESSAGES: usize = 20;
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "gif", "webp"];

/// Work done once the data file is written; its value goes into the manifest.
pub type AfterData<'a> = &'a dyn Fn(&Path) -> Result<Value>;

/// What to generate.
pub struct JobRequest<'a> {
    pub teacher: &'a DataTeacher,
    pub recipe: &'a Recipe,
    pub images: PathBuf,
    pub out: PathBuf,
    /// Only the first images (in path order).
    pub limit: Option<usize>,
    /// Images per saved chunk (and per generation round).
    pub chunk_images: usize,
    /// The supervised-span check (`None`: no model to tokenize with).
    pub span_check: Option<&'a SpanCheck>,
    /// Ask the teacher for token log-probabilities (the log-prob filter reads them).
    pub logprobs: bool,
    /// Keep a server's `top_logprobs` as a teacher cache (one question a record).
    pub api_cache: Option<&'a ApiCache<'a>>,
    /// Runs after the data file is written, before the manifest (the teacher cache); its
    /// value goes into the manifest.
    pub after_data: Option<AfterData<'a>>,
    /// Finish with an empty data file when nothing is kept (a self-improving model that is
    /// sure of nothing), instead of failing.
    pub allow_empty: bool,
    pub progress: bool,
}

/// What one chunk of images gave.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ChunkResult {
    records: Vec<Value>,
    prompts: usize,
    kept: usize,
    filtered: RejectCounts,
    undecodable: Vec<String>,
    without_samples: usize,
    errors: Vec<String>,
    /// With an API cache: the rows of each record.
    #[serde(default)]
    rows: Vec<SampleRows>,
}

/// What a run reports (and its manifest records).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub out: PathBuf,
    pub recipe: String,
    pub images: usize,
    /// Images of chunks kept from an interrupted run.
    pub images_resumed: usize,
    pub undecodable: usize,
    pub images_without_samples: usize,
    pub records: usize,
    pub prompts: usize,
    pub kept: usize,
    pub filtered: RejectCounts,
    /// The first failed requests and undecodable images, named.
    pub messages: Vec<String>,
    pub span_check: bool,
    pub seconds: f64,
    pub prompts_per_s: f64,
}

/// Runs (or finishes) the job.
pub fn run(req: &JobRequest<'_>) -> Result<Summary> {
    let started = Instant::now();
    ensure!(req.chunk_images >= 1, "--chunk-images must be at least 1");
    let images = list_images(&req.images, req.limit)?;
    let job = job_identity(req, &images)?;
    let progress_dir = req.out.join(PROGRESS_DIR);
    check_output(&req.out, &job)?;
    let _lock = OutputLock::acquire(&req.out)?;
    std::fs::create_dir_all(&progress_dir)
        .with_context(|| format!("creating {}", progress_dir.display()))?;
    write_atomically(
        &progress_dir.join(JOB_FILE),
        serde_json::to_string_pretty(&job)?.as_bytes(),
    )?;

    let chunks: Vec<&[PathBuf]> = images.chunks(req.chunk_images).collect();
    let chunk_path = |c: usize| progress_dir.join(format!("chunk-{c:05}.json"));
    let done = (0..chunks.len())
        .take_while(|&c| chunk_path(c).exists())
        .count();
    let resumed: usize = chunks[..done].iter().map(|c| c.len()).sum();
    let bar = crate::progress::count_bar(
        req.progress,
        "distill-data",
        "images",
        images.len(),
        resumed,
    );
    let fault_after = std::env::var("MMKD_FAULT_EXIT_AFTER_CHUNK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    // Prompts this run sent (not those of resumed chunks).
    let mut sent = 0;
    for (c, chunk) in chunks.iter().enumerate().skip(done) {
        let first = c * req.chunk_images;
        let result = generate_chunk(req, chunk, first, &bar)?;
        sent += result.prompts;
        write_atomically(&chunk_path(c), serde_json::to_string(&result)?.as_bytes())?;
        bar.inc(chunk.len() as u64);
        if fault_after == Some(c + 1 - done) {
            // A test's stand-in for a kill: no destructor, no cleanup.
            // SAFETY: _exit ends the process at once, which is the point.
            unsafe { libc::_exit(137) };
        }
    }
    bar.finish_and_clear();

    let mut all = ChunkResult::default();
    for c in 0..chunks.len() {
        let path = chunk_path(c);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let part: ChunkResult = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a finished chunk (delete it)", path.display()))?;
        all.records.extend(part.records);
        all.prompts += part.prompts;
        all.kept += part.kept;
        for (k, n) in part.filtered {
            *all.filtered.entry(k).or_default() += n;
        }
        all.undecodable.extend(part.undecodable);
        all.without_samples += part.without_samples;
        all.errors.extend(part.errors);
        all.rows.extend(part.rows);
    }
    ensure!(
        !all.records.is_empty() || req.allow_empty,
        "the teacher wrote nothing usable for any of the {} images ({} prompts; dropped: {}){}",
        images.len(),
        all.prompts,
        describe_counts(&all.filtered),
        all.errors
            .first()
            .map(|e| format!("; first failure: {e}"))
            .unwrap_or_default()
    );
    let data = req.out.join(DATA_FILE);
    write_atomically(&data, json_lines(&all.records)?.as_bytes())?;
    let extra = match (req.after_data, req.api_cache) {
        (_, Some(cache)) => {
            Some(cache.write(&data, &req.images, &req.out.join(CACHE_DIR), &all.rows)?)
        }
        (Some(f), None) => Some(f(&data)?),
        (None, None) => None,
    };
    let mut messages: Vec<String> = all
        .undecodable
        .iter()
        .map(|u| format!("undecodable image {u}"))
        .collect();
    messages.extend(all.errors.iter().cloned());
    messages.truncate(KEPT_MESSAGES);
    let seconds = started.elapsed().as_secs_f64();
    let summary = Summary {
        out: req.out.clone(),
        recipe: req.recipe.name.clone(),
        images: images.len(),
        images_resumed: resumed,
        undecodable: all.undecodable.len(),
        images_without_samples: all.without_samples,
        records: all.records.len(),
        prompts: all.prompts,
        kept: all.kept,
        filtered: all.filtered,
        messages,
        span_check: req.span_check.is_some(),
        seconds,
        prompts_per_s: sent as f64 / seconds.max(1e-9),
    };
    let manifest = json!({
        "format_version": 1,
        "job": job,
        "recipe": req.recipe,
        "data": DATA_FILE,
        "summary": summary,
        "teacher_cache": extra,
    });
    write_atomically(
        &req.out.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    std::fs::remove_dir_all(&progress_dir)
        .with_context(|| format!("removing {}", progress_dir.display()))?;
    Ok(summary)
}

/// Asks the teacher about one chunk's images and keeps what passes the filters.
fn generate_chunk(
    req: &JobRequest<'_>,
    chunk: &[PathBuf],
    first: usize,
    bar: &ProgressBar,
) -> Result<ChunkResult> {
    let recipe = req.recipe;
    let n = recipe.generation.n_per_image;
    let mut result = ChunkResult::default();
    let mut asked = Vec::new();
    for (i, key) in chunk.iter().enumerate() {
        let path = req.images.join(key);
        if let Err(fault) = check_image(&path, ImageCheck::Decode) {
            // Said even without a progress bar (a hidden bar prints nothing).
            bar.suspend(|| eprintln!("warning: skipping image {}: {fault}", path.display()));
            result
                .undecodable
                .push(format!("{}: {fault}", path.display()));
            continue;
        }
        asked.push((first + i, key, path));
    }
    let plans: Vec<_> = asked
        .iter()
        .map(|(_, key, _)| recipe.plan(&key.to_string_lossy()))
        .collect();
    let requests: Vec<TeacherRequest> = asked
        .iter()
        .zip(&plans)
        .flat_map(|((index, _, path), plan)| {
            plan.iter().enumerate().map(move |(k, p)| TeacherRequest {
                image: path.clone(),
                text: p.request.clone(),
                seed: recipe.generation.seed.wrapping_add((index * n + k) as u64),
            })
        })
        .collect();
    let logprobs = match (req.api_cache, req.logprobs) {
        (Some(c), _) => Some(c.rows.k),
        (None, true) => Some(0),
        (None, false) => None,
    };
    let replies = req.teacher.answer(&requests, &recipe.generation, logprobs);
    let mut replies = replies.into_iter();
    for ((_, key, path), plan) in asked.iter().zip(&plans) {
        let mut rounds: Vec<Written> = Vec::new();
        let mut rows: Vec<SampleRows> = Vec::new();
        // Supervised tokens of the kept rounds (the span check's count to exceed).
        let mut supervised = 0;
        let mut duplicates = DuplicateFilter::new(recipe);
        for prompt in plan {
            result.prompts += 1;
            let reply = replies.next().context("a reply per request")?;
            let kept = match reply {
                Err(e) => {
                    result.errors.push(format!(
                        "{} ({:?}): {e:#}",
                        key.display(),
                        prompt.instruction
                    ));
                    Err(Reject::RequestFailed)
                }
                Ok(reply) => accept(recipe, prompt, &reply).and_then(|w| {
                    duplicates.admit(&w)?;
                    // With an API cache every round is its own record.
                    let (context, kept): (&[Written], usize) = if req.api_cache.is_some() {
                        (&[], 0)
                    } else {
                        (&rounds, supervised)
                    };
                    let now = match req.span_check {
                        Some(check) => check
                            .admits(path, context, kept, &w)
                            .ok_or(Reject::SupervisedSpan)?,
                        None => kept,
                    };
                    if let Some(cache) = req.api_cache {
                        let r = cache
                            .rows
                            .rows(key, &w, &reply.alternatives)
                            .ok_or(Reject::UnalignedLogprobs)?;
                        rows.push(r);
                    }
                    Ok((w, now))
                }),
            };
            match kept {
                Ok((w, now)) => {
                    result.kept += 1;
                    supervised = now;
                    rounds.push(w);
                }
                Err(reason) => *result.filtered.entry(reason).or_default() += 1,
            }
        }
        if rounds.is_empty() {
            result.without_samples += 1;
            continue;
        }
        if req.api_cache.is_some() {
            for (k, w) in rounds.iter().enumerate() {
                let mut r = record(recipe, key, std::slice::from_ref(w));
                r["id"] = json!(format!("{}-{k}", r["id"].as_str().unwrap_or("")));
                result.records.push(r);
            }
            result.rows.extend(rows);
        } else {
            result.records.push(record(recipe, key, &rounds));
        }
    }
    Ok(result)
}

/// One image's conversation as a LLaVA record (the image path relative to the image root).
fn record(recipe: &Recipe, key: &Path, rounds: &[Written]) -> Value {
    let sample = conversation(key, rounds.iter());
    let turns: Vec<Value> = sample
        .turns
        .iter()
        .map(|t| {
            let from = match t.role {
                mmkd_datasets::Role::Human => "human",
                mmkd_datasets::Role::Gpt => "gpt",
            };
            json!({"from": from, "value": t.value})
        })
        .collect();
    let stem = key.with_extension("").to_string_lossy().replace('/', "_");
    json!({
        "id": format!("{}-{stem}", recipe.name),
        "image": key.to_string_lossy(),
        "conversations": turns,
    })
}

/// A JSON list with one record per line.
fn json_lines(records: &[Value]) -> Result<String> {
    let mut text = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        text.push_str(&serde_json::to_string(r)?);
        text.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    text.push_str("]\n");
    Ok(text)
}

/// The image files under `root` (relative paths, sorted), the first `limit` of them.
pub fn list_images(root: &Path, limit: Option<usize>) -> Result<Vec<PathBuf>> {
    ensure!(
        root.is_dir(),
        "--images {}: not a directory of images",
        root.display()
    );
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
            {
                found.push(path.strip_prefix(root)?.to_path_buf());
            }
        }
    }
    found.sort();
    if let Some(n) = limit {
        found.truncate(n);
    }
    ensure!(
        !found.is_empty(),
        "--images {}: no image files ({}) under it",
        root.display(),
        IMAGE_EXTENSIONS.join(", ")
    );
    Ok(found)
}

/// Everything the output depends on; a resumed run must have the same.
fn job_identity(req: &JobRequest<'_>, images: &[PathBuf]) -> Result<Value> {
    let names: Vec<String> = images
        .iter()
        .map(|p| p.to_string_lossy().to_string())
        .collect();
    let root = req
        .images
        .canonicalize()
        .unwrap_or_else(|_| req.images.clone());
    Ok(json!({
        "recipe": {"name": req.recipe.name, "source": req.recipe.source, "digest": req.recipe.digest,
                   "generation": req.recipe.generation, "filters": req.recipe.filters},
        "teacher": req.teacher.identity()?,
        "images": root.display().to_string(),
        "image_list_digest": digest_str(&names.join("\n")),
        "chunk_images": req.chunk_images,
        "logprobs": req.logprobs,
        "api_logprobs": req.api_cache.map(|c| c.rows.k),
        "span_check": req.span_check.map(|c| json!({
            "template": c.template.name, "max_length": c.config.max_length,
        })),
    }))
}

/// Refuses an output directory that holds a finished run, another job's unfinished run, or
/// anything else.
fn check_output(out: &Path, job: &Value) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    ensure!(
        out.is_dir(),
        "--out {}: a file, not a directory",
        out.display()
    );
    let recipe_of = |v: &Value| {
        v["recipe"]["name"]
            .as_str()
            .or(v["job"]["recipe"]["name"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let manifest = out.join(MANIFEST_FILE);
    if manifest.exists() {
        let text = std::fs::read_to_string(&manifest).unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        bail!(
            "--out {} already holds a finished distill-data run (recipe {}): choose another \
             --out, or delete it to generate again",
            out.display(),
            recipe_of(&v)
        );
    }
    let job_file = out.join(PROGRESS_DIR).join(JOB_FILE);
    if job_file.exists() {
        let text = std::fs::read_to_string(&job_file)
            .with_context(|| format!("reading {}", job_file.display()))?;
        let previous: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if &previous == job {
            return Ok(());
        }
        let differs: Vec<&str> = [
            "recipe",
            "teacher",
            "images",
            "image_list_digest",
            "chunk_images",
            "logprobs",
            "span_check",
        ]
        .into_iter()
        .filter(|k| previous[k] != job[k])
        .collect();
        bail!(
            "--out {} holds an unfinished run of recipe {} with another {}: it is not \
             overwritten; resume it with the same settings, or choose another --out",
            out.display(),
            recipe_of(&previous),
            differs.join(", ")
        );
    }
    let foreign = std::fs::read_dir(out)?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name() != ".mmkd-lock");
    ensure!(
        !foreign,
        "--out {} exists and is not a distill-data run: choose another --out",
        out.display()
    );
    Ok(())
}

fn describe_counts(counts: &BTreeMap<Reject, usize>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, n)| format!("{} {n}", k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one-line report of a run.
pub fn describe(s: &Summary) -> String {
    format!(
        "distill-data {}: {} records from {} images ({} resumed, {} undecodable, {} without a \
         usable answer); {} of {} prompts kept, dropped: {}; wrote {}",
        s.recipe,
        s.records,
        s.images,
        s.images_resumed,
        s.undecodable,
        s.images_without_samples,
        s.kept,
        s.prompts,
        describe_counts(&s.filtered),
        s.out.join(DATA_FILE).display()
    )
}
