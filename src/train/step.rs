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

use super::guard::{SpikeGuard, SpikeLimits};
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
    /// Loss and gradient-norm spike guards, checked before each update.
    guard: Option<SpikeGuard>,
}

impl TrainStep {
    /// A step over `optimizer`'s parameters in one process.
    pub fn new(vars: Vec<(String, Var)>, optimizer: AdamW, max_grad_norm: f64) -> Self {
        Self {
            vars,
            optimizer,
            max_grad_norm,
            sync: Box::new(SingleProcess),
            guard: None,
        }
    }

    /// Stops a step whose loss or gradient norm spikes (a [`Spike`] error, before the update).
    pub fn with_spike_guard(mut self, limits: SpikeLimits) -> Self {
        if limits != SpikeLimits::default() {
            self.guard = Some(SpikeGuard::new(limits));
        }
        self
    }

    /// Replaces the gradient sync (data-parallel training).
    pub fn with_sync(mut self, sync: Box<dyn GradientSync>) -> Self {
        self.sync = sync;
        self
    }

    /// [`TrainStep::with_sync`] in place.
    pub fn set_sync(&mut self, sync: Box<dyn GradientSync>) {
        self.sync = sync;
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
                        // Every process logs, guards and counts the whole step.
                        if self.sync.world_size() > 1 {
                            sums.sum_over_processes(&mut samples, self.sync.as_mut())?;
                        }
                        self.update(&accum, sums.mean_loss() as f64, lr).map(Some)
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
    fn update(&mut self, accum: &GradAccumulator, loss: f64, lr: f64) -> Result<Update> {
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
        if let Some(guard) = &mut self.guard {
            guard.check(loss, grad_norm)?;
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

    /// The sums (and `samples`) of all processes' micro-batches of the step; every process
    /// has the same terms, in the objective's order.
    fn sum_over_processes(
        &mut self,
        samples: &mut usize,
        sync: &mut dyn GradientSync,
    ) -> Result<()> {
        let mut values = vec![self.loss, self.micro_batches as f64, *samples as f64];
        for (_, sum, n) in &self.terms {
            values.extend([*sum, *n as f64]);
        }
        sync.sum_over_processes(&mut values)?;
        self.loss = values[0];
        self.micro_batches = values[1] as usize;
        *samples = values[2] as usize;
        for (term, pair) in self.terms.iter_mut().zip(values[3..].chunks(2)) {
            (term.1, term.2) = (pair[0], pair[1] as usize);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::AdamWConfig;
    use candle_core::{DType, Device};
    use std::sync::{Arc, Mutex};

    /// y = w·x on one sample per micro-batch; the loss is (y − target)².
    struct Sample {
        id: String,
        x: f32,
        target: f32,
    }

    impl MicroBatch for Sample {
        fn samples(&self) -> usize {
            1
        }
        fn sample_ids(&self) -> Vec<String> {
            vec![self.id.clone()]
        }
    }

    /// `chunks` chunks of the given samples, `per_chunk` side by side.
    struct Samples {
        all: Vec<(f32, f32)>,
        per_chunk: usize,
        /// Chunks handed out ahead (counted to check the look-ahead is used).
        ahead: Vec<Sample>,
        taken_ahead: Arc<Mutex<usize>>,
    }

    impl Samples {
        fn make(&self, range: std::ops::Range<usize>) -> Vec<Sample> {
            range
                .map(|i| Sample {
                    id: format!("s{i}"),
                    x: self.all[i].0,
                    target: self.all[i].1,
                })
                .collect()
        }
    }

    impl MicroBatchSource for Samples {
        type Item = Sample;
        fn chunks(&self) -> usize {
            self.all.len().div_ceil(self.per_chunk)
        }
        fn take(&mut self, chunk: usize) -> Result<Vec<Sample>> {
            if !self.ahead.is_empty() {
                *self.taken_ahead.lock().unwrap() += 1;
                return Ok(std::mem::take(&mut self.ahead));
            }
            let start = chunk * self.per_chunk;
            Ok(self.make(start..(start + self.per_chunk).min(self.all.len())))
        }
        fn prepare_ahead(&self, chunk: usize) -> Result<Vec<Sample>> {
            let start = (chunk + 1) * self.per_chunk;
            Ok(if start < self.all.len() {
                self.make(start..(start + self.per_chunk).min(self.all.len()))
            } else {
                Vec::new()
            })
        }
        fn keep_ahead(&mut self, ready: Vec<Sample>) {
            self.ahead = ready;
        }
    }

    fn learner(max_grad_norm: f64) -> (Var, TrainStep) {
        let w = Var::from_tensor(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let adam = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        (w, TrainStep::new(vars, adam, max_grad_norm))
    }

    fn loss_of(w: &Var) -> impl Fn(&Sample) -> Result<MicroLoss> + Sync + '_ {
        move |s: &Sample| {
            let y = w.as_tensor().affine(s.x as f64, 0.0)?;
            let loss = y.affine(1.0, -(s.target as f64))?.sqr()?.sum_all()?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok(MicroLoss::new(
                loss,
                value,
                TermValues(vec![("sq".into(), Some(value))]),
            ))
        }
    }

    fn value(w: &Var) -> f32 {
        w.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn chunks_side_by_side_or_not_make_the_same_update_and_the_same_report() {
        let data = vec![(1.0, 2.0), (2.0, -1.0), (-1.5, 0.5), (0.5, 3.0)];
        let mut runs = Vec::new();
        for per_chunk in [1, 2, 4] {
            let (w, mut step) = learner(1.0);
            let taken_ahead = Arc::new(Mutex::new(0));
            let mut source = Samples {
                all: data.clone(),
                per_chunk,
                ahead: Vec::new(),
                taken_ahead: taken_ahead.clone(),
            };
            let report = step.run(&mut source, 0.1, &loss_of(&w)).unwrap();
            assert_eq!(report.samples, 4);
            assert_eq!(*taken_ahead.lock().unwrap(), 4 / per_chunk - 1);
            runs.push((value(&w), report.loss, report.terms, report.grad_norm));
        }
        assert_eq!(runs[0], runs[1]);
        assert_eq!(runs[0], runs[2]);
        // The mean loss and term over the four samples; the update moved w.
        let losses: Vec<f32> = data
            .iter()
            .map(|(x, t)| (0.5 * x - t) * (0.5 * x - t))
            .collect();
        let mean = losses.iter().sum::<f32>() / 4.0;
        assert!((runs[0].1 - mean).abs() < 1e-6);
        assert_eq!(runs[0].2.get("sq"), Some(runs[0].1));
        assert_ne!(runs[0].0, 0.5);
    }

    /// A sync that records its calls and zeroes the gradients (as if the other processes'
    /// gradients cancelled this one's).
    struct ZeroingSync(Arc<Mutex<usize>>);

    impl GradientSync for ZeroingSync {
        fn sync(&mut self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
            *self.0.lock().unwrap() += 1;
            for (_, var) in vars {
                let zero = grads.get(var.as_tensor()).unwrap().zeros_like()?;
                grads.insert(var.as_tensor(), zero);
            }
            Ok(())
        }
        fn world_size(&self) -> usize {
            2
        }
        /// A second process that had a loss of 10 on 3 samples in one micro-batch.
        fn sum_over_processes(&mut self, values: &mut [f64]) -> Result<()> {
            values[0] += 10.0;
            values[1] += 1.0;
            values[2] += 3.0;
            Ok(())
        }
    }

    #[test]
    fn the_gradient_sync_runs_between_backward_and_the_optimizer() {
        let (w, step) = learner(0.0);
        let calls = Arc::new(Mutex::new(0));
        let mut step = step.with_sync(Box::new(ZeroingSync(calls.clone())));
        let mut source = Samples {
            all: vec![(1.0, 2.0), (2.0, -1.0)],
            per_chunk: 1,
            ahead: Vec::new(),
            taken_ahead: Arc::default(),
        };
        let report = step.run(&mut source, 0.1, &loss_of(&w)).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            1,
            "one sync per step, not per micro-batch"
        );
        // The optimizer saw the synced (zero) gradient: w did not move, the norm is 0.
        assert_eq!(value(&w), 0.5);
        assert_eq!(report.grad_norm, 0.0);
        // The report is the whole step's: both processes' samples and mean loss.
        assert_eq!(report.samples, 2 + 3);
        let local = [(1.0f32, 2.0f32), (2.0, -1.0)]
            .iter()
            .map(|(x, t)| ((0.5 * x - t) as f64).powi(2))
            .sum::<f64>();
        assert!((report.loss as f64 - (local + 10.0) / 3.0).abs() < 1e-5);
    }

    #[test]
    fn the_norm_is_taken_before_clipping_and_a_nan_loss_names_its_samples() {
        let (w, mut clipped) = learner(1e-3);
        let mut source = Samples {
            all: vec![(10.0, -50.0)],
            per_chunk: 1,
            ahead: Vec::new(),
            taken_ahead: Arc::default(),
        };
        let report = clipped.run(&mut source, 0.1, &loss_of(&w)).unwrap();
        assert!(
            report.grad_norm > 1.0,
            "the norm is measured before clipping"
        );

        let (w, mut step) = learner(1.0);
        let mut source = Samples {
            all: vec![(1.0, f32::NAN), (1.0, 1.0)],
            per_chunk: 2,
            ahead: Vec::new(),
            taken_ahead: Arc::default(),
        };
        let err = step.run(&mut source, 0.1, &loss_of(&w)).unwrap_err();
        let not_finite = err.downcast_ref::<NotFinite>().expect("a NotFinite error");
        assert_eq!(not_finite.what, "the loss");
        assert_eq!(not_finite.sample_ids, ["s0"]);
        assert_eq!(value(&w), 0.5, "nothing was updated");
    }
}
