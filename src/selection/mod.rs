//! Task-driven data selection (issue 19, part 5): score every sample of a data set by a
//! criterion read from a teacher and/or a student — their divergence at the answer tokens, the
//! teacher's confidence in the answer, the student's loss on it — and keep the highest-scoring
//! share, to train on a fraction of the data (`mmkd data select`).

pub mod scores;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use mmkd_datasets::atomic::write_atomically;

use crate::batch::{prepare_data, training_tokenize_config, ModelInputs};
use crate::checkpoint::LoadedModel;
use crate::models::llava::{BuildOptions, ImageInput, Trainable};
pub use scores::{has_answer, per_sample_scores, random_score, Criterion};

/// How many samples to keep.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    Count(usize),
    /// A share of the scored samples, in percent (rounded, at least one).
    Percent(f64),
}

impl std::str::FromStr for Budget {
    type Err = anyhow::Error;

    /// `N` samples or `P%` of them.
    fn from_str(text: &str) -> Result<Self> {
        let budget = match text.trim().strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .with_context(|| format!("--budget {text}: not a percentage"))?;
                ensure!(
                    p > 0.0 && p <= 100.0,
                    "--budget {text}: a percentage must be in (0, 100]"
                );
                Budget::Percent(p)
            }
            None => {
                let n: usize = text
                    .trim()
                    .parse()
                    .with_context(|| format!("--budget {text}: not a count (N) or a share (P%)"))?;
                ensure!(n > 0, "--budget must keep at least one sample");
                Budget::Count(n)
            }
        };
        Ok(budget)
    }
}

impl Budget {
    /// Samples kept of `scored`.
    pub fn of(self, scored: usize) -> usize {
        match self {
            Budget::Count(n) => n.min(scored),
            Budget::Percent(p) => ((scored as f64 * p / 100.0).round() as usize).clamp(1, scored),
        }
    }
}

pub struct SelectRequest {
    pub teacher: Option<String>,
    pub student: Option<String>,
    pub data: PathBuf,
    pub images: PathBuf,
    pub criterion: Criterion,
    pub budget: Budget,
    /// Conversation template (default: the scoring model's recorded one, else `plain`).
    pub template: Option<String>,
    pub batch_size: usize,
    pub max_length: usize,
    /// Seed of the `random` criterion.
    pub seed: u64,
    pub out: PathBuf,
    pub force: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// One sample's score.
#[derive(Clone, Debug, Serialize)]
pub struct SampleScore {
    pub id: String,
    /// Its record's position in the data file.
    pub index: usize,
    pub score: f64,
    pub selected: bool,
}

/// What `data select` did (also written next to the output as `<out>.selection.json`).
#[derive(Debug, Serialize)]
pub struct Selection {
    pub criterion: Criterion,
    pub budget: Budget,
    pub teacher: Option<String>,
    pub student: Option<String>,
    pub data: String,
    pub records: usize,
    pub scored: usize,
    pub selected: usize,
    /// Records not scored, by reason (unreadable, over-long, no answer token, …).
    pub skipped: std::collections::BTreeMap<String, usize>,
    /// The lowest score kept.
    pub threshold: f64,
    pub out: String,
    pub samples: Vec<SampleScore>,
}

/// The sidecar file of an output: `<out>.selection.json`.
pub fn record_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".selection.json");
    out.with_file_name(name)
}

