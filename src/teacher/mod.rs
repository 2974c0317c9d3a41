//! Teacher signals: where a step's teacher side comes from. An online teacher runs its frozen
//! forward on the step's own micro-batch; a teacher cache (`mmkd teacher-cache`) gives the
//! rows an online teacher wrote earlier. The cache writer is the online signal plus the
//! cache store ([`cache_writer`]).

pub mod cache_writer;
pub mod own_tokens;

use std::path::Path;

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use mmkd_datasets::{Template, TokenizedSample};
use mmkd_vision::ImageProcessor;
use tokenizers::Tokenizer;

use crate::batch::ModelInputs;
use crate::checkpoint::LoadedModel;
use crate::config::StageSettings;
use crate::distill::align::AlignedRows;
use crate::distill::positions::{response_rows, visual_rows};
use crate::distill::uld::SharedVocab;
use crate::models::decoder::LayerStates;
use crate::models::llava::{BuildOptions, ImageInput, LlavaModel, LlavaOutput, Trainable};
use crate::models::moe::Routing;
use crate::models::text_config::TextConfig;
use crate::objective::Objective;
use crate::teacher_cache::digest::{digest_file, digest_str};
use crate::teacher_cache::{
    check_run, check_teacher_unchanged, CachedBatch, Manifest, RunIdentity, TeacherCache,
    FORMAT_VERSION,
};
use crate::train::forward::TeacherRows;
pub use cache_writer::{build_cache, describe, BuildRequest, BuildSummary};
pub use own_tokens::OwnTokens;

/// A frozen teacher model run on each micro-batch.
pub struct OnlineTeacher {
    pub model: LoadedModel,
    /// The vocabulary teacher and student are both cut to (`train.truncate_vocab`).
    pub truncate: Option<usize>,
    /// The decoder layers whose hidden states the objective reads (see `Objective::layers`).
    pub layers: Vec<usize>,
    /// Set when the teacher's tokenizer is not the student's: it reads its own tokenization.
    pub own_tokens: Option<OwnTokens>,
    /// Knowledge augmentation: routings each output is averaged over (1: off).
    pub routings: usize,
    /// The forward stops at the final hidden states when it can (one routing, one tokenizer):
    /// the objective's loss is chunked and forms no logits of the whole batch.
    pub hidden_only: bool,
    /// Seeds the sampled routings (with each batch's sample indices).
    pub routing_seed: u64,
}

/// An online teacher's output on a micro-batch: over the student's tokens, or (another
/// tokenizer) over its own, with the rows of both that predict the same text.
pub struct TeacherOutput {
    pub output: TeacherForward,
    pub aligned: Option<AlignedRows>,
}

/// What an online teacher's forward computed.
pub enum TeacherForward {
    /// Logits at every position, and the layer states the objective reads.
    Full(LlavaOutput),
    /// The final hidden states `[batch, seq, width]` only: a chunked loss computes the logits
    /// it reads from them and the head.
    Hidden(Tensor),
}

impl TeacherOutput {
    /// The logits `[batch, seq, vocab]` at every position.
    pub fn logits(&self) -> Result<&Tensor> {
        match &self.output {
            TeacherForward::Full(out) => Ok(&out.logits),
            TeacherForward::Hidden(_) => {
                bail!("the teacher's forward stopped at its hidden states (a chunked loss): set train.loss_chunk_rows = 0")
            }
        }
    }
}

impl OnlineTeacher {
    /// Loads the teacher checkpoint frozen (`train.frozen_dtype`) on the stage's device.
    pub fn load(spec: &str, settings: &StageSettings) -> Result<Self> {
        let mut options = BuildOptions::new(Trainable::NONE, 0);
        options.frozen_dtype = crate::runtime::parse_dtype(&settings.train.frozen_dtype)?;
        options.device = settings.train.device.open()?;
        let model = LoadedModel::load(spec, &options).context("loading the teacher")?;
        let routings = settings.train.teacher_routings;
        if routings > 1 && model.model.lm.sparse_blocks().is_empty() {
            bail!(
                "train.teacher_routings = {routings} averages a Mixture-of-Experts teacher over \
                 routings; the teacher {spec} has no sparse layer (set it to 1)"
            );
        }
        Ok(Self {
            model,
            truncate: settings.train.truncate_vocab,
            layers: Vec::new(),
            own_tokens: None,
            routings,
            routing_seed: settings.train.seed,
            hidden_only: false,
        })
    }

