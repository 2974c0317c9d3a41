//! The training loop shared by the four stages: data → batches → (teacher) forward → loss →
//! backward → accumulation → clipping → AdamW, with metrics, progress, atomic checkpoints and
//! resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use mmkd_datasets::{
    collate, BatchSampler, CollateConfig, ImageCheck, LlavaDataset, PaddingSide, SampleShape,
    SamplerConfig, Template, TokenizeConfig, TokenizedDataset, TokenizedSample, Truncation,
};
use rayon::prelude::*;
use serde::Serialize;

use super::init::{from_checkpoint, from_spec, parse_dtype, PreparedModel};
use super::metrics::{plot_losses, read_metrics, MetricsLog, StepMetrics};
use super::state::{
    digest, latest_checkpoint, read_state, save_checkpoint, TrainerState, OPTIMIZER_FILE,
};
use super::{
    clip_grad_norm, grad_global_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule,
    ParamGroupConfig,
};
use crate::checkpoint::{temp_sibling, write_llava_files, SaveAssets};
use crate::config::{Module, Stage, StageSettings};
use crate::distill::positions::{response_rows, visual_rows};
use crate::distill::{
    distill_loss, distill_loss_cached, truncate_vocab, CachedDistillBatch, CachedTeacher,
    DistillBatch, LossTerms, RelationHidden, StudentLogits,
};
use crate::models::llava::{
    ImageInput, LlavaModel, LlavaOutput, TokenBatch, Trainable, PROJECTOR_PREFIX, VISION_PREFIX,
};
use crate::teacher_cache::{
    check_run, check_teacher_unchanged, run_identity, Manifest, TeacherCache,
};

/// One stage run as the CLI (or the demo) asks for it.
#[derive(Clone, Debug)]
pub struct StageRun {
    pub settings: StageSettings,
    /// Previous stage's checkpoint (required for SFT and DFT).
    pub init: Option<String>,
    /// Teacher checkpoint (DPT and DFT).
    pub teacher: Option<String>,
    /// Offline teacher cache (written by `mmkd teacher-cache`) instead of `teacher`.
    pub teacher_cache: Option<PathBuf>,
    pub data: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    /// Tokenizer for freshly built models.
    pub tokenizer: Option<PathBuf>,
    pub resume: bool,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
}

/// What a finished stage reports (also written to `OUT/summary.json`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StageSummary {
    pub stage: Stage,
    pub steps: usize,
    pub samples_seen: usize,
    pub wall_seconds: f64,
    pub samples_per_s: f64,
    pub first_loss: f32,
    pub final_loss: f32,
    pub data_records: usize,
    pub data_kept: usize,
    pub data_truncated: usize,
    /// Records not trained on, by reason.
    pub data_skipped: std::collections::BTreeMap<String, usize>,
    pub model_origin: String,
    pub parameters_trained: usize,
    pub settings: serde_json::Value,
}

pub const SUMMARY_FILE: &str = "summary.json";

/// Whether `out` holds a finished stage (its summary is written last).
pub fn stage_finished(out: &Path) -> bool {
    out.join(SUMMARY_FILE).exists()
}

fn trainable_modules(settings: &StageSettings) -> Trainable {
    let modules = settings.train.modules(settings.stage);
    Trainable {
        vision: modules.contains(&Module::Vision),
        projector: modules.contains(&Module::Projector),
        llm: modules.contains(&Module::Llm),
    }
}