/// Scores the data, keeps the budget's highest scores and writes them (a LLaVA JSON list of
/// the original records, in file order) and the record of the selection.
pub fn select(req: &SelectRequest) -> Result<Selection> {
    if req.out.exists() && !req.force {
        bail!(
            "{} already exists: choose another --out or pass --force to replace it",
            req.out.display()
        );
    }
    ensure!(req.batch_size > 0, "--batch-size must be at least 1");
    let load = |spec: &Option<String>, role: &str| -> Result<Option<LoadedModel>> {
        match (spec, req.criterion.reads(role)) {
            (Some(spec), true) => LoadedModel::load(spec, &BuildOptions::new(Trainable::NONE, 0))
                .with_context(|| format!("loading the {role}"))
                .map(Some),
            (None, true) => bail!(
                "--criterion {} reads the {role}: pass --{role}",
                req.criterion.name()
            ),
            (Some(_), false) => bail!(
                "--criterion {} does not read the {role}: drop --{role}",
                req.criterion.name()
            ),
            (None, false) => Ok(None),
        }
    };
    let teacher = load(&req.teacher, "teacher")?;
    let student = load(&req.student, "student")?;
    let scorer = teacher
        .as_ref()
        .or(student.as_ref())
        .expect("a criterion reads a model");
    if let (Some(t), Some(s)) = (&teacher, &student) {
        ensure!(
            t.tokenizer.get_vocab(true) == s.tokenizer.get_vocab(true),
            "the teacher's tokenizer is not the student's: --criterion {} compares them token by \
             token",
            req.criterion.name()
        );
    }
    let template = crate::checkpoint::training::template_for(
        scorer.training.as_ref(),
        &scorer.model_dir,
        req.template.as_deref(),
        "plain",
    )?;
    let data = prepare_data(
        &req.data,
        &req.images,
        &scorer.tokenizer,
        &template,
        &training_tokenize_config(&scorer.model, req.max_length),
        "data select",
    )?;
    let mut skipped: std::collections::BTreeMap<String, usize> = data
        .report
        .skipped_by_kind()
        .into_iter()
        .map(|(k, n)| (format!("{k:?}"), n))
        .collect();
    let bar = crate::stages::progress::step_bar(data.samples.len(), "select", req.progress);
    let mut samples = Vec::new();
    let indices: Vec<usize> = (0..data.samples.len()).collect();
    for chunk in indices.chunks(req.batch_size) {
        let inputs = ModelInputs::collate(&data.samples, chunk.to_vec(), scorer)?;
        let scores = if req.criterion.runs_models() {
            let images = inputs.pixels.as_ref().map(ImageInput::Pixels);
            let logits = |model: &Option<LoadedModel>| -> Result<Option<candle_core::Tensor>> {
                model
                    .as_ref()
                    .map(|m| Ok(m.model.forward_images(&inputs.tokens, images)?.logits))
                    .transpose()
            };
            per_sample_scores(
                req.criterion,
                logits(&teacher)?.as_ref(),
                logits(&student)?.as_ref(),
                &inputs.labels,
            )
            .with_context(|| format!("scoring samples {}", inputs.collated.sample_ids.join(", ")))?
        } else {
            has_answer(&inputs.labels)?
                .into_iter()
                .zip(chunk)
                .map(|(has, &i)| has.then(|| random_score(req.seed, data.samples[i].index)))
                .collect()
        };
        for (&i, score) in chunk.iter().zip(scores) {
            let sample = &data.samples[i];
            match score {
                Some(score) => samples.push(SampleScore {
                    id: sample.id.clone(),
                    index: sample.index,
                    score,
                    selected: false,
                }),
                None => *skipped.entry("NoAnswerToken".into()).or_default() += 1,
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    ensure!(
        !samples.is_empty(),
        "no sample of {} could be scored",
        req.data.display()
    );
    let keep = req.budget.of(samples.len());
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by(|&a, &b| {
        samples[b]
            .score
            .total_cmp(&samples[a].score)
            .then(samples[a].index.cmp(&samples[b].index))
    });
    for &i in &order[..keep] {
        samples[i].selected = true;
    }
    let threshold = samples[order[keep - 1]].score;
    let raw = mmkd_datasets::raw_records(&req.data)?;
    let chosen: Vec<&serde_json::Value> = samples
        .iter()
        .filter(|s| s.selected)
        .map(|s| {
            raw.get(s.index)
                .and_then(Option::as_ref)
                .with_context(|| format!("record {} of {} is gone", s.index, req.data.display()))
        })
        .collect::<Result<_>>()?;
    let selection = Selection {
        criterion: req.criterion,
        budget: req.budget,
        teacher: req.teacher.clone(),
        student: req.student.clone(),
        data: req.data.display().to_string(),
        records: data.report.records,
        scored: samples.len(),
        selected: keep,
        skipped,
        threshold,
        out: req.out.display().to_string(),
        samples,
    };
    let text = serde_json::to_string_pretty(&chosen)?;
    write_atomically(&req.out, text.as_bytes())?;
    let record = serde_json::to_string_pretty(&selection)?;
    write_atomically(&record_path(&req.out), record.as_bytes())?;
    Ok(selection)
}
