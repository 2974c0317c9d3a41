//! One LLaVA-KD distilled fine-tuning (DFT) step with random weights, timed by phase:
//! teacher forward (constants, no graph), student forward, loss
//! (CE + L_res + L_vis + 0.5·L_rel, forward KL), backward, AdamW on projector + LLM.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use mmkd_nn::WeightSource;
use rayon::prelude::*;
use serde::Serialize;

use super::data::BenchBatch;
use super::spec::{BenchSpec, LmSpec};
use crate::distill::positions::{gather_rows, response_rows, visual_positions_per_sample};
use crate::distill::{
    distill_loss, distill_loss_cached, hidden_form_is_cheaper, relation_matrices,
    relation_matrices_from_hidden, CachedDistillBatch, CachedTeacher, DistillBatch,
    DistillLossConfig, LossTerms, RelationHidden, StudentLogits, TopKHost,
};
use crate::models::llava::{BuildOptions, ImageInput, LlavaModel, LlavaOutput, Trainable};
use crate::teacher_cache::{CacheWriter, Manifest, SampleRecord, TeacherCache};
use crate::train::{AdamW, AdamWConfig};

/// Learning rate of the peer's AdamW.
const LEARNING_RATE: f64 = 2e-5;

/// Seconds spent in each phase of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepTimes {
    pub teacher_forward: f64,
    pub student_forward: f64,
    pub loss: f64,
    pub backward: f64,
    pub optimizer: f64,
}

impl StepTimes {
    pub fn total(&self) -> f64 {
        self.teacher_forward + self.student_forward + self.loss + self.backward + self.optimizer
    }
}

/// What one step produced.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    pub times: StepTimes,
    /// Wall time of the whole step, freeing the graph included.
    pub wall: f64,
    pub loss: f32,
}

/// Teacher, student, optimizer and batch of the benchmark step.
pub struct DftStep {
    teacher: LlavaModel,
    student: LlavaModel,
    optimizer: AdamW,
    batch: BenchBatch,
    loss: DistillLossConfig,
    relation_from_hidden: bool,
    /// The teacher's output on the next batch, computed during the previous step.
    pending_teacher: Option<(LlavaOutput, f64)>,
    /// The student's frozen-tower features of the next batch, computed during the previous
    /// step (they depend on no trained weight).
    pub(super) pending_tower: Option<Tensor>,
    /// Whether the frozen work of the next step (teacher forward, student tower) runs
    /// alongside this step's update.
    teacher_overlap: bool,
    /// Row ranges of the batch whose student forward and backward run concurrently.
    student_shards: usize,
}

