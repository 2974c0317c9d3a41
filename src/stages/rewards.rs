//! The rewards of the student's sampled answers and the per-token constants the
//! policy-gradient terms read (`minillm.single`, `minillm.long`, `pg`): MiniLLM's log-ratio to
//! the teacher, the task's exact match with the data's answer (optionally shaped by the KL to
//! the teacher), or the teacher's logits as Q-values (LLMR). The formulas are in
//! [`crate::distill::policy`].

use anyhow::Result;
use candle_core::{Tensor, D};
use mmkd_datasets::TokenizedSample;

use super::rollout::{last_answer_start, RolledAnswers, Rollouts};
use crate::batch::ModelInputs;
use crate::config::settings::RewardKind;
use crate::distill::policy::{
    baseline_advantages, importance_weights, llmr_rewards, token_logprobs, PolicyRows,
};
use crate::distill::positions::gather_rows;
use crate::scoring::vqa::normalize::normalize_prediction;
use crate::train::step::NotFinite;

/// What scoring a micro-batch's answers needs besides the logits.
pub(super) struct Rewards<'a> {
    pub(super) rollouts: &'a Rollouts,
    /// The data, whose answers the task reward compares with.
    pub(super) samples: &'a [TokenizedSample],
    pub(super) decode: &'a dyn Fn(&[u32]) -> Result<String>,
}

/// A micro-batch's policy rows, and how many of its answers equal the data's.
pub(super) struct Scored {
    pub(super) rows: PolicyRows,
    pub(super) matches: usize,
}

/// One answer's rows and both models' view of its tokens.
struct Answer {
    rows: Vec<u32>,
    tokens: Vec<u32>,
    /// log p(y_t) and log q_old(y_t) at temperature 1.
    teacher: Vec<f32>,
    student: Vec<f32>,
    weights: Vec<f32>,
    /// The teacher's logit of each token and logsumexp of its row (LLMR's reward only).
    q_values: Vec<f32>,
    values: Vec<f32>,
    matches: bool,
}

impl Rewards<'_> {
    /// The policy rows of a micro-batch's sampled answers from the sampling student's and the
    /// teacher's `[batch, seq, vocab]` logits on them (cut to one vocabulary). A reward that
    /// is not finite (a diverged model) is an error naming the sample.
    pub(super) fn policy_rows(
        &self,
        inputs: &ModelInputs,
        answers: &RolledAnswers,
        student_logits: &Tensor,
        teacher_logits: &Tensor,
    ) -> Result<Scored> {
        let settings = &self.rollouts.settings;
        let seq = inputs.tokens.seq_len();
        let mut scored = Vec::new();
        for (row, &(start, len)) in answers.spans.iter().enumerate() {
            if len == 0 {
                continue;
            }
            // Position t's logits predict token t + 1.
            let rows: Vec<u32> = (start - 1..start - 1 + len)
                .map(|t| (row * seq + t) as u32)
                .collect();
            let tokens = inputs.tokens.ids[row][start..start + len].to_vec();
            let student = gather_rows(student_logits, &rows)?;
            let teacher = gather_rows(teacher_logits, &rows)?;
            // Importance weights from the distributions that sampled (MiniLLM §2.2).
            let weights = if settings.mix_alpha > 0.0 {
                let t = settings.temperature;
                let probs = |logits: &Tensor| -> Result<Vec<f32>> {
                    Ok(token_logprobs(logits, &tokens, t)?
                        .iter()
                        .map(|l| l.exp())
                        .collect())
                };
                importance_weights(&probs(&teacher)?, &probs(&student)?, settings.mix_alpha)
            } else {
                vec![1.0; len]
            };
            let (q_values, values) = if settings.reward == RewardKind::Teacher {
                q_values_of(&teacher, &tokens)?
            } else {
                (Vec::new(), Vec::new())
            };
            let answer = Answer {
                q_values,
                values,
                teacher: token_logprobs(&teacher, &tokens, 1.0)?,
                student: token_logprobs(&student, &tokens, 1.0)?,
                matches: self.matches_data(inputs, answers, row)?,
                rows,
                tokens,
                weights,
            };
            check_finite(&answer, &inputs.collated.sample_ids[row])?;
            scored.push(answer);
        }
        let matches = scored.iter().filter(|a| a.matches).count();
        let mut rows = PolicyRows::default();
        match settings.reward {
            RewardKind::Minillm => {
                for a in &scored {
                    rows.push_answer(&a.rows, &a.tokens, &a.teacher, &a.student, &a.weights)?;
                }
            }
            RewardKind::Task | RewardKind::Teacher => {
                let returns: Vec<f64> = scored
                    .iter()
                    .map(|a| sequence_reward(a, settings.reward, settings.kl_coef))
                    .collect();
                for (a, advantage) in scored.iter().zip(baseline_advantages(&returns)) {
                    let advantages = vec![advantage; a.rows.len()];
                    rows.push_with_advantages(
                        &a.rows,
                        &a.tokens,
                        &a.student,
                        &advantages,
                        &a.weights,
                    )?;
                }
            }
        }
        Ok(Scored { rows, matches })
    }

    /// Whether row `row`'s sampled answer equals the data's answer of its sample.
    fn matches_data(
        &self,
        inputs: &ModelInputs,
        answers: &RolledAnswers,
        row: usize,
    ) -> Result<bool> {
        let (start, len) = answers.spans[row];
        answer_matches(
            &inputs.tokens.ids[row][start..start + len],
            answers.capped[row],
            &self.samples[inputs.collated.sample_indices[row]],
            self.rollouts.answer_end(),
            self.decode,
        )
    }
}

