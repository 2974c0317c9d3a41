//! A stage's micro-batches for the learner: the sampler's indices collated by the batch
//! layer, with the frozen work on them (the online teacher's output, a frozen tower's
//! features) done ahead where it can be.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use mmkd_datasets::TokenizedSample;

use super::rewards::Rewards;
use super::rollout::{answer_logprobs, records, Responder, RolledAnswers, RolloutRecord, Rollouts};
use crate::batch::ModelInputs;
use crate::checkpoint::LoadedModel;
use crate::distill::policy::PolicyRows;
use crate::models::llava::ImageInput;
use crate::teacher::{TeacherOutput, TeacherSignal};
use crate::train::forward::StudentBatch;
use crate::train::metrics::RolloutCounts;
use crate::train::step::{MicroBatch, MicroBatchSource};

/// A micro-batch with the work on it that no trained weight changes: the online teacher's
/// output (`None` without an online teacher) and the student's frozen-tower features (`None`
/// when the tower trains or the batch has no image).
pub(super) struct StageMicroBatch {
    pub(super) inputs: ModelInputs,
    pub(super) teacher_out: Option<TeacherOutput>,
    pub(super) student_tower: Option<Tensor>,
    /// Who answers it: a student's rollout waits for `take`, which runs it with the weights
    /// of the step that trains on it.
    responder: Responder,
    /// The answers that replaced the data's, once rolled out.
    rolled: Option<RolledAnswers>,
    /// The data's own batch, kept for the cross-entropy of a micro-batch the student answered
    /// (the student imitating its own samples would teach it nothing).
    data_inputs: Option<ModelInputs>,
    /// The student's sampled answers' per-token constants (MiniLLM's terms).
    policy: Option<PolicyRows>,
}

impl StageMicroBatch {
    /// What the student's forward and objective read of it.
    pub(super) fn student_batch(&self) -> StudentBatch<'_> {
        let images = match (&self.student_tower, &self.inputs.pixels) {
            (Some(features), _) => Some(ImageInput::Tower(features)),
            (None, pixels) => pixels.as_ref().map(ImageInput::Pixels),
        };
        StudentBatch {
            data_answers: self.data_inputs.as_ref().map(|d| (&d.tokens, &d.labels)),
            policy: self.policy.as_ref(),
            ..StudentBatch::of_data(
                &self.inputs.tokens,
                &self.inputs.labels,
                &self.inputs.visual_mask,
                images,
            )
        }
    }
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
    /// Rollouts, when the stage trains on generated answers.
    pub(super) rollouts: Option<&'a Rollouts>,
    /// Whether the objective reads the data's own answers on a rolled-out micro-batch (the
    /// cross-entropy), and the student's sampled answers' constants (MiniLLM).
    pub(super) keeps_data_answers: bool,
    pub(super) needs_policy: bool,
    /// The step being run (0-based).
    pub(super) step_index: usize,
    /// What this step's rollouts did, and its logged answers (on a logging step).
    pub(super) rolled: RolloutCounts,
    pub(super) rolled_records: Vec<RolloutRecord>,
    /// This step's micro-batches (sample indices).
    pub(super) step: Vec<Vec<usize>>,
    /// The next step's first chunk (empty on the last step).
    pub(super) next_step: Vec<Vec<usize>>,
    pub(super) ahead: Vec<StageMicroBatch>,
}