    /// Checks that it can distil into `student` (see [`check_compatible`]) and settles the
    /// vocabulary both are cut to.
    /// A teacher whose tokenizer is not the student's is taken when every term of `objective`
    /// that reads it works across tokenizers (it then reads its own tokenization of the data,
    /// see [`OnlineTeacher::tokenize_data`]); otherwise it is refused naming the term.
    pub fn for_student(mut self, student: &LoadedModel, objective: &Objective) -> Result<Self> {
        if student.tokenizer.get_vocab(true) != self.model.tokenizer.get_vocab(true) {
            let (sv, tv) = (
                student.tokenizer.get_vocab_size(true),
                self.model.tokenizer.get_vocab_size(true),
            );
            if let Some(term) = objective.one_vocabulary_term() {
                bail!(
                    "the teacher's tokenizer is not the student's ({tv} vs {sv} entries, or the \
                     same size with other tokens), and objective term `{term}` compares the two \
                     token by token: distil such a teacher with the `uld` term only"
                );
            }
            self.own_tokens = Some(OwnTokens::new(student, &self.model, objective.alignment()));
            self.truncate = None;
            return Ok(self);
        }
        self.truncate = check_compatible(student, &self.model, self.truncate)?;
        Ok(self)
    }

    /// With another tokenizer: the stage's samples as the teacher tokenizes them (see
    /// [`OwnTokens::tokenize`]); nothing to do otherwise.
    pub fn tokenize_data(
        &mut self,
        data: &Path,
        images: &Path,
        template: &Template,
        samples: &[TokenizedSample],
        max_length: usize,
    ) -> Result<()> {
        if let Some(own) = &mut self.own_tokens {
            own.tokenize(&self.model, data, images, template, samples, max_length)?;
        }
        Ok(())
    }

    /// The forward for a training micro-batch of `samples`: on the student's tokens, or on
    /// the teacher's own with the aligned rows.
    pub fn forward_for(
        &self,
        batch: &ModelInputs,
        samples: &[TokenizedSample],
    ) -> Result<TeacherOutput> {
        match &self.own_tokens {
            // The hidden states alone serve a chunked loss (with one routing to average).
            None if self.hidden_only && self.routings <= 1 => {
                let images = batch.pixels.as_ref().map(ImageInput::Pixels);
                let hidden = self
                    .model
                    .model
                    .forward_images_hidden(&batch.tokens, images)
                    .with_context(|| forward_context(batch))?;
                Ok(TeacherOutput {
                    output: TeacherForward::Hidden(hidden.hidden),
                    aligned: None,
                })
            }
            None => Ok(TeacherOutput {
                output: TeacherForward::Full(self.forward(batch)?),
                aligned: None,
            }),
            Some(own) => {
                let (inputs, aligned) = own
                    .inputs(batch, &batch.samples(samples), &self.model)
                    .with_context(|| {
                        format!(
                            "the teacher's own tokens for samples {}",
                            batch.collated.sample_ids.join(", ")
                        )
                    })?;
                Ok(TeacherOutput {
                    output: TeacherForward::Full(self.forward(&inputs)?),
                    aligned: Some(aligned),
                })
            }
        }
    }

    /// The frozen forward on one micro-batch (constants: no graph). With knowledge
    /// augmentation the output is the mean over its routings ([`average_routings`]).
    pub fn forward(&self, batch: &ModelInputs) -> Result<LlavaOutput> {
        let model = &self.model.model;
        let images = batch.pixels.as_ref().map(ImageInput::Pixels);
        let context = || forward_context(batch);
        if self.routings <= 1 {
            return model
                .forward_images_layers(&batch.tokens, images, &self.layers)
                .with_context(context);
        }
        let outputs = (0..self.routings)
            .map(|m| {
                let routing = match m {
                    0 => Routing::TopK,
                    _ => Routing::Sampled {
                        seed: routing_seed(self.routing_seed, &batch.collated.sample_indices, m),
                    },
                };
                let trace = LayerStates::wanted(&self.layers).routed(routing);
                model.forward_traced(&batch.tokens, images, trace)
            })
            .collect::<Result<Vec<_>>>()
            .with_context(context)?;
        average_routings(outputs)
    }
}

/// What a failed teacher forward was doing, naming the batch's samples.
fn forward_context(batch: &ModelInputs) -> String {
    format!(
        "teacher forward on samples {}",
        batch.collated.sample_ids.join(", ")
    )
}