/// Whether `answer` (the end of answer `end` included unless it was `capped`) says what the
/// last answer of `sample` says: both decoded without the end of answer and VQA-normalised,
/// as the evaluation scores an answer.
fn answer_matches(
    answer: &[u32],
    capped: bool,
    sample: &TokenizedSample,
    end: &[u32],
    decode: &dyn Fn(&[u32]) -> Result<String>,
) -> Result<bool> {
    let answer = if capped {
        answer
    } else {
        answer.strip_suffix(end).unwrap_or(answer)
    };
    let data = &sample.input_ids[last_answer_start(sample).unwrap_or(sample.input_ids.len())..];
    let reference = data.strip_suffix(end).unwrap_or(data);
    Ok(normalize_prediction(&decode(answer)?) == normalize_prediction(&decode(reference)?))
}

/// The teacher's logit of each token (its Q-value) and the logsumexp of each row (the soft
/// value), from its `[N, vocab]` logits at an answer's rows.
fn q_values_of(teacher: &Tensor, tokens: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), teacher.device())?;
    let logits = teacher.to_dtype(candle_core::DType::F32)?;
    Ok((
        logits.gather(&ids, 1)?.squeeze(1)?.to_vec1()?,
        logits.log_sum_exp(D::Minus1)?.to_vec1()?,
    ))
}

/// An answer's return for a task or teacher reward, shaped by −β_KL · Σ_t (log q − log p).
fn sequence_reward(a: &Answer, kind: RewardKind, kl_coef: f64) -> f64 {
    let base = match kind {
        RewardKind::Task => f64::from(u8::from(a.matches)),
        // LLMR: the mean induced reward over the answer.
        _ => {
            let r = llmr_rewards(&a.q_values, &a.values);
            r.iter().map(|&x| f64::from(x)).sum::<f64>() / r.len().max(1) as f64
        }
    };
    let kl: f64 = a
        .student
        .iter()
        .zip(&a.teacher)
        .map(|(q, p)| f64::from(q - p))
        .sum();
    base - kl_coef * kl
}

fn check_finite(a: &Answer, sample: &str) -> Result<()> {
    let values = a
        .teacher
        .iter()
        .zip(&a.student)
        .map(|(p, q)| p - q)
        .chain(a.weights.iter().copied())
        .chain(a.q_values.iter().copied())
        .chain(a.values.iter().copied());
    for v in values {
        if !v.is_finite() {
            return Err(NotFinite {
                what: "the reward".into(),
                value: f64::from(v),
                sample_ids: vec![sample.to_string()],
            }
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmkd_datasets::IGNORE_INDEX;

    /// Ids 1..=26 are the letters, 27 a space, 28 a full stop, 30 the end of answer.
    fn decode(ids: &[u32]) -> Result<String> {
        Ok(ids
            .iter()
            .map(|&t| match t {
                1..=26 => char::from(b'a' + (t - 1) as u8),
                27 => ' ',
                28 => '.',
                _ => '#',
            })
            .collect())
    }

    fn sample(ids: &[u32], answer_from: usize) -> TokenizedSample {
        TokenizedSample {
            id: "s".into(),
            index: 0,
            input_ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(t, &id)| {
                    if t < answer_from {
                        IGNORE_INDEX
                    } else {
                        i64::from(id)
                    }
                })
                .collect(),
            images: Vec::new(),
            image_spans: Vec::new(),
            truncated: false,
            answer_offsets: Vec::new(),
        }
    }

    #[test]
    fn an_answer_matches_the_datas_as_the_vqa_scorer_reads_them() {
        // Prompt "q", answer "red" + end of answer.
        let data = sample(&[17, 27, 18, 5, 4, 30], 2);
        let end = [30];
        let check =
            |answer: &[u32], capped| answer_matches(answer, capped, &data, &end, &decode).unwrap();
        assert!(check(&[18, 5, 4, 30], false));
        // VQA normalisation drops the full stop and an article.
        assert!(check(&[1, 27, 18, 5, 4, 28, 30], false));
        assert!(!check(&[2, 12, 21, 5, 30], false));
        // A capped answer has no end of answer to strip and is compared as it is.
        assert!(check(&[18, 5, 4], true));
        assert!(!check(&[18, 5, 4, 4], true));
    }

    #[test]
    fn task_rewards_are_shaped_by_the_sampled_kl_to_the_teacher() {
        let answer = |matches, student: Vec<f32>, teacher: Vec<f32>| Answer {
            rows: vec![0; student.len()],
            tokens: vec![0; student.len()],
            weights: vec![1.0; student.len()],
            q_values: vec![2.0, 1.0],
            values: vec![5.0, 4.0],
            teacher,
            student,
            matches,
        };
        let a = answer(true, vec![-1.0, -2.0], vec![-1.5, -1.0]);
        // Σ (log q − log p) = 0.5 − 1 = −0.5.
        assert_eq!(sequence_reward(&a, RewardKind::Task, 0.0), 1.0);
        assert_eq!(sequence_reward(&a, RewardKind::Task, 0.2), 1.0 + 0.1);
        let b = answer(false, vec![-1.0, -2.0], vec![-1.5, -1.0]);
        assert_eq!(sequence_reward(&b, RewardKind::Task, 0.0), 0.0);
        // LLMR: r = (2 − 4, 1 − 0), mean −0.5.
        assert_eq!(sequence_reward(&b, RewardKind::Teacher, 0.0), -0.5);
    }
}
