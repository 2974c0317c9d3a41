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
use crate::distill::{
    distill_loss, hidden_form_is_cheaper, DistillBatch, DistillLossConfig, RelationHidden,
};
use crate::models::llava::{BuildOptions, LlavaModel, Trainable};
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
        })
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
        let batch = &self.batch;
        let clock = Instant::now();
        let teacher = self
            .teacher
            .forward(&batch.tokens, Some(&batch.pixels))
            .context("teacher forward")?;
        let teacher_forward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let student = self
            .student
            .forward(&batch.tokens, Some(&batch.pixels))
            .context("student forward")?;
        let student_forward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let terms = distill_loss(
            &DistillBatch {
                student_logits: &student.logits,
                teacher_logits: &teacher.logits,
                labels: &batch.labels,
                visual_mask: &batch.visual_mask,
                // Z Zᵀ = H (WᵀW) Hᵀ gives the same L_rel; use it only where it is cheaper.
                relation_hidden: self.relation_from_hidden.then_some(RelationHidden {
                    student_hidden: &student.hidden,
                    student_head: self.student.lm.lm_head_weight(),
                    teacher_hidden: &teacher.hidden,
                    teacher_head: self.teacher.lm.lm_head_weight(),
                }),
            },
            &self.loss,
        )
        .context("distillation loss")?;
        let loss = clock.elapsed().as_secs_f64();
        ensure!(
            terms.total_value.is_finite(),
            "the loss is not finite ({})",
            terms.total_value
        );

        let clock = Instant::now();
        let grads = terms.total.backward().context("backward")?;
        let backward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let stats = self.optimizer.step(&grads, LEARNING_RATE)?;
        let optimizer = clock.elapsed().as_secs_f64();
        ensure!(
            stats.without_grad == 0,
            "{} trainable parameters got no gradient",
            stats.without_grad
        );
        let times = StepTimes {
            teacher_forward,
            student_forward,
            loss,
            backward,
            optimizer,
        };
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