/// Checks that a teacher can distil into the student: same visual tokens per image, same image
/// preprocessing, same vocabulary (or an explicit truncation). Returns the vocabulary to cut to.
pub fn check_compatible(
    student: &PreparedModel,
    teacher: &PreparedModel,
    truncate: Option<usize>,
) -> Result<Option<usize>> {
    let (s, t) = (&student.model, &teacher.model);
    ensure!(
        s.tokens_per_image() == t.tokens_per_image(),
        "teacher and student disagree on visual tokens per image ({} vs {}): their positions would not line up",
        t.tokens_per_image(),
        s.tokens_per_image()
    );
    ensure!(
        s.image_token_id() == t.image_token_id(),
        "teacher and student use different image token ids ({} vs {})",
        t.image_token_id(),
        s.image_token_id()
    );
    ensure!(
        student.processor == teacher.processor,
        "teacher and student preprocess images differently (compare their preprocessor configs): \
         a shared vision input is required"
    );
    let (sv, tv) = (
        s.config.text_config.vocab_size,
        t.config.text_config.vocab_size,
    );
    match truncate {
        Some(n) => {
            ensure!(
                n <= sv && n <= tv,
                "truncate_vocab = {n} exceeds a vocabulary (teacher {tv}, student {sv})"
            );
            Ok(Some(n))
        }
        None if sv == tv => Ok(None),
        None => bail!(
            "teacher vocabulary ({tv}) differs from the student's ({sv}); if they differ only by padding, \
             set train.truncate_vocab = {} to cut both to the smaller",
            sv.min(tv)
        ),
    }
}

pub fn labels_tensor(labels: &ndarray::Array2<i64>, device: &Device) -> Result<Tensor> {
    let (b, s) = labels.dim();
    Ok(Tensor::from_vec(
        labels.iter().copied().collect::<Vec<_>>(),
        (b, s),
        device,
    )?)
}

pub fn token_batch(batch: &mmkd_datasets::Batch) -> TokenBatch {
    TokenBatch {
        ids: batch
            .input_ids
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect(),
        mask: batch
            .attention_mask
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect(),
    }
}

