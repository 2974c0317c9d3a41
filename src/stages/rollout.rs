//! On-policy rollouts (GKD's λ, sequence-level KD): a micro-batch's last answers replaced by
//! answers a model samples itself from the same prompts and images, so the objective compares
//! teacher and student on what the student (or the teacher) actually says.
//!
//! Who answers a micro-batch, and the sampling seed, are drawn from the run's seed, the step
//! and the micro-batch's samples: a resumed run draws the same, so the sampling RNG is part of
//! the checkpointed state without being stored.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use mmkd_datasets::{collate, Template, TokenizedSample, IGNORE_INDEX};
use mmkd_nn::SeededRng;
use serde::{Deserialize, Serialize};

use crate::batch::{ModelInputs, TRAINING_COLLATE};
use crate::checkpoint::LoadedModel;
use crate::config::settings::RolloutSettings;
use crate::distill::policy::token_logprobs;
use crate::generate::{generate, generate_mixed, GenerationConfig};
use crate::models::llava::LlavaModel;
use crate::train::metrics::RolloutCounts;

/// The log of sampled answers, in OUT.
pub const ROLLOUTS_FILE: &str = "rollouts.jsonl";

/// Who writes a micro-batch's last answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Responder {
    /// The data's answers (teacher forcing).
    Data,
    /// The student, sampled with the rollout settings (on-policy).
    Student,
    /// The teacher, greedy (sequence-level KD).
    Teacher,
}

/// A stage's rollout plan.
pub struct Rollouts {
    pub settings: RolloutSettings,
    seed: u64,
    /// Tokens the template supervises after an answer (its end of answer), appended to an
    /// answer that stopped.
    answer_end: Vec<u32>,
    stop_token_ids: Vec<u32>,
}

/// The answers one micro-batch got.
#[derive(Clone, Debug)]
pub struct RolledAnswers {
    pub responder: Responder,
    /// Per row: where the answer starts and its tokens (the end of answer included when it
    /// stopped).
    pub spans: Vec<(usize, usize)>,
    /// Per row: whether it hit `max_new_tokens` before stopping.
    pub capped: Vec<bool>,
}

impl RolledAnswers {
    pub fn counts(&self) -> RolloutCounts {
        let student = self.responder == Responder::Student;
        RolloutCounts {
            student_micro_batches: usize::from(student),
            teacher_micro_batches: usize::from(!student),
            answers: self.spans.len(),
            capped: self.capped.iter().filter(|&&c| c).count(),
            tokens: self.spans.iter().map(|s| s.1).sum(),
            // Counted where the answers are scored.
            matches: 0,
        }
    }
}

impl Rollouts {
    /// The plan for `student` trained with `template`.
    pub fn new(
        settings: RolloutSettings,
        seed: u64,
        student: &LoadedModel,
        template: &Template,
    ) -> Result<Self> {
        Ok(Self {
            answer_end: student.encode(&template.answer_end)?,
            stop_token_ids: crate::prompt::stop_token_ids(student, Some(template)),
            settings,
            seed,
        })
    }

    /// Who answers the micro-batch of `samples` at `step`: the student with probability λ,
    /// else the teacher (sequence-level KD) or the data.
    pub fn responder(&self, step: usize, samples: &[usize]) -> Responder {
        let mut rng = SeededRng::new(micro_batch_seed(self.seed, step, samples, b"responder"));
        if f64::from(rng.uniform()) < self.settings.lambda {
            Responder::Student
        } else if self.settings.seq_kd {
            Responder::Teacher
        } else {
            Responder::Data
        }
    }

    /// Tokens the template appends to a stopped answer.
    pub fn answer_end(&self) -> &[u32] {
        &self.answer_end
    }

    /// Whether step `step` (0-based) logs its rollouts.
    pub fn logs(&self, step: usize) -> bool {
        self.settings.log_every > 0 && (step + 1).is_multiple_of(self.settings.log_every)
    }

