//! MiniLLM's policy-gradient objective (Gu et al., "MiniLLM: Knowledge Distillation of Large
//! Language Models", ICLR 2024, arXiv 2306.08543, §2.1–2.2): the sequence-level reverse KL
//! KL(q_θ‖p) minimised over answers the student samples, its gradient split into a single-step
//! part computed exactly and a long-term part estimated by policy gradient.
//!
//! Notation: x the prompt, y = y_1..y_T a sampled answer, p the teacher, q_θ the student, q_old
//! the student that sampled (constants of the rollout).
//!
//! - Per-token reward (eq. 2): r_t = log p(y_t | y_<t, x) − log q_old(y_t | y_<t, x).
//! - Length-normalised long-term reward (§2.2, "length normalization"):
//!   R^Norm_{t+1} = 1/(T − t) · Σ_{t' = t+1..T} r_t', and 0 after the last token.
//! - Teacher-mixed sampling (§2.2): y_t ~ p̃ = α·p + (1−α)·q_old, with the per-token importance
//!   weight w_t = q_old(y_t) / p̃(y_t) (the paper's approximation of the sequence weight); the
//!   weights use the distributions that sampled (the sampling temperature).
//! - Single-step part (eq. 4): −Σ_t ∇ E_{y_t ~ q_θ}[r_t] = Σ_t ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x)),
//!   the expectation over the next token taken exactly over the vocabulary; as a loss,
//!   L_single = 1/N · Σ_t w_t · KL(q_θ,t ‖ p_t).
//! - Long-term part (eq. 4 with R^Norm, PPO-style clipping of §2.2): with ρ_t = q_θ(y_t) /
//!   q_old(y_t) and A_t = R^Norm_{t+1},
//!   L_long = 1/N · Σ_t w_t · max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε));
//!   its gradient at ρ = 1 is −1/N · Σ_t w_t·A_t·∇ log q_θ(y_t), the estimator of eq. 4.
//!
//! N is the number of answer tokens of the micro-batch (a token mean).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

use super::log_softmax;

/// The per-token constants of a micro-batch's sampled answers, flattened in row order: what
/// the two MiniLLM terms read besides the logits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyRows {
    /// Flat `batch × seq` indices of the positions whose logits predict an answer token.
    pub rows: Vec<u32>,
    /// The answer token each row predicts.
    pub tokens: Vec<u32>,
    /// log q_old(y_t), at temperature 1.
    pub old_logprobs: Vec<f32>,
    /// A_t = R^Norm_{t+1}.
    pub advantages: Vec<f32>,
    /// w_t (1 without teacher-mixed sampling).
    pub weights: Vec<f32>,
}

impl PolicyRows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Appends one answer: its rows and tokens, the teacher's and the sampling student's
    /// log-probabilities of its tokens at temperature 1, and its importance weights.
    pub fn push_answer(
        &mut self,
        rows: &[u32],
        tokens: &[u32],
        teacher_logprobs: &[f32],
        student_logprobs: &[f32],
        weights: &[f32],
    ) -> Result<()> {
        ensure!(
            teacher_logprobs.len() == student_logprobs.len(),
            "{} teacher and {} student log-probabilities for one answer",
            teacher_logprobs.len(),
            student_logprobs.len()
        );
        let advantages = normalized_future_rewards(&rewards(teacher_logprobs, student_logprobs));
        self.push_with_advantages(rows, tokens, student_logprobs, &advantages, weights)
    }
}

impl PolicyRows {
    /// Appends one answer whose advantages come from elsewhere (a task or teacher reward).
    pub fn push_with_advantages(
        &mut self,
        rows: &[u32],
        tokens: &[u32],
        old_logprobs: &[f32],
        advantages: &[f32],
        weights: &[f32],
    ) -> Result<()> {
        let n = rows.len();
        ensure!(
            [
                tokens.len(),
                old_logprobs.len(),
                advantages.len(),
                weights.len()
            ]
            .iter()
            .all(|&len| len == n),
            "an answer of {n} rows with {} tokens, {} log-probabilities, {} advantages and {} \
             weights",
            tokens.len(),
            old_logprobs.len(),
            advantages.len(),
            weights.len()
        );
        self.rows.extend_from_slice(rows);
        self.tokens.extend_from_slice(tokens);
        self.old_logprobs.extend_from_slice(old_logprobs);
        self.advantages.extend_from_slice(advantages);
        self.weights.extend_from_slice(weights);
        Ok(())
    }
}