/// The seed of sampled routing `m` of a batch: the same samples draw the same experts, so a
/// resumed run repeats the draws.
fn routing_seed(seed: u64, samples: &[usize], m: usize) -> u64 {
    let mut h = seed ^ 0x6A09_E667_F3BC_C908 ^ (m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &i in samples {
        h = (h ^ i as u64)
            .wrapping_mul(0x1000_0000_01B3)
            .rotate_left(29);
    }
    h
}

/// Knowledge augmentation's target: the mean of the outputs' final hidden states, and so of
/// their logits (the head is linear), and of the layer states the objective reads. The router
/// logits are the top-k routing's (the first output's).
pub fn average_routings(outputs: Vec<LlavaOutput>) -> Result<LlavaOutput> {
    let n = outputs.len() as f64;
    let mut iter = outputs.into_iter();
    let mut mean = iter.next().context("no routing to average")?;
    for out in iter {
        mean.hidden = (mean.hidden + out.hidden)?;
        mean.logits = (mean.logits + out.logits)?;
        for (layer, state) in out.layers.states {
            if let Some(sum) = mean.layers.states.get_mut(&layer) {
                *sum = (&*sum + state)?;
            }
        }
    }
    mean.hidden = (mean.hidden / n)?;
    mean.logits = (mean.logits / n)?;
    for state in mean.layers.states.values_mut() {
        *state = (&*state / n)?;
    }
    Ok(mean)
}

/// A teacher cache opened for one run.
pub struct CachedSignal {
    cache: TeacherCache,
    /// The cache holds the image tokens' rows (checked against the batch's).
    visual: bool,
    /// The cache's vocabulary when the student's is cut to it.
    pub truncate: Option<usize>,
}

/// Where a stage's teacher side comes from.
#[allow(clippy::large_enum_variant)]
pub enum TeacherSignal {
    Online(OnlineTeacher),
    Cached(CachedSignal),
}

impl TeacherSignal {
    /// The online teacher's output on a micro-batch, computed ahead of the student's pass;
    /// `None` for a cache (read when the batch is trained on).
    pub fn forward_ahead(
        &self,
        batch: &ModelInputs,
        samples: &[TokenizedSample],
    ) -> Result<Option<TeacherOutput>> {
        match self {
            TeacherSignal::Online(t) => t.forward_for(batch, samples).map(Some),
            TeacherSignal::Cached(_) => Ok(None),
        }
    }

    /// The entries the two vocabularies share, for a teacher with another tokenizer.
    pub fn shared_vocab(&self) -> Option<Arc<SharedVocab>> {
        match self {
            TeacherSignal::Online(OnlineTeacher {
                own_tokens: Some(own),
                ..
            }) => Some(own.shared.clone()),
            _ => None,
        }
    }

    /// Whether the teacher reads its own tokenization (another tokenizer).
    pub fn reads_own_tokens(&self) -> bool {
        matches!(
            self,
            TeacherSignal::Online(OnlineTeacher {
                own_tokens: Some(_),
                ..
            })
        )
    }

    /// Whether the signal runs a model (whose forward is worth doing ahead).
    pub fn is_online(&self) -> bool {
        matches!(self, TeacherSignal::Online(_))
    }

    /// The online teacher's language model configuration.
    pub fn online_text_config(&self) -> Option<&TextConfig> {
        match self {
            TeacherSignal::Online(t) => Some(&t.model.model.config.text_config),
            TeacherSignal::Cached(_) => None,
        }
    }
}

/// A micro-batch's teacher side for [`crate::train::forward::objective_loss`]: the online
/// output computed ahead, or the cache's rows read now and checked against the batch.
pub fn teacher_rows<'a>(
    signal: Option<&'a TeacherSignal>,
    online_output: Option<&'a TeacherOutput>,
    cached_rows: Option<&'a CachedBatch>,
) -> Result<TeacherRows<'a>> {
    Ok(match signal {
        None => TeacherRows::None,
        Some(TeacherSignal::Online(t)) => {
            let out = online_output
                .context("the online teacher's output was not computed for this micro-batch")?;
            let teacher = &t.model.model;
            match &out.output {
                TeacherForward::Hidden(hidden) => TeacherRows::OnlineHidden {
                    hidden,
                    teacher,
                    truncate: t.truncate,
                },
                // Several routings averaged: the logits were formed, the loss still chunks.
                TeacherForward::Full(output) if t.hidden_only => TeacherRows::OnlineHidden {
                    hidden: &output.hidden,
                    teacher,
                    truncate: t.truncate,
                },
                TeacherForward::Full(output) => TeacherRows::Online {
                    output,
                    teacher,
                    truncate: t.truncate,
                    aligned: out.aligned.as_ref(),
                },
            }
        }
        Some(TeacherSignal::Cached(c)) => TeacherRows::Cached {
            rows: cached_rows.context("the teacher cache was not read for this micro-batch")?,
            truncate: c.truncate,
        },
    })
}