    /// `inputs` with each row's last answer replaced by one `model` generates from the row's
    /// prompt and images: sampled with the rollout settings for the student (from the mixture
    /// with `teacher` when `mix_alpha` > 0), greedy for the teacher. `vocab`: the student's
    /// vocabulary, which every generated id must be in.
    #[allow(clippy::too_many_arguments)]
    pub fn roll_out(
        &self,
        responder: Responder,
        model: &LlavaModel,
        teacher: Option<&LlavaModel>,
        vocab: usize,
        inputs: &ModelInputs,
        samples: &[TokenizedSample],
        step: usize,
    ) -> Result<(ModelInputs, RolledAnswers)> {
        let rows = inputs.samples(samples);
        let starts: Vec<usize> = rows
            .iter()
            .map(|s| last_answer_start(s).unwrap_or(s.input_ids.len()))
            .collect();
        let prompts: Vec<Vec<u32>> = rows
            .iter()
            .zip(&starts)
            .map(|(s, &start)| s.input_ids[..start].to_vec())
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens: self.settings.max_new_tokens,
            temperature: match responder {
                Responder::Student => self.settings.temperature as f32,
                _ => 0.0,
            },
            top_p: self.settings.top_p as f32,
            top_k: self.settings.top_k,
            seed: micro_batch_seed(self.seed, step, &inputs.collated.sample_indices, b"rollout"),
            stop_token_ids: self.stop_token_ids.clone(),
            stop_strings: Vec::new(),
            use_cache: true,
            banned_token_ids: vec![model.image_token_id()],
        };
        let pixels = inputs.pixels.as_ref();
        let mixed = self.settings.mix_alpha > 0.0 && responder == Responder::Student;
        let answers = match teacher.filter(|_| mixed) {
            Some(teacher) => generate_mixed(
                model,
                teacher,
                self.settings.mix_alpha as f32,
                &prompts,
                (pixels, pixels),
                &cfg,
            ),
            None if mixed => Err(anyhow::anyhow!(
                "teacher-mixed sampling (rollout.mix_alpha) needs the online teacher"
            )),
            None => generate(model, &prompts, pixels, &cfg, &|_| String::new()),
        }
        .with_context(|| {
            format!(
                "the {} answering samples {}",
                responder.name(),
                inputs.collated.sample_ids.join(", ")
            )
        })?;
        let mut rolled = Vec::with_capacity(rows.len());
        let mut spans = Vec::with_capacity(rows.len());
        let mut capped = Vec::with_capacity(rows.len());
        for ((sample, prompt), mut answer) in rows.iter().zip(prompts).zip(answers) {
            if let Some(&bad) = answer.iter().find(|&&t| t as usize >= vocab) {
                anyhow::bail!(
                    "the {} answered sample {} with token {bad}, outside the student's \
                     vocabulary of {vocab}",
                    responder.name(),
                    sample.id
                );
            }
            // An answer that used its whole budget did not stop: it gets no end of answer.
            let hit_budget = answer.len() == self.settings.max_new_tokens;
            if !hit_budget {
                answer.extend_from_slice(&self.answer_end);
            }
            spans.push((prompt.len(), answer.len()));
            capped.push(hit_budget);
            rolled.push(with_answer(sample, prompt, &answer));
        }
        let refs: Vec<&TokenizedSample> = rolled.iter().collect();
        let collated = collate(&refs, &inputs.collated.sample_indices, &TRAINING_COLLATE);
        let inputs = ModelInputs::with_pixels(collated, inputs.pixels.clone(), model)?;
        Ok((
            inputs,
            RolledAnswers {
                responder,
                spans,
                capped,
            },
        ))
    }
}

impl Responder {
    fn name(self) -> &'static str {
        match self {
            Responder::Data => "data",
            Responder::Student => "student",
            Responder::Teacher => "teacher",
        }
    }
}

