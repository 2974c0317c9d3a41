//! Per-sample scores of a batch from the teacher's and/or the student's logits at the rows that
//! predict the data's answer tokens (labels shifted by one, as the cross-entropy reads them).

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::distill::log_softmax;
use crate::distill::positions::{gather_rows, response_rows};

/// What a sample is ranked by (highest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// KL(teacher ‖ student) averaged over the answer tokens: where the student has most to
    /// learn from the teacher.
    Divergence,
    /// The teacher's mean log-probability of the data's answer tokens: the samples it would
    /// teach most surely.
    TeacherConfidence,
    /// The student's mean cross-entropy on the answer tokens: the samples it gets most wrong.
    StudentLoss,
    /// A seeded random score: the baseline a criterion has to beat (the student only
    /// tokenizes, so the same samples are eligible as for the others).
    Random,
}

impl Criterion {
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Divergence => "divergence",
            Criterion::TeacherConfidence => "teacher-confidence",
            Criterion::StudentLoss => "student-loss",
            Criterion::Random => "random",
        }
    }

    /// Whether it reads `role` (`teacher` or `student`).
    pub fn reads(self, role: &str) -> bool {
        match self {
            Criterion::Divergence => true,
            Criterion::TeacherConfidence => role == "teacher",
            Criterion::StudentLoss | Criterion::Random => role == "student",
        }
    }

    /// Whether it runs the models it reads (random only tokenizes).
    pub fn runs_models(self) -> bool {
        self != Criterion::Random
    }
}

/// One score per batch row (`None`: the row has no answer token); logits `[b, s, vocab]`,
/// labels `[b, s]` unshifted.
pub fn per_sample_scores(
    criterion: Criterion,
    teacher: Option<&Tensor>,
    student: Option<&Tensor>,
    labels: &Tensor,
) -> Result<Vec<Option<f64>>> {
    let (batch, seq) = labels.dims2()?;
    let rows = response_rows(labels)?;
    let mut sums = vec![0f64; batch];
    let mut counts = vec![0usize; batch];
    if rows.is_empty() {
        return Ok(vec![None; batch]);
    }
    let logp = |logits: Option<&Tensor>, role: &str| -> Result<Tensor> {
        let logits = logits.with_context(|| format!("{} reads the {role}", criterion.name()))?;
        Ok(log_softmax(
            &gather_rows(logits, &rows.rows)?.to_dtype(DType::F32)?,
        )?)
    };
    let targets = Tensor::new(rows.targets.as_slice(), labels.device())?.unsqueeze(1)?;
    let per_row: Vec<f32> = match criterion {
        Criterion::Divergence => {
            let (t, s) = (logp(teacher, "teacher")?, logp(student, "student")?);
            (t.exp()? * (&t - &s)?)?.sum(D::Minus1)?.to_vec1()?
        }
        Criterion::TeacherConfidence => logp(teacher, "teacher")?
            .gather(&targets, 1)?
            .squeeze(1)?
            .to_vec1()?,
        Criterion::StudentLoss => logp(student, "student")?
            .gather(&targets, 1)?
            .squeeze(1)?
            .neg()?
            .to_vec1()?,
        Criterion::Random => anyhow::bail!("random scores come from random_score"),
    };
    for (&row, value) in rows.rows.iter().zip(per_row) {
        let b = row as usize / seq;
        sums[b] += value as f64;
        counts[b] += 1;
    }
    Ok(sums
        .iter()
        .zip(&counts)
        .map(|(&sum, &n)| (n > 0).then(|| sum / n as f64))
        .collect())
}

/// The `random` criterion's score of the record at `index`: uniform in [0, 1), fixed by `seed`.
pub fn random_score(seed: u64, index: usize) -> f64 {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    rng.gen()
}

/// Whether each batch row has an answer token (labels `[b, s]` unshifted).
pub fn has_answer(labels: &Tensor) -> Result<Vec<bool>> {
    let (batch, seq) = labels.dims2()?;
    let mut has = vec![false; batch];
    for row in response_rows(labels)?.rows {
        has[row as usize / seq] = true;
    }
    Ok(has)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scores_average_over_each_samples_answer_tokens() {
        let dev = Device::Cpu;
        // Two samples of 3 positions over a vocabulary of 2; sample 0 supervises positions 1
        // and 2 (rows 0 and 1), sample 1 nothing.
        let labels = Tensor::new(&[[-100i64, 1, 0], [-100, -100, -100]], &dev).unwrap();
        let teacher = Tensor::new(
            &[[[0f32, 2.0], [1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0]; 3]],
            &dev,
        )
        .unwrap();
        let student = Tensor::zeros((2, 3, 2), DType::F32, &dev).unwrap();
        let p = |z: [f64; 2]| {
            let m = z[0].exp() + z[1].exp();
            [z[0].exp() / m, z[1].exp() / m]
        };
        let (r0, r1) = (p([0.0, 2.0]), p([1.0, 0.0]));
        let kl = |q: [f64; 2]| q[0] * (q[0] / 0.5).ln() + q[1] * (q[1] / 0.5).ln();
        let close = |got: Option<f64>, want: f64| {
            assert!((got.unwrap() - want).abs() < 1e-5, "{got:?} vs {want}")
        };

        let div = per_sample_scores(
            Criterion::Divergence,
            Some(&teacher),
            Some(&student),
            &labels,
        )
        .unwrap();
        close(div[0], (kl(r0) + kl(r1)) / 2.0);
        assert_eq!(div[1], None);
        // Row 0 predicts label 1, row 1 label 0.
        let conf =
            per_sample_scores(Criterion::TeacherConfidence, Some(&teacher), None, &labels).unwrap();
        close(conf[0], (r0[1].ln() + r1[0].ln()) / 2.0);
        let loss =
            per_sample_scores(Criterion::StudentLoss, None, Some(&student), &labels).unwrap();
        close(loss[0], 2f64.ln());
        let err = per_sample_scores(Criterion::Divergence, Some(&teacher), None, &labels)
            .unwrap_err()
            .to_string();
        assert!(err.contains("reads the student"), "{err}");
    }
}