impl StageBatches<'_> {
    /// A micro-batch of step `step` collated, with the frozen work on it: the online
    /// teacher's output and the student's frozen-tower features, the teacher's answers for
    /// sequence-level KD. A micro-batch the student answers gets its answers in `take`.
    fn prepare(&self, indices: Vec<usize>, step: usize) -> Result<StageMicroBatch> {
        let mut inputs = ModelInputs::collate(self.samples, indices, self.student)?;
        let responder = self.rollouts.map_or(Responder::Data, |r| {
            r.responder(step, &inputs.collated.sample_indices)
        });
        let mut rolled = None;
        if responder == Responder::Teacher {
            // The teacher's answers replace the data's for every term, the cross-entropy
            // included (sequence-level KD).
            let (with_answers, answers) = self.roll_out(responder, &inputs, step)?;
            inputs = with_answers;
            rolled = Some(answers);
        }
        let teacher_out = match (self.teacher, responder) {
            (_, Responder::Student) | (None, _) => None,
            (Some(t), _) => t.forward_ahead(&inputs, self.samples)?,
        };
        let student_tower = match &inputs.pixels {
            Some(pixels) => self.student.model.frozen_tower_features(pixels)?,
            None => None,
        };
        Ok(StageMicroBatch {
            inputs,
            teacher_out,
            student_tower,
            responder,
            rolled,
            data_inputs: None,
            policy: None,
        })
    }

    /// `inputs` answered by the student or the teacher.
    fn roll_out(
        &self,
        responder: Responder,
        inputs: &ModelInputs,
        step: usize,
    ) -> Result<(ModelInputs, RolledAnswers)> {
        let rollouts = self.rollouts.context("rollouts are not planned")?;
        let teacher = match self.teacher {
            Some(TeacherSignal::Online(t)) => Some(&t.model.model),
            _ => None,
        };
        let model = match (responder, teacher) {
            (Responder::Teacher, Some(teacher)) => teacher,
            (Responder::Teacher, None) => bail!("sequence-level KD needs an online teacher"),
            _ => &self.student.model,
        };
        rollouts.roll_out(
            responder,
            model,
            teacher,
            self.student_vocab()?,
            inputs,
            self.samples,
            step,
        )
    }

    fn student_vocab(&self) -> Result<usize> {
        Ok(self.student.model.lm.lm_head_weight().dim(0)?)
    }

    /// A prepared micro-batch made ready to train on: the student's answers generated with
    /// the current weights and the teacher's forward on them (with MiniLLM's per-token
    /// constants from both models); its rollouts counted and, on a logging step, recorded
    /// with both models' log-probabilities.
    fn finish(&mut self, mut mb: StageMicroBatch) -> Result<StageMicroBatch> {
        if mb.responder == Responder::Student && mb.rolled.is_none() {
            let (inputs, answers) =
                self.roll_out(Responder::Student, &mb.inputs, self.step_index)?;
            mb.teacher_out = match self.teacher {
                Some(t) => t.forward_ahead(&inputs, self.samples)?,
                None => None,
            };
            let data = std::mem::replace(&mut mb.inputs, inputs);
            mb.data_inputs = self.keeps_data_answers.then_some(data);
            mb.rolled = Some(answers);
        }
        let (Some(answers), Some(rollouts)) = (&mb.rolled, self.rollouts) else {
            return Ok(mb);
        };
        self.rolled += answers.counts();
        let policy = self.needs_policy && answers.responder == Responder::Student;
        let logs = rollouts.logs(self.step_index);
        if !policy && !logs {
            return Ok(mb);
        }
        // Both models' logits on the answers, cut to the vocabulary they compare.
        let vocab = match self.teacher {
            Some(TeacherSignal::Online(t)) => t.truncate.unwrap_or(self.student_vocab()?),
            _ => self.student_vocab()?,
        };
        let teacher_logits = mb
            .teacher_out
            .as_ref()
            .context("rollouts need the teacher's output")?
            .logits()?
            .narrow(D::Minus1, 0, vocab)?;
        let student_logits = self
            .student
            .model
            .forward_images(&mb.inputs.tokens, mb.student_batch().images)?
            .logits
            .detach()
            .narrow(D::Minus1, 0, vocab)?;
        let decode = |ids: &[u32]| self.student.decode(ids);
        if policy {
            let scored = Rewards {
                rollouts,
                samples: self.samples,
                decode: &decode,
            }
            .policy_rows(&mb.inputs, answers, &student_logits, &teacher_logits)?;
            self.rolled.matches += scored.matches;
            mb.policy = Some(scored.rows);
        }
        if logs {
            let teacher = answer_logprobs(&teacher_logits, &mb.inputs, answers)?;
            let student = answer_logprobs(&student_logits, &mb.inputs, answers)?;
            let logged = records(
                self.step_index,
                &mb.inputs,
                answers,
                teacher,
                student,
                &decode,
            )?;
            self.rolled_records.extend(logged);
        }
        Ok(mb)
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
            .map(|indices| {
                let mb = match ready.next() {
                    Some(mb) if mb.inputs.collated.sample_indices == indices => mb,
                    _ => self.prepare(indices, self.step_index)?,
                };
                self.finish(mb)
            })
            .collect()
    }

    fn prepare_ahead(&self, chunk: usize) -> Result<Vec<StageMicroBatch>> {
        if !self.look_ahead {
            return Ok(Vec::new());
        }
        let (next, step) = if chunk + 1 < self.chunks() {
            (self.chunk(chunk + 1), self.step_index)
        } else {
            (&self.next_step[..], self.step_index + 1)
        };
        next.iter()
            .map(|indices| self.prepare(indices.clone(), step))
            .collect()
    }

    fn keep_ahead(&mut self, ready: Vec<StageMicroBatch>) {
        self.ahead = ready;
    }
}
