//! One optimizer step, the same for every stage, the bench and the demo's tower stage:
//! micro-batches → forward and objective → backward (side by side within a chunk) →
//! accumulate → gradient sync → clip → AdamW.
//!
//! Work that no trained weight changes (a frozen online teacher, a frozen vision tower) for the
//! micro-batches that come next runs alongside the current chunk's forward and backward, and
//! alongside the update after the last chunk: its gemm tasks fill the cores the student's
//! serial stretches leave idle. It changes no number.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;

use super::{clip_grad_norm, grad_global_norm, AdamW, GradAccumulator};
use crate::objective::TermValues;
use crate::runtime::{GradientSync, SingleProcess};

/// One micro-batch of any kind the step can train on.
pub trait MicroBatch: Sync {
    /// Samples it holds (for samples/s and the samples seen).
    fn samples(&self) -> usize;
    /// Its samples' ids, named when its loss is not finite.
    fn sample_ids(&self) -> Vec<String>;
}

/// Where a step's micro-batches come from: `chunks()` groups of micro-batches that run side by
/// side, and the frozen work for what comes next, done early.
pub trait MicroBatchSource: Sync {
    type Item: MicroBatch + Send;
    /// Chunks of micro-batches this step runs.
    fn chunks(&self) -> usize;
    /// Chunk `chunk`'s micro-batches, ready to train on (prepared now unless they were
    /// prepared ahead).
    fn take(&mut self, chunk: usize) -> Result<Vec<Self::Item>>;
    /// The micro-batches that come after chunk `chunk` (the next chunk, or the next step's
    /// first), prepared as far as no trained weight is involved; run alongside chunk `chunk`.
    fn prepare_ahead(&self, chunk: usize) -> Result<Vec<Self::Item>>;
    /// Keeps what [`MicroBatchSource::prepare_ahead`] returned for the next `take`.
    fn keep_ahead(&mut self, ready: Vec<Self::Item>);
}

/// A step of one micro-batch and no frozen work to do ahead (e.g. the demo's tower stage, whose
/// only model trains).
pub struct OneMicroBatch<M>(pub Option<M>);

impl<M: MicroBatch + Send> MicroBatchSource for OneMicroBatch<M> {
    type Item = M;

    fn chunks(&self) -> usize {
        1
    }

    fn take(&mut self, _chunk: usize) -> Result<Vec<M>> {
        Ok(self.0.take().into_iter().collect())
    }

    fn prepare_ahead(&self, _chunk: usize) -> Result<Vec<M>> {
        Ok(Vec::new())
    }

    fn keep_ahead(&mut self, _ready: Vec<M>) {}
}

/// The loss of one micro-batch.
pub struct MicroLoss {
    /// The objective's total, part of the graph.
    pub total: Tensor,
    pub value: f32,
    /// Each term's value.
    pub terms: TermValues,
    /// Seconds of this micro-batch's forward and loss spent reading the teacher's side (a
    /// cache read; 0 for an online teacher, whose forward runs elsewhere), and on the
    /// student's forward: the bench's phase times.
    pub teacher_read_seconds: f64,
    pub student_forward_seconds: f64,
}

impl MicroLoss {
    pub fn new(total: Tensor, value: f32, terms: TermValues) -> Self {
        Self {
            total,
            value,
            terms,
            teacher_read_seconds: 0.0,
            student_forward_seconds: 0.0,
        }
    }
}

/// A loss that is not a finite number: the step stops before updating anything.
#[derive(Debug, thiserror::Error)]
#[error("{what} is {value} (samples {})", sample_ids.join(", "))]
pub struct NotFinite {
    pub what: String,
    pub value: f64,
    pub sample_ids: Vec<String>,
}

/// Seconds of one step's phases; forward, loss and backward are those of its first
/// micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
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

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Mean loss over the micro-batches.
    pub loss: f32,
    /// Each term's mean over the micro-batches that had it.
    pub terms: TermValues,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub samples: usize,
    /// Trainable parameters that got no gradient.
    pub without_grad: usize,
    pub times: StepTimes,
}

/// The learner's update: the trainable parameters, AdamW, clipping and the gradient sync.
pub struct TrainStep {
    vars: Vec<(String, Var)>,
    optimizer: AdamW,
    /// Global-norm clipping (0: none, the norm is still measured).
    max_grad_norm: f64,
    sync: Box<dyn GradientSync>,
}

impl TrainStep {
    /// A step over `optimizer`'s parameters in one process.
    pub fn new(vars: Vec<(String, Var)>, optimizer: AdamW, max_grad_norm: f64) -> Self {
        Self {
            vars,
            optimizer,
            max_grad_norm,
            sync: Box::new(SingleProcess),
        }
    }