/// LLMR's induced reward (Li et al. 2024): the teacher's logits z read as soft Q-values,
/// r_t = Q(s_t, y_t) − V(s_{t+1}) = z_t(y_t) − logsumexp z_{t+1}, with V = 0 after the last
/// token. `q_values[t]` = z_t(y_t), `values[t]` = logsumexp z_t.
pub fn llmr_rewards(q_values: &[f32], values: &[f32]) -> Vec<f32> {
    (0..q_values.len())
        .map(|t| q_values[t] - values.get(t + 1).copied().unwrap_or(0.0))
        .collect()
}

/// REINFORCE's advantages of whole answers: each return less the mean of the micro-batch's
/// (the baseline).
pub fn baseline_advantages(returns: &[f64]) -> Vec<f32> {
    if returns.is_empty() {
        return Vec::new();
    }
    let mean = returns.iter().sum::<f64>() / returns.len() as f64;
    returns.iter().map(|r| (r - mean) as f32).collect()
}

/// r_t = log p(y_t) − log q_old(y_t) (eq. 2).
pub fn rewards(teacher_logprobs: &[f32], student_logprobs: &[f32]) -> Vec<f32> {
    teacher_logprobs
        .iter()
        .zip(student_logprobs)
        .map(|(p, q)| p - q)
        .collect()
}

/// R^Norm_{t+1} for every t: the mean of the rewards after t, 0 for the last token.
pub fn normalized_future_rewards(rewards: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; rewards.len()];
    let mut sum = 0.0f64;
    for t in (0..rewards.len()).rev() {
        let after = rewards.len() - 1 - t;
        out[t] = if after == 0 {
            0.0
        } else {
            (sum / after as f64) as f32
        };
        sum += rewards[t] as f64;
    }
    out
}