impl CachedSignal {
    /// Opens the cache in `dir` for this run: refuses it when it was written for other data,
    /// template, tokenizer, settings or a teacher that has changed since, for a student it
    /// cannot distil into, or without what the objective reads.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        dir: &Path,
        manifest: &Manifest,
        student: &LoadedModel,
        settings: &StageSettings,
        objective: &Objective,
        data: &Path,
        images: &Path,
        template: &Template,
    ) -> Result<Self> {
        let identity = run_identity(
            settings,
            data,
            images,
            template,
            &student.tokenizer,
            &student.processor,
        )?;
        check_run(dir, &manifest.run, &identity)?;
        check_teacher_unchanged(dir, &manifest.teacher)?;
        let truncate = check_cache_compatible(&student.model, manifest, settings, objective)?;
        Ok(Self {
            cache: TeacherCache::open(dir)?,
            visual: manifest.visual,
            truncate,
        })
    }

    /// The cache's rows for `batch` (whose samples come from `samples`), checked against the
    /// batch's own response and visual positions.
    pub fn rows(&self, batch: &ModelInputs, samples: &[TokenizedSample]) -> Result<CachedBatch> {
        let seq = batch.tokens.seq_len();
        let records = batch.samples(samples);
        let keys: Vec<(usize, &str)> = records.iter().map(|s| (s.index, s.id.as_str())).collect();
        let cached = self.cache.batch(&keys, seq, batch.labels.device())?;
        let ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
        same_rows(
            &response_rows(&batch.labels)?.rows,
            &cached.response_rows,
            seq,
            &ids,
            "response",
        )?;
        // A cache without image-token rows serves only objectives that read none (checked
        // when it was opened).
        if self.visual {
            same_rows(
                &visual_rows(&batch.visual_mask)?,
                &cached.visual_rows,
                seq,
                &ids,
                "visual",
            )?;
        }
        Ok(cached)
    }
}

/// Checks that a teacher can distil into the student: same visual tokens per image, same image
/// preprocessing, same vocabulary (or an explicit truncation). Returns the vocabulary to cut to.
pub fn check_compatible(
    student: &LoadedModel,
    teacher: &LoadedModel,
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

/// The cache's counterpart of [`check_compatible`], from the values its manifest recorded, and
/// what the objective reads: relation matrices, and probabilities at the cache's temperature.
fn check_cache_compatible(
    student: &LlavaModel,
    manifest: &Manifest,
    settings: &StageSettings,
    objective: &Objective,
) -> Result<Option<usize>> {
    ensure!(
        student.tokens_per_image() == manifest.tokens_per_image,
        "the cached teacher and the student disagree on visual tokens per image ({} vs {}): their \
         positions would not line up",
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
    if let Some(term) = objective.teacher_logits_term() {
        bail!(
            "objective term `{term}` reads the teacher's full output (its logits or hidden states), \
             and a teacher cache keeps only its top-{} per position: run it with --teacher",
            manifest.top_k
        );
    }
    if objective.needs_teacher_visual() && !manifest.visual {
        bail!(
            "the teacher cache holds no distributions at the image tokens (a black-box teacher's: \
             its server reports the generated tokens only), but this run's objective has \
             `mdist.visual` (beta_vis {}): set distill.beta_vis = 0",
            settings.distill.beta_vis
        );
    }
    if objective.needs_teacher_relations() && !manifest.relations {
        bail!(
            "the teacher cache holds no relation matrices (it was written with gamma_rel = 0), but \
             this run's objective has `rdist` (gamma_rel {}): rebuild the cache or set \
             distill.gamma_rel = 0",
            settings.distill.gamma_rel
        );
    }
    for (term, temperature) in objective.teacher_temperatures() {
        ensure!(
            temperature == manifest.run.temperature,
            "objective term `{term}` reads the teacher at temperature {temperature}, the cache \
             holds its probabilities at {}: rebuild the cache at that temperature or give the \
             term the cache's",
            manifest.run.temperature
        );
    }
    Ok(truncate)
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

/// The identity of a stage run's inputs, as a cache records it and a run checks it.
pub fn run_identity(
    settings: &StageSettings,
    data: &Path,
    images: &Path,
    template: &Template,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
) -> Result<RunIdentity> {
    let tokenizer_json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    let images = images
        .canonicalize()
        .unwrap_or_else(|_| images.to_path_buf());
    Ok(RunIdentity {
        format_version: FORMAT_VERSION,
        stage_kind: if settings.stage.is_pretraining() {
            "pretraining"
        } else {
            "chat"
        }
        .into(),
        data_digest: digest_file(data).with_context(|| format!("data file {}", data.display()))?,
        images: images.display().to_string(),
        template: settings.template(),
        template_digest: digest_str(&serde_json::to_string(template)?),
        tokenizer_digest: digest_str(&tokenizer_json),
        processor_digest: digest_str(&format!("{processor:?}")),
        max_length: settings.data.max_length,
        temperature: settings.distill.temperature,
        truncate_vocab: settings.train.truncate_vocab,
        teacher_routings: settings.train.teacher_routings,
        routing_seed: if settings.train.teacher_routings > 1 {
            settings.train.seed
        } else {
            0
        },
    })
}
