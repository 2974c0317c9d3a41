//! One LLaVA-KD distilled fine-tuning (DFT) step with random weights, timed by phase:
//! teacher forward (constants, no graph), student forward, loss
//! (CE + L_res + L_vis + 0.5·L_rel, forward KL), backward, AdamW on projector + LLM. It is the
//! training step itself: the learner's [`TrainStep`] over [`objective_loss`], the bench's batch
//! split into `student_shards` micro-batches run side by side.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use mmkd_nn::WeightSource;

use super::data::BenchBatch;
use super::spec::{BenchSpec, LmSpec};
use crate::distill::positions::{gather_rows, response_rows, visual_positions_per_sample};
use crate::distill::{
    hidden_form_is_cheaper, relation_matrices, relation_matrices_from_hidden, DistillLossConfig,
    TopKHost,
};
use crate::models::llava::{BuildOptions, ImageInput, LlavaModel, LlavaOutput, Trainable};
use crate::objective::{Objective, TermSpec};
use crate::runtime::data_parallel::DataParallel;
use crate::teacher::TeacherForward;
use crate::teacher_cache::{CacheWriter, Manifest, SampleRecord, TeacherCache};
use crate::train::forward::{objective_loss, StudentBatch, TeacherRows};
use crate::train::step::{MicroBatch, MicroBatchSource, MicroLoss, TrainStep};
pub use crate::train::StepTimes;
use crate::train::{AdamW, AdamWConfig};

/// Learning rate of the peer's AdamW.
const LEARNING_RATE: f64 = 2e-5;

/// What one step produced.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    pub times: StepTimes,
    /// Wall time of the whole step, freeing the graph included.
    pub wall: f64,
    pub loss: f32,
}

/// Where the step's teacher side comes from.
#[derive(Clone, Copy)]
enum Teacher<'a> {
    Online,
    Cached(&'a TeacherCache),
}

/// Teacher, student, learner and batch of the benchmark step.
pub struct DftStep {
    teacher: LlavaModel,
    student: LlavaModel,
    learner: TrainStep,
    batch: BenchBatch,
    objective: Objective,
    distill: DistillLossConfig,
    /// The next step's shards, with the frozen work on them (the teacher's output, the
    /// student's tower features) done during the previous step.
    pub(super) pending: Vec<Shard>,
    /// Whether the frozen work of the next step runs alongside this step's update.
    teacher_overlap: bool,
    /// Row ranges of the batch whose student forward and backward run concurrently.
    student_shards: usize,
}

/// One micro-batch of the bench: rows of the batch with the frozen work on them.
pub(super) struct Shard {
    rows: Range<usize>,
    batch: BenchBatch,
    /// The online teacher's output on these rows.
    teacher_out: Option<TeacherForward>,
    /// The student's frozen-tower features of these rows.
    pub(super) tower: Option<Tensor>,
    /// Seconds the teacher forward of the whole batch took (on the first shard).
    teacher_seconds: f64,
}

impl MicroBatch for Shard {
    fn samples(&self) -> usize {
        self.rows.len()
    }

    fn sample_ids(&self) -> Vec<String> {
        self.rows.clone().map(|b| format!("bench-{b}")).collect()
    }
}

/// The bench's one batch as the learner's micro-batch source: `shards` row ranges, the frozen
/// work for the next step done alongside this one when `overlap`.
struct Shards<'a> {
    teacher_model: &'a LlavaModel,
    student: &'a LlavaModel,
    batch: &'a BenchBatch,
    shards: usize,
    overlap: bool,
    teacher: Teacher<'a>,
    /// The loss is chunked: the teacher's forward stops at its hidden states.
    teacher_hidden_only: bool,
    pending: Vec<Shard>,
}