/// w_t = q(y_t) / (α·p(y_t) + (1−α)·q(y_t)) from the sampling distributions' probabilities of
/// the drawn tokens.
pub fn importance_weights(teacher_probs: &[f32], student_probs: &[f32], alpha: f64) -> Vec<f32> {
    teacher_probs
        .iter()
        .zip(student_probs)
        .map(|(&p, &q)| {
            let (p, q) = (p as f64, q as f64);
            let mixed = alpha * p + (1.0 - alpha) * q;
            if mixed > 0.0 {
                (q / mixed) as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// L_single = 1/N · Σ_t w_t · KL(q_θ,t ‖ p_t) from the student's and the teacher's `[N, V]`
/// logits at the answer rows (temperature 1; the teacher's are constants).
pub fn single_step_loss(
    student_rows: &Tensor,
    teacher_rows: &Tensor,
    policy: &PolicyRows,
) -> Result<Tensor> {
    check_rows(student_rows, policy)?;
    let dtype = student_rows.dtype();
    let log_q = log_softmax(student_rows)?;
    let log_p = log_softmax(&teacher_rows.detach().to_dtype(dtype)?)?;
    let kl = log_q.exp()?.mul(&(log_q - log_p)?)?.sum(D::Minus1)?;
    let weights = constant(&policy.weights, student_rows)?;
    Ok(kl.mul(&weights)?.mean_all()?)
}

/// L_long with clip range ε from the student's `[N, V]` logits at the answer rows.
pub fn long_term_loss(student_rows: &Tensor, policy: &PolicyRows, clip: f64) -> Result<Tensor> {
    check_rows(student_rows, policy)?;
    ensure!(
        clip > 0.0 && clip.is_finite(),
        "the policy-gradient clip range must be positive, got {clip}"
    );
    let device = student_rows.device();
    let ids = Tensor::from_vec(policy.tokens.clone(), (policy.len(), 1), device)?;
    let log_q = log_softmax(student_rows)?.gather(&ids, 1)?.squeeze(1)?;
    let old = constant(&policy.old_logprobs, student_rows)?;
    let advantages = constant(&policy.advantages, student_rows)?;
    let ratio = (log_q - old)?.exp()?;
    let unclipped = ratio.mul(&advantages)?.neg()?;
    let clipped = ratio
        .clamp(1.0 - clip, 1.0 + clip)?
        .mul(&advantages)?
        .neg()?;
    let weights = constant(&policy.weights, student_rows)?;
    Ok(unclipped.maximum(&clipped)?.mul(&weights)?.mean_all()?)
}

fn check_rows(student_rows: &Tensor, policy: &PolicyRows) -> Result<()> {
    let (n, _) = student_rows.dims2()?;
    ensure!(
        n == policy.len() && n > 0,
        "{n} rows of student logits for {} answer tokens",
        policy.len()
    );
    Ok(())
}

/// `values` as a `[N]` constant in `like`'s dtype and device.
fn constant(values: &[f32], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(values.to_vec(), values.len(), like.device())?.to_dtype(like.dtype())?)
}

/// The log-probability (at `temperature`) each row of `[N, V]` logits gives its token.
pub fn token_logprobs(logits: &Tensor, tokens: &[u32], temperature: f64) -> Result<Vec<f32>> {
    let scaled = logits
        .to_dtype(DType::F32)?
        .affine(1.0 / temperature, 0.0)?;
    let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), logits.device())?;
    Ok(log_softmax(&scaled)?
        .gather(&ids, 1)?
        .squeeze(1)?
        .to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rewards_and_their_length_normalised_future_by_hand() {
        let r = rewards(&[-1.0, -2.0, -0.5, -0.25], &[-1.5, -1.0, -0.5, -1.25]);
        assert_eq!(r, [0.5, -1.0, 0.0, 1.0]);
        // t = 0: mean(−1, 0, 1) = 0; t = 1: mean(0, 1) = 0.5; t = 2: 1; the last: 0.
        assert_eq!(normalized_future_rewards(&r), [0.0, 0.5, 1.0, 0.0]);
        assert_eq!(normalized_future_rewards(&[]), Vec::<f32>::new());
        assert_eq!(normalized_future_rewards(&[3.0]), [0.0]);
    }

    #[test]
    fn the_single_step_term_is_the_weighted_reverse_kl_by_hand() {
        let dev = Device::Cpu;
        // q = (½, ½), p = (0.8, 0.2): KL(q‖p) = ½ ln(0.5/0.8) + ½ ln(0.5/0.2) = 0.2231436.
        let student = Tensor::new(&[[0.0f64, 0.0], [1.0, 1.0]], &dev).unwrap();
        let teacher = Tensor::new(&[[0.8f64.ln(), 0.2f64.ln()], [0.0, 0.0]], &dev).unwrap();
        let policy = PolicyRows {
            rows: vec![0, 1],
            tokens: vec![0, 1],
            old_logprobs: vec![0.5f32.ln(); 2],
            advantages: vec![0.0; 2],
            weights: vec![2.0, 1.0],
        };
        let value = single_step_loss(&student, &teacher, &policy)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // (2 · 0.2231436 + 1 · 0) / 2
        assert!((value - 0.2231435513).abs() < 1e-9, "{value}");
    }

    #[test]
    fn clipping_stops_the_ratio_beyond_the_range_in_the_direction_of_the_advantage() {
        let dev = Device::Cpu;
        // One row, two tokens, q_θ(y) = ½; the sampler had q_old(y) = ¼, so ρ = 2.
        let student = Tensor::new(&[[0.0f64, 0.0]], &dev).unwrap();
        let policy = |advantage: f32| PolicyRows {
            rows: vec![0],
            tokens: vec![0],
            old_logprobs: vec![0.25f32.ln()],
            advantages: vec![advantage],
            weights: vec![1.0],
        };
        let value = |a| {
            long_term_loss(&student, &policy(a), 0.2)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        // A > 0: min(ρ, 1.2)·A is the bound → −1.2·A; A < 0: max(−Aρ, −A·1.2) = −Aρ.
        assert!((value(1.0) + 1.2).abs() < 1e-6, "{}", value(1.0));
        assert!((value(-1.0) - 2.0).abs() < 1e-6, "{}", value(-1.0));
    }

    #[test]
    fn llmr_rewards_and_baselines_by_hand() {
        // Q = (2, 1, 3), V = (5, 4, 2.5): r = (2 − 4, 1 − 2.5, 3 − 0).
        assert_eq!(
            llmr_rewards(&[2.0, 1.0, 3.0], &[5.0, 4.0, 2.5]),
            [-2.0, -1.5, 3.0]
        );
        assert_eq!(
            baseline_advantages(&[1.0, 0.0, 0.0, 1.0]),
            [0.5, -0.5, -0.5, 0.5]
        );
        assert_eq!(baseline_advantages(&[1.0]), [0.0]);
    }

    #[test]
    fn importance_weights_are_one_without_the_teacher_in_the_mixture() {
        assert_eq!(
            importance_weights(&[0.9, 0.1], &[0.3, 0.6], 0.0),
            [1.0, 1.0]
        );
        let w = importance_weights(&[0.9], &[0.3], 0.2);
        assert!((w[0] - 0.3 / (0.2 * 0.9 + 0.8 * 0.3)).abs() < 1e-7);
    }
}
