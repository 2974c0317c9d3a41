//! One LLaVA-KD distilled fine-tuning (DFT) step with random weights, timed by phase:
//! teacher forward (constants, no graph), student forward, loss
//! (CE + L_res + L_vis + 0.5·L_rel, forward KL), backward, AdamW on projector + LLM.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use mmkd_nn::WeightSource;
use serde::Serialize;

use super::data::BenchBatch;
use super::spec::{BenchSpec, LmSpec};
use crate::distill::positions::{gather_rows, response_rows, visual_positions_per_sample};
use crate::distill::{
    distill_loss, distill_loss_cached, hidden_form_is_cheaper, relation_matrices,
    relation_matrices_from_hidden, CachedDistillBatch, CachedTeacher, DistillBatch,
    DistillLossConfig, LossTerms, RelationHidden, StudentRelation, TopKHost,
};
use crate::models::llava::{BuildOptions, LlavaModel, LlavaOutput, Trainable};
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
    teacher_overlap: bool,
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
            teacher_overlap: true,
        })
    }

    /// Whether the teacher's forward for the next step runs alongside this step's student
    /// update (the default) or before it, phase after phase.
    pub fn set_teacher_overlap(&mut self, overlap: bool) {
        self.teacher_overlap = overlap;
        self.pending_teacher = None;
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
        if !self.teacher_overlap {
            let head = self
                .relation_from_hidden
                .then_some(self.teacher.lm.lm_head_weight());
            let (mut times, value) = student_update(
                &self.student,
                &mut self.optimizer,
                &self.batch,
                &self.loss,
                head,
                &teacher,
            )?;
            times.teacher_forward = teacher_forward;
            return Ok((times, value));
        }
        let Self {
            teacher: teacher_model,
            student,
            optimizer,
            batch,
            loss,
            relation_from_hidden,
            pending_teacher,
            ..
        } = self;
        let (next, result) = rayon::join(
            || timed_teacher_forward(teacher_model, batch),
            || {
                student_update(
                    student,
                    optimizer,
                    batch,
                    loss,
                    relation_from_hidden.then_some(teacher_model.lm.lm_head_weight()),
                    &teacher,
                )
            },
        );
        *pending_teacher = Some(next?);
        let (mut times, value) = result?;
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
        let batch = &self.batch;
        let clock = Instant::now();
        let ids: Vec<String> = (0..self.spec_batch())
            .map(|b| format!("bench-{b}"))
            .collect();
        let keys: Vec<(usize, &str)> = ids
            .iter()
            .enumerate()
            .map(|(b, id)| (b, id.as_str()))
            .collect();
        let cached = cache.batch(&keys, batch.tokens.seq_len(), self.student.device())?;
        let teacher_forward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let student = self
            .student
            .forward(&batch.tokens, Some(&batch.pixels))
            .context("student forward")?;
        let student_forward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let terms = distill_loss_cached(
            &CachedDistillBatch {
                student_logits: &student.logits,
                labels: &batch.labels,
                visual_mask: &batch.visual_mask,
                teacher: CachedTeacher {
                    response: &cached.response,
                    visual: &cached.visual,
                    relations: &cached.relations,
                },
                student_relation: if self.relation_from_hidden {
                    StudentRelation::Hidden {
                        hidden: &student.hidden,
                        head: self.student.lm.lm_head_weight(),
                    }
                } else {
                    StudentRelation::Logits(&student.logits)
                },
            },
            &self.loss,
        )
        .context("distillation loss from the teacher cache")?;
        let loss = clock.elapsed().as_secs_f64();
        let times = StepTimes {
            teacher_forward,
            student_forward,
            loss,
            ..Default::default()
        };
        self.update(terms, times)
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

    /// Backward and AdamW after a loss; fills in their times.
    fn update(&mut self, terms: LossTerms, times: StepTimes) -> Result<(StepTimes, f32)> {
        update(&mut self.optimizer, terms, times)
    }
}

/// Backward and AdamW after a loss; fills in their times.
fn update(
    optimizer: &mut AdamW,
    terms: LossTerms,
    mut times: StepTimes,
) -> Result<(StepTimes, f32)> {
    {
        ensure!(
            terms.total_value.is_finite(),
            "the loss is not finite ({})",
            terms.total_value
        );
        let clock = Instant::now();
        let grads = terms.total.backward().context("backward")?;
        let backward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let stats = optimizer.step(&grads, LEARNING_RATE)?;
        let optimizer = clock.elapsed().as_secs_f64();
        ensure!(
            stats.without_grad == 0,
            "{} trainable parameters got no gradient",
            stats.without_grad
        );
        times.backward = backward;
        times.optimizer = optimizer;
        Ok((times, terms.total_value))
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

/// Student forward, loss against `teacher`, backward and AdamW; `teacher_head` is the
/// teacher's LM head when RDist is computed from hidden states.
fn student_update(
    student: &LlavaModel,
    optimizer: &mut AdamW,
    batch: &BenchBatch,
    loss_config: &DistillLossConfig,
    teacher_head: Option<&candle_core::Tensor>,
    teacher: &LlavaOutput,
) -> Result<(StepTimes, f32)> {
    let clock = Instant::now();
    let out = student
        .forward(&batch.tokens, Some(&batch.pixels))
        .context("student forward")?;
    let student_forward = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let terms = distill_loss(
        &DistillBatch {
            student_logits: &out.logits,
            teacher_logits: &teacher.logits,
            labels: &batch.labels,
            visual_mask: &batch.visual_mask,
            // Z Zᵀ = H (WᵀW) Hᵀ gives the same L_rel; use it only where it is cheaper.
            relation_hidden: teacher_head.map(|teacher_head| RelationHidden {
                student_hidden: &out.hidden,
                student_head: student.lm.lm_head_weight(),
                teacher_hidden: &teacher.hidden,
                teacher_head,
            }),
        },
        loss_config,
    )
    .context("distillation loss")?;
    let loss = clock.elapsed().as_secs_f64();
    let times = StepTimes {
        student_forward,
        loss,
        ..Default::default()
    };
    update(optimizer, terms, times)
}
