//! A stage's micro-batches for the learner: the sampler's indices collated by the batch
//! layer, with the frozen work on them (the online teacher's output, a frozen tower's
//! features) done ahead where it can be.

use anyhow::Result;
use candle_core::Tensor;
use mmkd_datasets::TokenizedSample;

use crate::batch::ModelInputs;
use crate::checkpoint::LoadedModel;
use crate::teacher::{TeacherOutput, TeacherSignal};
use crate::train::step::{MicroBatch, MicroBatchSource};

/// A micro-batch with the work on it that no trained weight changes: the online teacher's
/// output (`None` without an online teacher) and the student's frozen-tower features (`None`
/// when the tower trains or the batch has no image).
pub(super) struct StageMicroBatch {
    pub(super) inputs: ModelInputs,
    pub(super) teacher_out: Option<TeacherOutput>,
    pub(super) student_tower: Option<Tensor>,
}

impl MicroBatch for StageMicroBatch {
    fn samples(&self) -> usize {
        self.inputs.collated.batch_size()
    }

    fn sample_ids(&self) -> Vec<String> {
        self.inputs.collated.sample_ids.clone()
    }
}

/// One step's micro-batches, drawn from the sampler, `parallel` of them side by side.
pub(super) struct StageBatches<'a> {
    pub(super) samples: &'a [TokenizedSample],
    pub(super) student: &'a LoadedModel,
    pub(super) teacher: Option<&'a TeacherSignal>,
    /// Whether there is frozen work worth doing ahead (an online teacher, a frozen tower).
    pub(super) look_ahead: bool,
    pub(super) parallel: usize,
    /// This step's micro-batches (sample indices).
    pub(super) step: Vec<Vec<usize>>,
    /// The next step's first chunk (empty on the last step).
    pub(super) next_step: Vec<Vec<usize>>,
    pub(super) ahead: Vec<StageMicroBatch>,
}

impl StageBatches<'_> {
    /// A micro-batch collated, with the online teacher's output and the student's
    /// frozen-tower features on it.
    fn prepare(&self, indices: Vec<usize>) -> Result<StageMicroBatch> {
        let inputs = ModelInputs::collate(self.samples, indices, self.student)?;
        let teacher_out = match self.teacher {
            Some(t) => t.forward_ahead(&inputs, self.samples)?,
            None => None,
        };
        let student_tower = match &inputs.pixels {
            Some(pixels) => self.student.model.frozen_tower_features(pixels)?,
            None => None,
        };
        Ok(StageMicroBatch {
            inputs,
            teacher_out,
            student_tower,
        })
    }

    fn chunk(&self, chunk: usize) -> &[Vec<usize>] {
        let start = chunk * self.parallel;
        &self.step[start..(start + self.parallel).min(self.step.len())]
    }
}

impl MicroBatchSource for StageBatches<'_> {
    type Item = StageMicroBatch;

    fn chunks(&self) -> usize {
        self.step.len().div_ceil(self.parallel)
    }

    fn take(&mut self, chunk: usize) -> Result<Vec<StageMicroBatch>> {
        let mut ready = std::mem::take(&mut self.ahead).into_iter();
        self.chunk(chunk)
            .to_vec()
            .into_iter()
            .map(|indices| match ready.next() {
                Some(mb) if mb.inputs.collated.sample_indices == indices => Ok(mb),
                _ => self.prepare(indices),
            })
            .collect()
    }

    fn prepare_ahead(&self, chunk: usize) -> Result<Vec<StageMicroBatch>> {
        if !self.look_ahead {
            return Ok(Vec::new());
        }
        let next = if chunk + 1 < self.chunks() {
            self.chunk(chunk + 1)
        } else {
            &self.next_step
        };
        next.iter()
            .map(|indices| self.prepare(indices.clone()))
            .collect()
    }

    fn keep_ahead(&mut self, ready: Vec<StageMicroBatch>) {
        self.ahead = ready;
    }
}