/// Where the last supervised run of `sample` starts (the last answer with its end of
/// answer); `None` when nothing is supervised.
pub fn last_answer_start(sample: &TokenizedSample) -> Option<usize> {
    let last = sample.labels.iter().rposition(|&l| l != IGNORE_INDEX)?;
    let start = sample.labels[..=last]
        .iter()
        .rposition(|&l| l == IGNORE_INDEX)
        .map_or(0, |t| t + 1);
    Some(start)
}

/// `sample` with everything after `prompt` replaced by `answer`, which is supervised.
fn with_answer(sample: &TokenizedSample, prompt: Vec<u32>, answer: &[u32]) -> TokenizedSample {
    let start = prompt.len();
    let mut input_ids = prompt;
    input_ids.extend_from_slice(answer);
    let mut labels = sample.labels[..start].to_vec();
    labels.extend(answer.iter().map(|&t| i64::from(t)));
    TokenizedSample {
        input_ids,
        labels,
        truncated: false,
        // Offsets pair two tokenizations of the data's text; a rollout has no such text.
        answer_offsets: Vec::new(),
        ..sample.clone()
    }
}

/// The seed of one micro-batch's draws for `purpose`: the run's seed, the step and the
/// samples, so it is the same however micro-batches are scheduled and after a resume.
pub fn micro_batch_seed(seed: u64, step: usize, samples: &[usize], purpose: &[u8]) -> u64 {
    let mut digest = crate::teacher_cache::digest::ContentDigest::default();
    for word in [seed, step as u64]
        .into_iter()
        .chain(samples.iter().map(|&i| i as u64))
    {
        digest.update(&word.to_le_bytes());
    }
    digest.update(purpose);
    digest.value()
}

/// The log-probability each row's answer tokens get from `logits` (`[batch, seq, vocab]` on
/// the rolled batch, already cut to the vocabulary both models compare).
pub fn answer_logprobs(
    logits: &Tensor,
    inputs: &ModelInputs,
    answers: &RolledAnswers,
) -> Result<Vec<Vec<f32>>> {
    answers
        .spans
        .iter()
        .enumerate()
        .map(|(row, &(start, len))| {
            if len == 0 {
                return Ok(Vec::new());
            }
            // Position t's logits predict token t + 1.
            let rows = logits.get(row)?.narrow(0, start - 1, len)?;
            token_logprobs(&rows, &inputs.tokens.ids[row][start..start + len], 1.0)
        })
        .collect()
}

/// One logged answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// 1-based optimizer step.
    pub step: usize,
    pub sample_id: String,
    pub responder: Responder,
    pub prompt_tokens: usize,
    pub answer: String,
    pub answer_ids: Vec<u32>,
    /// Stopped by the token budget.
    pub capped: bool,
    pub teacher_logprobs: Vec<f32>,
    pub student_logprobs: Vec<f32>,
    /// Σ_t log p(y_t) − log q(y_t): the teacher's preference for the answer over the
    /// student's own (MiniLLM's sequence reward; minus a one-sample estimate of KL(q‖p) when
    /// the student answered).
    pub reward: f32,
}

/// `rollouts.jsonl`, kept consistent with the checkpoint a run resumes from.
pub struct RolloutLog {
    path: PathBuf,
    file: std::fs::File,
}