impl Shards<'_> {
    /// The batch's shards with the frozen work done: the teacher's forward (online), the
    /// student's tower features.
    fn prepare(&self) -> Result<Vec<Shard>> {
        let clock = Instant::now();
        let teacher_out = match self.teacher {
            Teacher::Online if self.teacher_hidden_only => Some(TeacherForward::Hidden(
                self.teacher_model
                    .forward_images_hidden(
                        &self.batch.tokens,
                        Some(ImageInput::Pixels(&self.batch.pixels)),
                    )
                    .context("teacher forward")?
                    .hidden,
            )),
            Teacher::Online => Some(TeacherForward::Full(
                self.teacher_model
                    .forward(&self.batch.tokens, Some(&self.batch.pixels))
                    .context("teacher forward")?,
            )),
            Teacher::Cached(_) => None,
        };
        let teacher_seconds = clock.elapsed().as_secs_f64();
        let tower = self
            .student
            .frozen_tower_features(&self.batch.pixels)
            .context("student vision tower")?;
        shard_ranges(self.batch.tokens.batch_size(), self.shards)
            .into_iter()
            .enumerate()
            .map(|(i, rows)| {
                let narrow = |t: &Tensor| t.narrow(0, rows.start, rows.len());
                Ok(Shard {
                    batch: self.batch.rows(rows.clone())?,
                    teacher_out: teacher_out
                        .as_ref()
                        .map(|out| -> Result<TeacherForward> {
                            Ok(match out {
                                TeacherForward::Hidden(hidden) => {
                                    TeacherForward::Hidden(narrow(hidden)?)
                                }
                                TeacherForward::Full(out) => TeacherForward::Full(LlavaOutput {
                                    hidden: narrow(&out.hidden)?,
                                    logits: narrow(&out.logits)?,
                                    visual: {
                                        let mask = out.visual.mask[rows.clone()].to_vec();
                                        let count =
                                            mask.iter().flatten().map(|&m| m as usize).sum();
                                        crate::models::splice::VisualPositions { mask, count }
                                    },
                                    layers: Default::default(),
                                    image_features: None,
                                }),
                            })
                        })
                        .transpose()?,
                    tower: tower.as_ref().map(narrow).transpose()?,
                    teacher_seconds: if i == 0 { teacher_seconds } else { 0.0 },
                    rows,
                })
            })
            .collect()
    }
}

impl MicroBatchSource for Shards<'_> {
    type Item = Shard;

    fn chunks(&self) -> usize {
        1
    }

    fn take(&mut self, _chunk: usize) -> Result<Vec<Shard>> {
        if self.pending.is_empty() {
            self.prepare()
        } else {
            Ok(std::mem::take(&mut self.pending))
        }
    }

    fn prepare_ahead(&self, _chunk: usize) -> Result<Vec<Shard>> {
        if self.overlap {
            self.prepare()
        } else {
            Ok(Vec::new())
        }
    }

    fn keep_ahead(&mut self, ready: Vec<Shard>) {
        self.pending = ready;
    }
}

impl DftStep {
    /// Parameters the student's optimizer updates.
    /// Computes the loss `rows` logit rows at a time from hidden states (`None`: all at
    /// once), as a training stage with `train.loss_chunk_rows` does.
    pub fn chunk_loss(&mut self, rows: Option<usize>) {
        self.objective.chunk_loss(rows);
    }

    /// The logit rows the loss computes at once, when it is chunked.
    pub fn loss_chunk_rows(&self) -> Option<usize> {
        self.objective.loss_chunk_rows()
    }

    pub fn trainable_parameters(&self) -> usize {
        self.student.store.count_trainable()
    }

    /// Builds both models with random weights (teacher seed `seed + 1`, student `seed + 2`, as
    /// the peer seeds them) and the batch (seed `seed`). Clipping is off, as in the peer's step.
    pub fn new(spec: &BenchSpec, seed: u64) -> Result<Self> {
        Self::with_student_lora(spec, seed, None)
    }

    /// [`DftStep::new`] with the student's LLM trained through rank-`lora_rank` adapters on
    /// all its linear layers (the projector still trains fully), as LLaVA's LoRA recipe does.
    pub fn with_student_lora(
        spec: &BenchSpec,
        seed: u64,
        lora_rank: Option<usize>,
    ) -> Result<Self> {
        Self::on_device(spec, seed, lora_rank, &Device::Cpu)
    }