pub fn pixel_values(
    batch: &mmkd_datasets::Batch,
    prepared: &PreparedModel,
) -> Result<Option<Tensor>> {
    if batch.images.is_empty() {
        return Ok(None);
    }
    let images = batch.load_images(2)?;
    let arrays = images
        .iter()
        .zip(&batch.images)
        .map(|(img, meta)| {
            prepared.processor.preprocess(img).with_context(|| {
                format!(
                    "sample {}: image {}",
                    batch.sample_ids[meta.row],
                    meta.path.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(mmkd_vision::to_tensor(
        &arrays,
        prepared.model.device(),
    )?))
}

/// A built-in template by name, or a template file.
pub fn resolve_template(name: &str) -> Result<Template> {
    if Path::new(name).is_file() {
        Template::from_file(Path::new(name))
    } else {
        Template::builtin(name)
    }
}

/// How a stage tokenizes for `model`: its image token and visual tokens per image, long
/// samples truncated (never inside an image block).
pub fn training_tokenize_config(model: &LlavaModel, max_length: usize) -> TokenizeConfig {
    TokenizeConfig {
        image_token_id: model.image_token_id(),
        tokens_per_image: model.tokens_per_image(),
        max_length,
        truncation: Truncation::Truncate,
    }
}

/// Reads and tokenizes a stage's data (images must exist), reporting skipped records on
/// stderr; fails when nothing is left.
pub fn prepare_data(
    data: &Path,
    images: &Path,
    tokenizer: &tokenizers::Tokenizer,
    template: &Template,
    tokenize: &TokenizeConfig,
    what: &str,
) -> Result<TokenizedDataset> {
    let mut dataset = LlavaDataset::read(data, images)?;
    dataset.verify_images(ImageCheck::Exists, 2, &|_| {});
    let prepared = TokenizedDataset::build(&dataset, tokenizer, template, tokenize, 2, &|_| {})?;
    let report = &prepared.report;
    if !report.problems.is_empty() {
        eprintln!(
            "{what}: {} of {} records skipped ({}); first: {}",
            report.problems.len(),
            report.records,
            report
                .skipped_by_kind()
                .iter()
                .map(|(k, n)| format!("{k:?}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            report.problems[0]
        );
    }
    ensure!(
        !prepared.samples.is_empty(),
        "no usable sample in {}",
        data.display()
    );
    Ok(prepared)
}

struct Teacher {
    prepared: PreparedModel,
    truncate: Option<usize>,
}

/// How a distillation stage gets its teacher (one value per run: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum TeacherPlan {
    None,
    Online(Teacher),
    Cached(Manifest),
}

#[allow(clippy::large_enum_variant)]
enum TeacherSource {
    Online(Teacher),
    Cached(CachedSource),
}

struct CachedSource {
    cache: TeacherCache,
    truncate: Option<usize>,
}

/// Opens a teacher cache for this run: refuses it when it was written for other data,
/// template, tokenizer, settings or a teacher that has changed since, or for a student it
/// cannot distil into.
fn open_cached_teacher(
    manifest: Manifest,
    student: &PreparedModel,
    settings: &StageSettings,
    run: &StageRun,
    template: &Template,
) -> Result<CachedSource> {
    let dir = run.teacher_cache.as_deref().context("no --teacher-cache")?;
    let identity = run_identity(
        settings,
        &run.data,
        &run.images,
        template,
        &student.tokenizer,
        &student.processor,
    )?;
    check_run(dir, &manifest.run, &identity)?;
    check_teacher_unchanged(dir, &manifest.teacher)?;
    let truncate = check_cache_compatible(&student.model, &manifest, settings)?;
    let cache = TeacherCache::open(dir)?;
    Ok(CachedSource { cache, truncate })
}

/// The cache's counterpart of [`check_compatible`], from the values its manifest recorded.
fn check_cache_compatible(
    student: &LlavaModel,
    manifest: &Manifest,
    settings: &StageSettings,
) -> Result<Option<usize>> {
    ensure!(
        student.tokens_per_image() == manifest.tokens_per_image,
        "the cached teacher and the student disagree on visual tokens per image ({} vs {}): their          positions would not line up",
        manifest.tokens_per_image,
        student.tokens_per_image()
    );
    ensure!(
        student.image_token_id() == manifest.image_token_id,
        "the cached teacher and the student use different image token ids ({} vs {})",
        manifest.image_token_id,
        student.image_token_id()
    );
    let sv = student.config.text_config.vocab_size;
    let truncate = settings.train.truncate_vocab;
    match truncate {
        Some(n) => ensure!(
            n <= sv,
            "truncate_vocab = {n} exceeds the student's vocabulary ({sv})"
        ),
        None => ensure!(
            sv == manifest.vocab,
            "the cached teacher's vocabulary ({}) differs from the student's ({sv}); if they differ \
             only by padding, set train.truncate_vocab = {} and rebuild the cache with it",
            manifest.vocab,
            sv.min(manifest.vocab)
        ),
    }
    if settings.distill.gamma_rel > 0.0 && !manifest.relations {
        bail!(
            "the teacher cache holds no relation matrices (it was written with gamma_rel = 0), but \
             this run's gamma_rel is {}: rebuild the cache or set distill.gamma_rel = 0",
            settings.distill.gamma_rel
        );
    }
    Ok(truncate)
}

/// The projector's parameter group, and the vision tower's when it trains.
fn optimizer_groups(settings: &StageSettings, vars: &[(String, Var)]) -> Vec<ParamGroupConfig> {
    let group = |name: &str, prefix: &str, lr_scale: f64| ParamGroupConfig {
        name: name.into(),
        prefixes: vec![format!("{prefix}.")],
        lr_scale,
        weight_decay: settings.train.weight_decay,
    };
    let mut groups = vec![group(
        "projector",
        PROJECTOR_PREFIX,
        settings.train.projector_lr_scale,
    )];
    if vars
        .iter()
        .any(|(name, _)| name.starts_with(&format!("{VISION_PREFIX}.")))
    {
        groups.push(group(
            "vision",
            VISION_PREFIX,
            settings.train.vision_lr_scale,
        ));
    }
    groups
}

/// One collated micro-batch as the models take it.
struct PreparedBatch {
    collated: mmkd_datasets::Batch,
    tokens: TokenBatch,
    labels: Tensor,
    pixels: Option<Tensor>,
}

impl PreparedBatch {
    fn new(
        samples: &[TokenizedSample],
        indices: Vec<usize>,
        collate_cfg: &CollateConfig,
        student: &PreparedModel,
    ) -> Result<Self> {
        let refs: Vec<_> = indices.iter().map(|&i| &samples[i]).collect();
        let collated = collate(&refs, &indices, collate_cfg);
        Ok(Self {
            tokens: token_batch(&collated),
            labels: labels_tensor(&collated.labels, student.model.device())?,
            pixels: pixel_values(&collated, student)?,
            collated,
        })
    }
}

/// A micro-batch with the work on it that no trained weight changes: the online teacher's
/// output (`None` without an online teacher) and the student's frozen-tower features (`None`
/// when the tower trains or the batch has no image).
struct MicroBatch {
    batch: PreparedBatch,
    teacher_out: Option<LlavaOutput>,
    student_tower: Option<Tensor>,
}

/// The online teacher's forward on `batch`; `None` for other teacher sources.
fn online_teacher_forward(
    teacher: Option<&TeacherSource>,
    batch: &PreparedBatch,
) -> Result<Option<LlavaOutput>> {
    match teacher {
        Some(TeacherSource::Online(t)) => Ok(Some(
            t.prepared
                .model
                .forward(&batch.tokens, batch.pixels.as_ref())?,
        )),
        _ => Ok(None),
    }
}

/// A training progress bar (steps, the loss as its message, elapsed and ETA); hidden unless
/// `progress`.
pub fn step_bar(total_steps: usize, prefix: &str, progress: bool) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// The loss of one micro-batch; `samples` is the data set the batch's rows index.
fn batch_loss(
    student: &LlavaModel,
    teacher: Option<&TeacherSource>,
    samples: &[TokenizedSample],
    micro: &MicroBatch,
    settings: &StageSettings,
) -> Result<LossTerms> {
    let PreparedBatch {
        collated,
        tokens,
        labels,
        pixels,
    } = &micro.batch;
    let images = match (&micro.student_tower, pixels) {
        (Some(features), _) => Some(ImageInput::Tower(features)),
        (None, pixels) => pixels.as_ref().map(ImageInput::Pixels),
    };
    let visual_mask_of = |visual: &crate::models::splice::VisualPositions| -> Result<Tensor> {
        let mask: Vec<u8> = visual.mask.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            mask,
            (tokens.batch_size(), tokens.seq_len()),
            student.device(),
        )?)
    };
    let teacher = match teacher {
        None => {
            let out = student.forward_images(tokens, images)?;
            return LossTerms::ce_only(&out.logits, labels);
        }
        // The cached loss computes the student's logits only at the rows it reads.
        Some(TeacherSource::Cached(c)) => {
            let out = student.forward_images_hidden(tokens, images)?;
            let visual_mask = visual_mask_of(&out.visual)?;
            let rows: Vec<_> = collated
                .sample_indices
                .iter()
                .map(|&i| &samples[i])
                .collect();
            return cached_batch_loss(
                student,
                c,
                &rows,
                &out.hidden,
                labels,
                &visual_mask,
                settings,
            );
        }
        Some(TeacherSource::Online(t)) => t,
    };
    let out = student.forward_images(tokens, images)?;
    let visual_mask = visual_mask_of(&out.visual)?;
    let t_out = micro
        .teacher_out
        .as_ref()
        .context("the online teacher's output was not computed for this micro-batch")?;
    let t_logits = t_out.logits.detach();
    let (s_logits, t_logits) = match teacher.truncate {
        Some(n) => (
            truncate_vocab(&out.logits, n)?,
            truncate_vocab(&t_logits, n)?,
        ),
        None => (out.logits.clone(), t_logits),
    };
    let t_hidden = t_out.hidden.detach();
    let relation_hidden = teacher.truncate.is_none().then(|| RelationHidden {
        student_hidden: &out.hidden,
        student_head: student.lm.lm_head_weight(),
        teacher_hidden: &t_hidden,
        teacher_head: teacher.prepared.model.lm.lm_head_weight(),
    });
    distill_loss(
        &DistillBatch {
            student_logits: &s_logits,
            teacher_logits: &t_logits,
            labels,
            visual_mask: &visual_mask,
            relation_hidden,
        },
        &settings.distill,
    )
}

fn cached_batch_loss(
    student: &LlavaModel,
    source: &CachedSource,
    samples: &[&TokenizedSample],
    hidden: &Tensor,
    labels: &Tensor,
    visual_mask: &Tensor,
    settings: &StageSettings,
) -> Result<LossTerms> {
    // A cache of a smaller vocabulary compares the head's first rows (the padding after them
    // is the student's alone).
    let head = student.lm.lm_head_weight();
    let head = match source.truncate {
        Some(n) => {
            let have = head.dim(0)?;
            anyhow::ensure!(
                n <= have,
                "cannot cut the student's vocabulary of {have} to the cache's {n}: it is larger"
            );
            head.narrow(0, 0, n)?
        }
        None => head.clone(),
    };
    let seq = labels.dim(1)?;
    let keys: Vec<(usize, &str)> = samples.iter().map(|s| (s.index, s.id.as_str())).collect();
    let cached = source.cache.batch(&keys, seq, student.device())?;
    let ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
    same_rows(
        &response_rows(labels)?.rows,
        &cached.response_rows,
        seq,
        &ids,
        "response",
    )?;
    same_rows(
        &visual_rows(visual_mask)?,
        &cached.visual_rows,
        seq,
        &ids,
        "visual",
    )?;
    distill_loss_cached(
        &CachedDistillBatch {
            student_logits: StudentLogits::AtRows {
                hidden,
                head: &head,
            },
            labels,
            visual_mask,
            teacher: CachedTeacher {
                response: &cached.response,
                visual: &cached.visual,
                relations: &cached.relations,
            },
            student_relation: None,
        },
        &settings.distill,
    )
}

/// The cache's rows must be the batch's own; otherwise name the first sample that differs.
fn same_rows(batch: &[u32], cached: &[u32], seq: usize, ids: &[&str], what: &str) -> Result<()> {
    if batch == cached {
        return Ok(());
    }
    let first = batch
        .iter()
        .zip(cached)
        .position(|(a, b)| a != b)
        .unwrap_or(batch.len().min(cached.len()));
    let row = batch.get(first).or(cached.get(first)).copied().unwrap_or(0) as usize;
    let id = ids.get(row / seq).copied().unwrap_or("?");
    bail!(
        "sample {id}: the teacher cache's {what} positions differ from this run's ({} vs {} in the \
         batch): the cache was written for other data or settings",
        cached.len(),
        batch.len()
    )
}

fn finite_or_stop(value: f64, what: &str, step: usize, ids: &[String], out: &Path) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    let last = latest_checkpoint(out)?
        .map(|p| format!("the last good checkpoint is {}", p.display()))
        .unwrap_or_else(|| "no checkpoint was written yet".into());
    bail!(
        "{what} is {value} at step {} (samples {}): stopping; {last}. Lower the learning rate or check the data",
        step + 1,
        ids.join(", ")
    )
}

/// Runs one stage to completion (or resumes it) and writes the trained model to `run.out`.
pub fn run_stage(run: &StageRun) -> Result<StageSummary> {
    let settings = &run.settings;
    let stage = settings.stage;
    let started = Instant::now();
    std::fs::create_dir_all(&run.out).with_context(|| format!("creating {}", run.out.display()))?;
    let settings_json = settings.as_json();
    let cache_manifest = match &run.teacher_cache {
        Some(dir) if stage.distills() => Some(Manifest::read(dir)?),
        Some(_) => bail!(
            "--teacher-cache is for the distillation stages (dpt, dft), not `{}`",
            stage.name()
        ),
        None => None,
    };
    // How many micro-batches run side by side changes no number: resuming may change it.
    let mut digested_settings = settings_json.clone();
    if let Some(train) = digested_settings
        .get_mut("train")
        .and_then(|t| t.as_object_mut())
    {
        train.remove("parallel_micro_batches");
    }
    let settings_digest = digest(&serde_json::json!({
        "settings": digested_settings, "data": run.data, "images": run.images, "init": run.init,
        "teacher": run.teacher,
        "teacher_cache": cache_manifest.as_ref().map(Manifest::identity_digest),
    }));
    let frozen_dtype = parse_dtype(&settings.train.frozen_dtype)?;
    let trainable = trainable_modules(settings);

    // Resume point.
    let resume_from = if run.resume {
        let ckpt = latest_checkpoint(&run.out)?.with_context(|| {
            format!(
                "--resume: no complete checkpoint in {}",
                super::state::checkpoints_dir(&run.out).display()
            )
        })?;
        let state = read_state(&ckpt)?;
        ensure!(
            state.settings_digest == settings_digest,
            "--resume: {} was written with other settings, data or models; resume with the same command",
            ckpt.display()
        );
        Some((ckpt, state))
    } else {
        if latest_checkpoint(&run.out)?.is_some() {
            bail!(
                "{} holds checkpoints of an earlier run: pass --resume to continue it, or choose another --out",
                run.out.display()
            );
        }
        None
    };

    // Models.
    let student = match (&resume_from, &run.init) {
        (Some((ckpt, _)), _) => from_checkpoint(
            ckpt.to_str().context("non-UTF-8 path")?,
            trainable,
            frozen_dtype,
        )?,
        (None, Some(init)) => from_checkpoint(init, trainable, frozen_dtype)?,
        (None, None) if stage.is_pretraining() => {
            let tokenizer = run
                .tokenizer
                .clone()
                .or_else(|| settings.data.tokenizer.clone());
            from_spec(
                &settings.model,
                tokenizer.as_deref(),
                trainable,
                frozen_dtype,
            )?
        }
        (None, None) => bail!(
            "`{}` continues a trained model: pass --init DIR (the previous stage's output)",
            stage.name()
        ),
    };
    let teacher = match (stage.distills(), &run.teacher, &cache_manifest) {
        (false, _, _) => TeacherPlan::None,
        (true, Some(_), Some(_)) => {
            bail!("--teacher and --teacher-cache are mutually exclusive: give one")
        }
        (true, Some(spec), None) => {
            let prepared = from_checkpoint(spec, Trainable::NONE, frozen_dtype)
                .context("loading the teacher")?;
            let truncate = check_compatible(&student, &prepared, settings.train.truncate_vocab)?;
            TeacherPlan::Online(Teacher { prepared, truncate })
        }
        (true, None, Some(manifest)) => TeacherPlan::Cached(manifest.clone()),
        (true, None, None) => bail!(
            "`{}` distils from a teacher: pass --teacher DIR, or --teacher-cache CACHE (written by              `mmkd teacher-cache`)",
            stage.name()
        ),
    };
    let model = &student.model;

    // Data.
    let template_name = settings.template();
    let template = resolve_template(&template_name)?;
    let data = prepare_data(
        &run.data,
        &run.images,
        &student.tokenizer,
        &template,
        &training_tokenize_config(model, settings.data.max_length),
        stage.name(),
    )?;
    let report = &data.report;
    let teacher = match teacher {
        TeacherPlan::Online(t) => Some(TeacherSource::Online(t)),
        TeacherPlan::Cached(cache) => Some(TeacherSource::Cached(open_cached_teacher(
            cache, &student, settings, run, &template,
        )?)),
        TeacherPlan::None => None,
    };

    let mut sampler_cfg = SamplerConfig::new(settings.train.batch_size, settings.train.seed);
    sampler_cfg.group_by_modality_length = settings.train.group_by_modality_length;
    let cursor = resume_from
        .as_ref()
        .map(|(_, s)| s.cursor)
        .unwrap_or_default();
    let mut sampler = BatchSampler::new(SampleShape::of(&data.samples), sampler_cfg, cursor)?;
    let accum_steps = settings.train.grad_accum;
    let total_steps = match settings.train.max_steps {
        Some(n) => n,
        None => (settings.train.epochs * sampler.batches_per_epoch())
            .div_ceil(accum_steps)
            .max(1),
    };
    let collate_cfg = CollateConfig {
        pad_token_id: 0,
        padding_side: PaddingSide::Right,
        pad_to_multiple_of: 1,
    };

    // Optimisation.
    let vars = model.store.trainable_vars();
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWConfig {
            weight_decay: settings.train.weight_decay,
            groups: optimizer_groups(settings, &vars),
            ..Default::default()
        },
    )?;
    let (start_step, mut samples_seen) = match &resume_from {
        Some((ckpt, state)) => {
            optimizer.load(&ckpt.join(OPTIMIZER_FILE))?;
            (state.step, state.samples_seen)
        }
        None => (0, 0),
    };
    let schedule = LrSchedule::new(&settings.train.schedule, settings.train.lr, total_steps)?;
    let mut log = MetricsLog::open(
        &run.out.join("metrics.jsonl"),
        resume_from.as_ref().map(|(_, s)| s.step),
    )?;
    let assets = SaveAssets {
        tokenizer_dir: Some(&student.tokenizer_dir),
        tokenizer: Some(&student.tokenizer),
        processor: Some(&student.processor),
    };

    let bar = step_bar(total_steps, stage.name(), run.progress);
    bar.set_position(start_step as u64);

    let parallel = settings.train.parallel_micro_batches.clamp(1, accum_steps);
    let online_teacher = matches!(teacher, Some(TeacherSource::Online(_)));
    let frozen_tower = !model.trainable().vision;
    // A micro-batch collated, with the online teacher's output and the student's frozen-tower
    // features on it.
    let prepare = |indices: Vec<usize>| -> Result<MicroBatch> {
        let batch = PreparedBatch::new(&data.samples, indices, &collate_cfg, &student)?;
        let teacher_out = online_teacher_forward(teacher.as_ref(), &batch)?;
        let student_tower = match &batch.pixels {
            Some(pixels) => model.frozen_tower_features(pixels)?,
            None => None,
        };
        Ok(MicroBatch {
            batch,
            teacher_out,
            student_tower,
        })
    };
    let mut ahead: Vec<MicroBatch> = Vec::new();
    for step in start_step..total_steps {
        let step_started = Instant::now();
        let mut accum = GradAccumulator::new(&vars);
        let mut terms_sum = [0f64; 5];
        let mut terms_seen = [0usize; 5];
        let mut step_samples = 0;
        let step_indices: Vec<Vec<usize>> =
            (0..accum_steps).map(|_| sampler.next_batch()).collect();
        let chunks: Vec<&[Vec<usize>]> = step_indices.chunks(parallel).collect();
        for (chunk_no, chunk) in chunks.iter().enumerate() {
            let mut ready = std::mem::take(&mut ahead).into_iter();
            let current = chunk
                .iter()
                .map(|indices| match ready.next() {
                    Some(mb) if &mb.batch.collated.sample_indices == indices => Ok(mb),
                    _ => prepare(indices.clone()),
                })
                .collect::<Result<Vec<MicroBatch>>>()?;
            // The online teacher and a frozen tower do not change: their forward on the next
            // micro-batches does not wait for these ones' update, so it runs alongside the
            // student's forward and backward and fills the cores the student's serial
            // stretches leave idle.
            let next_indices: Vec<Vec<usize>> = if !(online_teacher || frozen_tower) {
                Vec::new()
            } else if let Some(next) = chunks.get(chunk_no + 1) {
                next.to_vec()
            } else if step + 1 < total_steps {
                let mut peek = sampler.clone();
                (0..parallel.min(accum_steps))
                    .map(|_| peek.next_batch())
                    .collect()
            } else {
                Vec::new()
            };
            // The student's forward, loss and backward on one micro-batch.
            let student_pass = |micro: &MicroBatch| -> Result<_> {
                let terms = batch_loss(model, teacher.as_ref(), &data.samples, micro, settings)?;
                finite_or_stop(
                    terms.total_value as f64,
                    "the loss",
                    step,
                    &micro.batch.collated.sample_ids,
                    &run.out,
                )?;
                let grads = terms.total.backward()?;
                Ok((terms, grads))
            };
            let (next, results) = rayon::join(
                || {
                    next_indices
                        .into_iter()
                        .map(&prepare)
                        .collect::<Result<Vec<_>>>()
                },
                || {
                    current
                        .par_iter()
                        .map(student_pass)
                        .collect::<Result<Vec<_>>>()
                },
            );
            ahead = next?;
            for (mb, (terms, grads)) in current.iter().zip(results?) {
                accum.add(&grads)?;
                step_samples += mb.batch.collated.batch_size();
                for (i, v) in [
                    Some(terms.total_value),
                    terms.ce,
                    terms.l_res,
                    terms.l_vis,
                    terms.l_rel,
                ]
                .iter()
                .enumerate()
                {
                    if let Some(v) = v {
                        terms_sum[i] += *v as f64;
                        terms_seen[i] += 1;
                    }
                }
            }
        }
        let mut grads = accum.mean()?;
        let grad_norm = if settings.train.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, &vars, settings.train.max_grad_norm)?
        } else {
            grad_global_norm(&grads, &vars)?
        };
        finite_or_stop(grad_norm, "the gradient norm", step, &[], &run.out)?;
        let lr = schedule.lr(step);
        optimizer.step(&grads, lr)?;
        samples_seen += step_samples;

        let mean =
            |i: usize| (terms_seen[i] > 0).then(|| (terms_sum[i] / terms_seen[i] as f64) as f32);
        let metrics = StepMetrics {
            step: step + 1,
            epoch: sampler.cursor().epoch,
            loss: mean(0).unwrap_or(f32::NAN),
            ce: mean(1),
            l_res: mean(2),
            l_vis: mean(3),
            l_rel: mean(4),
            grad_norm,
            lr,
            samples_per_s: step_samples as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            samples: samples_seen,
        };
        log.append(&metrics)?;
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.1} samples/s",
            metrics.loss, lr, metrics.samples_per_s
        ));
        bar.inc(1);

        let done = step + 1;
        if settings.train.save_every > 0
            && done % settings.train.save_every == 0
            && done < total_steps
        {
            // Never checkpoint weights an overflowing update has already ruined.
            ensure_finite_params(&vars, step, &run.out)?;
            let state = TrainerState {
                stage: stage.name().into(),
                step: done,
                total_steps,
                cursor: sampler.cursor(),
                samples_seen,
                settings_digest: settings_digest.clone(),
            };
            save_checkpoint(
                &run.out,
                model,
                assets,
                &optimizer,
                &state,
                settings.train.keep_last,
            )?;
        }
    }
    bar.finish_and_clear();

    // The final model goes into OUT itself, file by file (each rename is atomic); the summary,
    // written last, marks the stage as finished.
    let tmp = temp_sibling(&run.out.join("final"))?;
    write_llava_files(model, &tmp, assets)?;
    for entry in std::fs::read_dir(&tmp)? {
        let entry = entry?;
        std::fs::rename(entry.path(), run.out.join(entry.file_name()))?;
    }
    std::fs::remove_dir_all(&tmp)?;
    let all_metrics = read_metrics(&run.out.join("metrics.jsonl"))?;
    plot_losses(&all_metrics, &run.out.join("loss.png"))?;
    let wall = started.elapsed().as_secs_f64();
    let summary = StageSummary {
        stage,
        steps: total_steps,
        samples_seen,
        wall_seconds: wall,
        samples_per_s: median(all_metrics.iter().map(|m| m.samples_per_s).collect()),
        first_loss: all_metrics.first().map(|m| m.loss).unwrap_or(f32::NAN),
        final_loss: all_metrics.last().map(|m| m.loss).unwrap_or(f32::NAN),
        data_records: report.records,
        data_kept: report.kept,
        data_truncated: report.truncated,
        data_skipped: report
            .skipped_by_kind()
            .into_iter()
            .map(|(k, n)| (format!("{k:?}"), n))
            .collect(),
        model_origin: student.origin.clone(),
        parameters_trained: model.store.count_trainable(),
        settings: settings_json,
    };
    std::fs::write(
        run.out.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

fn ensure_finite_params(
    vars: &[(String, candle_core::Var)],
    step: usize,
    out: &Path,
) -> Result<()> {
    for (name, var) in vars {
        let sum = var
            .as_tensor()
            .abs()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            finite_or_stop(sum, &format!("parameter `{name}`"), step, &[], out)?;
        }
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