    /// Replaces the gradient sync (data-parallel training).
    pub fn with_sync(mut self, sync: Box<dyn GradientSync>) -> Self {
        self.sync = sync;
        self
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Runs one step at learning rate `lr` over `source`'s chunks, each micro-batch's loss
    /// from `loss_of`.
    pub fn run<S: MicroBatchSource>(
        &mut self,
        source: &mut S,
        lr: f64,
        loss_of: &(dyn Fn(&S::Item) -> Result<MicroLoss> + Sync),
    ) -> Result<StepReport> {
        let chunks = source.chunks();
        anyhow::ensure!(chunks > 0, "a step needs at least one micro-batch");
        let mut accum = GradAccumulator::new(&self.vars);
        let mut sums = TermSums::default();
        let mut times: Option<StepTimes> = None;
        let mut samples = 0;
        let mut update = None;
        for chunk in 0..chunks {
            let current = source.take(chunk)?;
            let last = chunk + 1 == chunks;
            let source_ref = &*source;
            let (ahead, done) = rayon::join(
                || source_ref.prepare_ahead(chunk),
                || -> Result<Option<Update>> {
                    let results = current
                        .par_iter()
                        .map(|mb| backward(mb, loss_of))
                        .collect::<Result<Vec<_>>>()?;
                    for (mb, (loss, grads, t)) in current.iter().zip(results) {
                        accum.add(&grads)?;
                        sums.add(&loss);
                        samples += mb.samples();
                        times.get_or_insert(t);
                    }
                    if last {
                        self.update(&accum, lr).map(Some)
                    } else {
                        Ok(None)
                    }
                },
            );
            // A failed update must not be hidden behind an error of the look-ahead.
            update = done?;
            source.keep_ahead(ahead?);
        }
        let update = update.context("the step ended without an update")?;
        let mut times = times.unwrap_or_default();
        times.optimizer = update.optimizer_seconds;
        Ok(StepReport {
            loss: sums.mean_loss(),
            terms: sums.means(),
            grad_norm: update.grad_norm,
            lr,
            samples,
            without_grad: update.without_grad,
            times,
        })
    }

    /// Mean of the accumulated gradients → sync → clip → AdamW.
    fn update(&mut self, accum: &GradAccumulator, lr: f64) -> Result<Update> {
        let clock = Instant::now();
        let mut grads = accum.mean()?;
        self.sync.sync(&mut grads, &self.vars)?;
        let grad_norm = if self.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, &self.vars, self.max_grad_norm)?
        } else {
            grad_global_norm(&grads, &self.vars)?
        };
        if !grad_norm.is_finite() {
            return Err(NotFinite {
                what: "the gradient norm".into(),
                value: grad_norm,
                sample_ids: Vec::new(),
            }
            .into());
        }
        let stats = self.optimizer.step(&grads, lr)?;
        Ok(Update {
            grad_norm,
            without_grad: stats.without_grad,
            optimizer_seconds: clock.elapsed().as_secs_f64(),
        })
    }
}

struct Update {
    grad_norm: f64,
    without_grad: usize,
    optimizer_seconds: f64,
}

/// One micro-batch's loss and gradients, with its phase times.
fn backward<M: MicroBatch>(
    mb: &M,
    loss_of: &(dyn Fn(&M) -> Result<MicroLoss> + Sync),
) -> Result<(MicroLoss, GradStore, StepTimes)> {
    let clock = Instant::now();
    let loss = loss_of(mb)?;
    let forward_and_loss = clock.elapsed().as_secs_f64();
    if !loss.value.is_finite() {
        return Err(NotFinite {
            what: "the loss".into(),
            value: loss.value as f64,
            sample_ids: mb.sample_ids(),
        }
        .into());
    }
    let clock = Instant::now();
    let grads = loss.total.backward().context("backward")?;
    let times = StepTimes {
        teacher_forward: loss.teacher_read_seconds,
        student_forward: loss.student_forward_seconds,
        loss: (forward_and_loss - loss.teacher_read_seconds - loss.student_forward_seconds)
            .max(0.0),
        backward: clock.elapsed().as_secs_f64(),
        optimizer: 0.0,
    };
    Ok((loss, grads, times))
}

/// Running sums of the loss and of each term over a step's micro-batches.
#[derive(Default)]
struct TermSums {
    loss: f64,
    micro_batches: usize,
    /// name → (sum, micro-batches that had the term), in the objective's order.
    terms: Vec<(String, f64, usize)>,
}

impl TermSums {
    fn add(&mut self, loss: &MicroLoss) {
        self.loss += loss.value as f64;
        self.micro_batches += 1;
        for (name, value) in &loss.terms.0 {
            let at = match self.terms.iter().position(|(n, _, _)| n == name) {
                Some(at) => at,
                None => {
                    self.terms.push((name.clone(), 0.0, 0));
                    self.terms.len() - 1
                }
            };
            if let Some(v) = value {
                self.terms[at].1 += *v as f64;
                self.terms[at].2 += 1;
            }
        }
    }

    fn mean_loss(&self) -> f32 {
        if self.micro_batches == 0 {
            f32::NAN
        } else {
            (self.loss / self.micro_batches as f64) as f32
        }
    }

    fn means(&self) -> TermValues {
        TermValues(
            self.terms
                .iter()
                .map(|(name, sum, n)| (name.clone(), (*n > 0).then(|| (sum / *n as f64) as f32)))
                .collect(),
        )
    }
}