    /// [`DftStep::with_student_lora`] with both models and the batch on `device`.
    pub fn on_device(
        spec: &BenchSpec,
        seed: u64,
        lora_rank: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        spec.validate()?;
        let device = device.clone();
        let build = |lm, trainable, seed, lora| build(spec, lm, trainable, seed, lora, &device);
        let teacher = build(&spec.teacher, Trainable::NONE, seed + 1, None)
            .context("building the teacher")?;
        let (trainable, lora) = match lora_rank {
            Some(rank) => (
                Trainable::PROJECTOR,
                Some(Arc::new(mmkd_nn::LoraPlan {
                    targets: mmkd_nn::LoraTargets::Rule {
                        modules: vec![crate::models::llava::LM_PREFIX.into()],
                        names: vec![mmkd_nn::lora::ALL_LINEAR.into()],
                    },
                    rank,
                    alpha: 2.0 * rank as f64,
                    rslora: false,
                    dropout: 0.0,
                    trainable: true,
                    require_weights: false,
                })),
            ),
            None => (Trainable::PROJECTOR_AND_LLM, None),
        };
        let student =
            build(&spec.student, trainable, seed + 2, lora).context("building the student")?;
        let vars = student.store.trainable_vars();
        let optimizer = AdamW::new(
            vars.clone(),
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let distill = DistillLossConfig::default();
        Ok(Self {
            teacher,
            student,
            learner: TrainStep::new(vars, optimizer, 0.0),
            batch: BenchBatch::random(spec, seed, &device)?,
            objective: Objective::new(&TermSpec::builtin(true, &distill), &distill)?,
            distill,
            pending: Vec::new(),
            teacher_overlap: true,
            student_shards: 1,
        })
    }

    /// Whether the frozen work for the next step (the teacher's forward, the student's vision
    /// tower) runs alongside this step's student update (the default) or inside the step,
    /// phase after phase.
    pub fn set_teacher_overlap(&mut self, overlap: bool) {
        self.teacher_overlap = overlap;
        self.pending.clear();
    }

    /// Splits the batch into `shards` row ranges whose student forward, loss and backward run
    /// concurrently, their gradients averaged for one AdamW step (gradient accumulation over
    /// micro-batches run side by side).
    pub fn set_student_shards(&mut self, shards: usize) -> Result<()> {
        ensure!(
            (1..=self.spec_batch()).contains(&shards),
            "student shards must be between 1 and the batch size ({}), got {shards}",
            self.spec_batch()
        );
        self.student_shards = shards;
        self.pending.clear();
        Ok(())
    }

    pub fn student(&self) -> &LlavaModel {
        &self.student
    }

    /// Runs one full step and returns its phase timings and loss.
    pub fn run(&mut self) -> Result<StepOutcome> {
        self.step(Teacher::Online)
    }

    /// Runs one step that reads the teacher from `cache` (written by
    /// [`DftStep::write_teacher_cache`]) instead of running it; the cache read is timed as
    /// `teacher_forward`.
    pub fn run_cached(&mut self, cache: &TeacherCache) -> Result<StepOutcome> {
        self.step(Teacher::Cached(cache))
    }

    fn step(&mut self, teacher: Teacher<'_>) -> Result<StepOutcome> {
        let clock = Instant::now();
        let mut source = Shards {
            teacher_model: &self.teacher,
            student: &self.student,
            batch: &self.batch,
            shards: self.student_shards,
            overlap: self.teacher_overlap,
            teacher,
            teacher_hidden_only: self.objective.loss_chunk_rows().is_some(),
            pending: std::mem::take(&mut self.pending),
        };
        // The first shard carries the time of the teacher forward on the batch this step trains
        // on (done during the previous step, or at the start of this one).
        let teacher_forward = AtomicU64::new(0f64.to_bits());
        let (student, teacher_model, objective) = (&self.student, &self.teacher, &self.objective);
        let loss_of = |shard: &Shard| -> Result<MicroLoss> {
            let clock = Instant::now();
            let cached = match teacher {
                Teacher::Cached(cache) => {
                    let ids: Vec<String> = shard.sample_ids();
                    let keys: Vec<(usize, &str)> = shard
                        .rows
                        .clone()
                        .zip(&ids)
                        .map(|(b, id)| (b, id.as_str()))
                        .collect();
                    Some(cache.batch(&keys, shard.batch.tokens.seq_len(), student.device())?)
                }
                Teacher::Online => {
                    if shard.rows.start == 0 {
                        teacher_forward.store(shard.teacher_seconds.to_bits(), Ordering::Relaxed);
                    }
                    None
                }
            };
            let read = clock.elapsed().as_secs_f64();
            let rows = match (&cached, &shard.teacher_out) {
                (Some(rows), _) => TeacherRows::Cached {
                    rows,
                    truncate: None,
                },
                (None, Some(TeacherForward::Full(output))) => TeacherRows::Online {
                    output,
                    teacher: teacher_model,
                    truncate: None,
                    aligned: None,
                },
                (None, Some(TeacherForward::Hidden(hidden))) => TeacherRows::OnlineHidden {
                    hidden,
                    teacher: teacher_model,
                    truncate: None,
                },
                (None, None) => anyhow::bail!("the teacher's output of this shard is missing"),
            };
            let images = match &shard.tower {
                Some(features) => ImageInput::Tower(features),
                None => ImageInput::Pixels(&shard.batch.pixels),
            };
            let mut loss = objective_loss(
                student,
                StudentBatch::of_data(
                    &shard.batch.tokens,
                    &shard.batch.labels,
                    &shard.batch.visual_mask,
                    Some(images),
                ),
                rows,
                objective,
            )
            .context("distillation loss")?;
            loss.teacher_read_seconds = read;
            Ok(loss)
        };
        let report = self.learner.run(&mut source, LEARNING_RATE, &loss_of)?;
        ensure!(
            report.without_grad == 0,
            "{} trainable parameters got no gradient",
            report.without_grad
        );
        let mut times = report.times;
        if let Teacher::Online = teacher {
            times.teacher_forward = f64::from_bits(teacher_forward.load(Ordering::Relaxed));
        }
        self.pending = source.pending;
        Ok(StepOutcome {
            times,
            wall: clock.elapsed().as_secs_f64(),
            loss: report.loss,
        })
    }

    /// In a data-parallel job (`mpirun -np N mmkd bench`), keeps this rank's rows of the
    /// batch and all-reduces the gradients, so the job's step is the spec's. Returns the bytes
    /// each rank hands to the all-reduce per step (0 in one process).
    pub fn join_data_parallel(&mut self) -> Result<u64> {
        let world = crate::runtime::world::world();
        let Some(sync) = DataParallel::for_device(self.student.device())? else {
            return Ok(0);
        };
        let rows = shard_ranges(self.spec_batch(), world.size());
        ensure!(
            rows.len() == world.size(),
            "a batch of {} cannot be split over {} ranks",
            self.spec_batch(),
            world.size()
        );
        self.batch = self.batch.rows(rows[world.rank()].clone())?;
        let bytes = sync.bytes_per_step(self.learner.vars());
        self.learner.set_sync(Box::new(sync));
        Ok(bytes)
    }

    fn spec_batch(&self) -> usize {
        self.batch.tokens.batch_size()
    }

    /// Runs the teacher on the batch once and writes its top-k rows and relation matrices as
    /// a teacher cache in `dir` (sample b of the batch is record b).
    pub fn write_teacher_cache(&self, dir: &std::path::Path, top_k: usize) -> Result<()> {
        let batch = &self.batch;
        let out = self
            .teacher
            .forward(&batch.tokens, Some(&batch.pixels))
            .context("teacher forward")?;
        let logits = out.logits.detach();
        let (b, seq, vocab) = logits.dims3()?;
        let response = response_rows(&batch.labels)?;
        let visual = visual_positions_per_sample(&batch.visual_mask)?;
        let visual_counts: Vec<usize> = visual.iter().map(Vec::len).collect();
        let relations = if hidden_form_is_cheaper(
            &visual_counts,
            vocab,
            self.student.lm.lm_head_weight().dim(1)?,
            self.teacher.lm.lm_head_weight().dim(1)?,
        ) {
            relation_matrices_from_hidden(
                &out.hidden,
                self.teacher.lm.lm_head_weight(),
                &batch.visual_mask,
            )?
        } else {
            relation_matrices(&logits, &batch.visual_mask)?
        };
        let (mut writer, _) =
            CacheWriter::open(dir, serde_json::json!({"bench": true}), top_k, b.max(1))?;
        let mut totals = (0, 0);
        for (row, rel) in relations.into_iter().enumerate() {
            let response_positions: Vec<u32> = response
                .rows
                .iter()
                .filter(|&&r| r as usize / seq == row)
                .map(|&r| r % seq as u32)
                .collect();
            let visual_positions = visual[row].clone();
            let top = |positions: &[u32]| -> Result<TopKHost> {
                if positions.is_empty() {
                    return Ok(TopKHost::empty(top_k));
                }
                let rows: Vec<u32> = positions.iter().map(|t| (row * seq) as u32 + t).collect();
                TopKHost::from_logits(
                    &gather_rows(&logits, &rows)?,
                    top_k,
                    self.distill.temperature,
                )
            };
            totals.0 += response_positions.len();
            totals.1 += visual_positions.len();
            writer.push(&SampleRecord {
                index: row,
                response: top(&response_positions)?,
                visual: top(&visual_positions)?,
                response_positions,
                visual_positions,
                relation: match rel {
                    Some(r) => Some(r.flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                },
            })?;
        }
        writer.finish(Manifest {
            run: crate::teacher_cache::RunIdentity {
                format_version: crate::teacher_cache::FORMAT_VERSION,
                stage_kind: "chat".into(),
                data_digest: "bench".into(),
                images: "bench".into(),
                template: "bench".into(),
                template_digest: "bench".into(),
                tokenizer_digest: "bench".into(),
                processor_digest: "bench".into(),
                max_length: seq,
                temperature: self.distill.temperature,
                truncate_vocab: None,
                teacher_routings: 1,
                routing_seed: 0,
            },
            teacher: crate::teacher_cache::TeacherIdentity {
                path: "bench (random weights)".into(),
                digest: "bench".into(),
            },
            top_k,
            vocab,
            image_token_id: self.teacher.image_token_id(),
            tokens_per_image: self.teacher.tokens_per_image(),
            relations: true,
            visual: true,
            data: "bench (random batch)".into(),
            samples: b,
            response_positions: totals.0,
            visual_positions: totals.1,
            skipped: Default::default(),
            shards: Vec::new(),
        })?;
        Ok(())
    }
}

pub(crate) fn build(
    spec: &BenchSpec,
    lm: &LmSpec,
    trainable: Trainable,
    seed: u64,
    lora: Option<Arc<mmkd_nn::LoraPlan>>,
    device: &Device,
) -> Result<LlavaModel> {
    let config = spec.llava_config(lm)?;
    let mut options = BuildOptions::new(trainable, seed);
    options.lora = lora;
    options.device = device.clone();
    // Every weight is freshly initialised: nothing is required from the (empty) source.
    options.require.clear();
    LlavaModel::build(&config, Arc::new(WeightSource::empty()), &options)
}

/// `shards` contiguous row ranges covering `0..rows`, sizes differing by at most one.
fn shard_ranges(rows: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, rows.max(1));
    (0..shards)
        .map(|i| (i * rows / shards)..((i + 1) * rows / shards))
        .collect()
}