impl DftStep {
    /// Builds both models with random weights (teacher seed `seed + 1`, student `seed + 2`, as
    /// the peer seeds them) and the batch (seed `seed`).
    pub fn new(spec: &BenchSpec, seed: u64) -> Result<Self> {
        spec.validate()?;
        let device = Device::Cpu;
        let teacher = build(spec, &spec.teacher, Trainable::NONE, seed + 1)
            .context("building the teacher")?;
        let student = build(spec, &spec.student, Trainable::PROJECTOR_AND_LLM, seed + 2)
            .context("building the student")?;
        let optimizer = AdamW::new(
            student.store.trainable_vars(),
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        Ok(Self {
            teacher,
            student,
            optimizer,
            batch: BenchBatch::random(spec, seed, &device)?,
            loss: DistillLossConfig::default(),
            relation_from_hidden: hidden_form_is_cheaper(
                &vec![spec.image_tokens(); spec.batch],
                spec.vocab,
                spec.student.hidden,
                spec.teacher.hidden,
            ),
            pending_teacher: None,
            pending_tower: None,
            teacher_overlap: true,
            student_shards: 1,
        })
    }

    /// Whether the frozen work for the next step (the teacher's forward, the student's vision
    /// tower) runs alongside this step's student update (the default) or inside the step,
    /// phase after phase.
    pub fn set_teacher_overlap(&mut self, overlap: bool) {
        self.teacher_overlap = overlap;
        self.pending_teacher = None;
        self.pending_tower = None;
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
        Ok(())
    }

    pub fn student(&self) -> &LlavaModel {
        &self.student
    }

    /// Runs one full step and returns its phase timings and loss.
    pub fn run(&mut self) -> Result<StepOutcome> {
        let clock = Instant::now();
        let (times, loss) = self.phases()?;
        Ok(StepOutcome {
            times,
            wall: clock.elapsed().as_secs_f64(),
            loss,
        })
    }

    fn phases(&mut self) -> Result<(StepTimes, f32)> {
        // The teacher is frozen, so its forward for the next batch does not wait for this
        // step's update: it runs alongside the student's forward, loss, backward and AdamW on
        // the same rayon pool, whose idle worker picks up its gemm tasks whenever the student
        // is in a serial stretch. The first step runs it up front.
        let (teacher, teacher_forward) = match self.pending_teacher.take() {
            Some(ready) => ready,
            None => timed_teacher_forward(&self.teacher, &self.batch)?,
        };
        let tower = self.pending_tower.take();
        let Self {
            teacher: teacher_model,
            student,
            optimizer,
            batch,
            loss,
            relation_from_hidden,
            pending_teacher,
            pending_tower,
            teacher_overlap,
            student_shards,
        } = self;
        let teacher_head = relation_from_hidden.then_some(teacher_model.lm.lm_head_weight());
        let loss_of = |rows: Range<usize>, shard: &BenchBatch, out: &ShardForward| {
            let narrow = |t: &Tensor| t.narrow(0, rows.start, rows.len());
            let (t_logits, t_hidden) = (narrow(&teacher.logits)?, narrow(&teacher.hidden)?);
            let terms = distill_loss(
                &DistillBatch {
                    student_logits: out.logits()?,
                    teacher_logits: &t_logits,
                    labels: &shard.labels,
                    visual_mask: &shard.visual_mask,
                    // Z Zᵀ = H (WᵀW) Hᵀ gives the same L_rel; used only where it is cheaper.
                    relation_hidden: teacher_head.map(|teacher_head| RelationHidden {
                        student_hidden: &out.hidden,
                        student_head: student.lm.lm_head_weight(),
                        teacher_hidden: &t_hidden,
                        teacher_head,
                    }),
                },
                loss,
            )
            .context("distillation loss")?;
            Ok((terms, 0.0))
        };
        let mut update = || {
            student_update(
                student,
                tower.as_ref(),
                optimizer,
                batch,
                *student_shards,
                true,
                &loss_of,
            )
        };
        let (mut times, value) = if *teacher_overlap {
            let ahead = || -> Result<_> {
                Ok((
                    timed_teacher_forward(teacher_model, batch)?,
                    frozen_tower_features(student, batch)?,
                ))
            };
            let (next, result) = rayon::join(ahead, update);
            let (next_teacher, next_tower) = next?;
            *pending_teacher = Some(next_teacher);
            *pending_tower = next_tower;
            result?
        } else {
            update()?
        };
        times.teacher_forward = teacher_forward;
        Ok((times, value))
    }

    /// Runs one step that reads the teacher from `cache` (written by
    /// [`DftStep::write_teacher_cache`]) instead of running it; the cache read is timed as
    /// `teacher_forward`.
    pub fn run_cached(&mut self, cache: &TeacherCache) -> Result<StepOutcome> {
        let clock = Instant::now();
        let (times, loss) = self.phases_cached(cache)?;
        Ok(StepOutcome {
            times,
            wall: clock.elapsed().as_secs_f64(),
            loss,
        })
    }

    fn phases_cached(&mut self, cache: &TeacherCache) -> Result<(StepTimes, f32)> {
        let ids: Vec<String> = (0..self.spec_batch())
            .map(|b| format!("bench-{b}"))
            .collect();
        let keys: Vec<(usize, &str)> = ids
            .iter()
            .enumerate()
            .map(|(b, id)| (b, id.as_str()))
            .collect();
        let tower = self.pending_tower.take();
        let student = &self.student;
        let loss_config = &self.loss;
        let loss_of = |rows: Range<usize>, shard: &BenchBatch, out: &ShardForward| {
            let clock = Instant::now();
            let cached = cache.batch(&keys[rows], shard.tokens.seq_len(), student.device())?;
            let read = clock.elapsed().as_secs_f64();
            let terms = distill_loss_cached(
                &CachedDistillBatch {
                    student_logits: StudentLogits::AtRows {
                        hidden: &out.hidden,
                        head: student.lm.lm_head_weight(),
                    },
                    labels: &shard.labels,
                    visual_mask: &shard.visual_mask,
                    teacher: CachedTeacher {
                        response: &cached.response,
                        visual: &cached.visual,
                        relations: &cached.relations,
                    },
                    student_relation: None,
                },
                loss_config,
            )
            .context("distillation loss from the teacher cache")?;
            Ok((terms, read))
        };
        let (optimizer, batch, shards) = (&mut self.optimizer, &self.batch, self.student_shards);
        let mut update = || {
            student_update(
                student,
                tower.as_ref(),
                optimizer,
                batch,
                shards,
                false,
                &loss_of,
            )
        };
        if !self.teacher_overlap {
            return update();
        }
        // No teacher to run: the next step's frozen tower fills the gaps instead.
        let (next_tower, result) = rayon::join(|| frozen_tower_features(student, batch), update);
        self.pending_tower = next_tower?;
        result
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
        let relations = if self.relation_from_hidden {
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
                TopKHost::from_logits(&gather_rows(&logits, &rows)?, top_k, self.loss.temperature)
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
                temperature: self.loss.temperature,
                truncate_vocab: None,
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

fn build(spec: &BenchSpec, lm: &LmSpec, trainable: Trainable, seed: u64) -> Result<LlavaModel> {
    let config = spec.llava_config(lm)?;
    let mut options = BuildOptions::new(trainable, seed);
    // Every weight is freshly initialised: nothing is required from the (empty) source.
    options.require.clear();
    LlavaModel::build(&config, Arc::new(WeightSource::empty()), &options)
}

/// The teacher's forward on `batch` and its seconds.
fn timed_teacher_forward(teacher: &LlavaModel, batch: &BenchBatch) -> Result<(LlavaOutput, f64)> {
    let clock = Instant::now();
    let out = teacher
        .forward(&batch.tokens, Some(&batch.pixels))
        .context("teacher forward")?;
    Ok((out, clock.elapsed().as_secs_f64()))
}

/// The student's frozen-tower features on `batch`, for the next step.
fn frozen_tower_features(student: &LlavaModel, batch: &BenchBatch) -> Result<Option<Tensor>> {
    student
        .frozen_tower_features(&batch.pixels)
        .context("student vision tower")
}

/// One shard's distillation loss from the student's output on it (rows `rows` of the batch),
/// with the seconds spent getting the teacher's side (a cache read; 0 for an online teacher).
type ShardLoss<'a> =
    dyn Fn(Range<usize>, &BenchBatch, &ShardForward) -> Result<(LossTerms, f64)> + Sync + 'a;

/// The student's forward on one shard: hidden states, and logits at every position when the
/// loss reads them so (the cached loss computes its rows' logits itself).
struct ShardForward {
    hidden: Tensor,
    logits: Option<Tensor>,
}

impl ShardForward {
    fn logits(&self) -> Result<&Tensor> {
        self.logits
            .as_ref()
            .context("this step's student forward computed no full logits")
    }
}

/// What one shard's forward, loss and backward produced.
struct ShardOutcome {
    times: StepTimes,
    loss: f32,
    grads: GradStore,
}

/// Student forward, loss, backward over `shards` equal row ranges of the batch (concurrently
/// when more than one), then AdamW on the mean of their gradients. The phase times are those
/// of the first shard; AdamW's is its own.
fn student_update(
    student: &LlavaModel,
    tower: Option<&Tensor>,
    optimizer: &mut AdamW,
    batch: &BenchBatch,
    shards: usize,
    full_logits: bool,
    loss_of: &ShardLoss<'_>,
) -> Result<(StepTimes, f32)> {
    let run_shard = |rows: Range<usize>| -> Result<ShardOutcome> {
        let shard = batch.rows(rows.clone())?;
        let clock = Instant::now();
        let shard_tower = tower
            .map(|t| t.narrow(0, rows.start, rows.len()))
            .transpose()?;
        let images = match &shard_tower {
            Some(features) => ImageInput::Tower(features),
            None => ImageInput::Pixels(&shard.pixels),
        };
        let out = student
            .forward_images_hidden(&shard.tokens, Some(images))
            .context("student forward")?;
        let out = ShardForward {
            logits: full_logits
                .then(|| student.lm.logits(&out.hidden))
                .transpose()?,
            hidden: out.hidden,
        };
        let student_forward = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let (terms, teacher_forward) = loss_of(rows, &shard, &out)?;
        let loss = clock.elapsed().as_secs_f64() - teacher_forward;
        ensure!(
            terms.total_value.is_finite(),
            "the loss is not finite ({})",
            terms.total_value
        );
        let clock = Instant::now();
        let grads = terms.total.backward().context("backward")?;
        Ok(ShardOutcome {
            times: StepTimes {
                teacher_forward,
                student_forward,
                loss,
                backward: clock.elapsed().as_secs_f64(),
                optimizer: 0.0,
            },
            loss: terms.total_value,
            grads,
        })
    };
    let ranges = shard_ranges(batch.tokens.batch_size(), shards);
    let outcomes: Vec<ShardOutcome> = ranges
        .into_par_iter()
        .map(run_shard)
        .collect::<Result<_>>()?;
    let mut times = outcomes[0].times;
    let loss = outcomes.iter().map(|o| o.loss).sum::<f32>() / outcomes.len() as f32;

    let clock = Instant::now();
    let grads: Vec<&GradStore> = outcomes.iter().map(|o| &o.grads).collect();
    let stats = optimizer.step_mean(&grads, LEARNING_RATE)?;
    times.optimizer = clock.elapsed().as_secs_f64();
    ensure!(
        stats.without_grad == 0,
        "{} trainable parameters got no gradient",
        stats.without_grad
    );
    Ok((times, loss))
}

/// `shards` contiguous row ranges covering `0..rows`, sizes differing by at most one.
fn shard_ranges(rows: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, rows.max(1));
    (0..shards)
        .map(|i| (i * rows / shards)..((i + 1) * rows / shards))
        .collect()
}