impl RolloutLog {
    /// Opens the log in `out`; on resume keeps only the records up to `resume_step`.
    pub fn open(out: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = out.join(ROLLOUTS_FILE);
        let kept: Vec<String> = match resume_step {
            Some(step) if path.exists() => std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .lines()
                .filter(|line| {
                    serde_json::from_str::<RolloutRecord>(line).is_ok_and(|r| r.step <= step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        for line in kept {
            writeln!(file, "{line}")?;
        }
        Ok(Self { path, file })
    }

    pub fn append(&mut self, records: &[RolloutRecord]) -> Result<()> {
        for r in records {
            writeln!(self.file, "{}", serde_json::to_string(r)?)
                .with_context(|| format!("writing {}", self.path.display()))?;
        }
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The records of one rolled micro-batch.
pub fn records(
    step: usize,
    inputs: &ModelInputs,
    answers: &RolledAnswers,
    teacher_logprobs: Vec<Vec<f32>>,
    student_logprobs: Vec<Vec<f32>>,
    decode: &dyn Fn(&[u32]) -> Result<String>,
) -> Result<Vec<RolloutRecord>> {
    ensure!(
        teacher_logprobs.len() == answers.spans.len()
            && student_logprobs.len() == answers.spans.len(),
        "log-probabilities for {} and {} rows of a micro-batch of {}",
        teacher_logprobs.len(),
        student_logprobs.len(),
        answers.spans.len()
    );
    answers
        .spans
        .iter()
        .enumerate()
        .zip(teacher_logprobs.into_iter().zip(student_logprobs))
        .map(|((row, &(start, len)), (t, s))| {
            let ids = inputs.tokens.ids[row][start..start + len].to_vec();
            Ok(RolloutRecord {
                step: step + 1,
                sample_id: inputs.collated.sample_ids[row].clone(),
                responder: answers.responder,
                prompt_tokens: start,
                answer: decode(&ids)?,
                reward: t.iter().zip(&s).map(|(p, q)| p - q).sum(),
                answer_ids: ids,
                capped: answers.capped[row],
                teacher_logprobs: t,
                student_logprobs: s,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ids: &[u32], labels: &[i64]) -> TokenizedSample {
        TokenizedSample {
            id: "s".into(),
            index: 0,
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            images: Vec::new(),
            image_spans: Vec::new(),
            truncated: false,
            answer_offsets: vec![(0, 0)],
        }
    }

    #[test]
    fn the_last_answer_is_replaced_and_earlier_turns_kept() {
        const I: i64 = IGNORE_INDEX;
        // prompt 1, answer 1 (5, 6), prompt 2, answer 2 (9, 10, 11).
        let s = sample(
            &[1, 2, 5, 6, 7, 8, 9, 10, 11],
            &[I, I, 5, 6, I, I, 9, 10, 11],
        );
        assert_eq!(last_answer_start(&s), Some(6));
        let rolled = with_answer(&s, s.input_ids[..6].to_vec(), &[40, 41]);
        assert_eq!(rolled.input_ids, [1, 2, 5, 6, 7, 8, 40, 41]);
        assert_eq!(rolled.labels, [I, I, 5, 6, I, I, 40, 41]);
        assert!(rolled.answer_offsets.is_empty());
        assert_eq!(last_answer_start(&sample(&[1, 2], &[I, I])), None);
        assert_eq!(last_answer_start(&sample(&[1, 2], &[1, 2])), Some(0));
    }

    #[test]
    fn the_responder_is_drawn_from_the_step_and_the_samples_at_rate_lambda() {
        let plan = |lambda, seq_kd| Rollouts {
            settings: RolloutSettings {
                lambda,
                seq_kd,
                ..Default::default()
            },
            seed: 3,
            answer_end: Vec::new(),
            stop_token_ids: Vec::new(),
        };
        let half = plan(0.5, false);
        let draws: Vec<Responder> = (0..400).map(|s| half.responder(s, &[s % 7, 2])).collect();
        let again: Vec<Responder> = (0..400).map(|s| half.responder(s, &[s % 7, 2])).collect();
        assert_eq!(draws, again, "the same step and samples draw the same");
        let students = draws.iter().filter(|&&r| r == Responder::Student).count();
        assert!(
            (160..240).contains(&students),
            "{students} of 400 at λ = 0.5"
        );
        assert!(draws.iter().all(|&r| r != Responder::Teacher));
        assert!((0..50).all(|s| plan(0.0, true).responder(s, &[1]) == Responder::Teacher));
        assert!((0..50).all(|s| plan(1.0, true).responder(s, &[1]) == Responder::Student));
    }
}
