//! The tables of a stage's train settings: `[lora]` (low-rank adapters) and `[rollout]`
//! (on-policy answers).

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::settings::Module;

/// `train.lora`: low-rank adapters (PEFT's defaults where one applies).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "default_lora_rank")]
    pub rank: usize,
    /// The branch is scaled by alpha / rank (alpha / √rank with `rslora`).
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    /// Linear layers adapted, by name (`q_proj`, `fc1`, `linear_1`, …), or `all-linear`.
    #[serde(default = "default_lora_targets")]
    pub targets: Vec<String>,
    /// Modules whose layers get adapters; their other weights are frozen.
    #[serde(default = "default_lora_modules")]
    pub modules: Vec<Module>,
    #[serde(default)]
    pub rslora: bool,
    /// Dropout on each adapter's input while training (PEFT's `lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
}

impl Default for LoraSettings {
    fn default() -> Self {
        toml::from_str("").expect("all LoRA settings have defaults")
    }
}

fn default_lora_rank() -> usize {
    8
}
fn default_lora_alpha() -> f64 {
    8.0
}
fn default_lora_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}
fn default_lora_modules() -> Vec<Module> {
    vec![Module::Llm]
}

/// `[stages.<stage>.rollout]`: the student answers a share of the micro-batches' prompts
/// itself, and the objective compares teacher and student on those answers. Defaults are
/// GKD's (λ = 0.5, T = 0.9).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RolloutSettings {
    /// Probability λ that a micro-batch's last answers are the student's own (drawn per
    /// micro-batch from the seed and the step).
    #[serde(default = "half")]
    pub lambda: f64,
    /// Sampling temperature of the rollouts (0: greedy).
    #[serde(default = "default_rollout_temperature")]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    /// Answers are cut at this many tokens (and counted in the summary).
    #[serde(default = "default_rollout_tokens")]
    pub max_new_tokens: usize,
    /// Teacher-mixed sampling (MiniLLM): the student's answers are drawn from
    /// α·teacher + (1−α)·student, with importance weights in the MiniLLM terms (0: the
    /// student alone).
    #[serde(default)]
    pub mix_alpha: f64,
    /// What the policy-gradient terms maximise: MiniLLM's per-token log p − log q (default),
    /// the task's exact match with the data's answer, or the teacher's logits read as
    /// Q-values (LLMR).
    #[serde(default)]
    pub reward: RewardKind,
    /// β_KL: a task or teacher reward shaped by −β_KL · Σ_t (log q − log p), the sampled
    /// answer's estimate of KL(student ‖ teacher).
    #[serde(default)]
    pub kl_coef: f64,
    /// Sequence-level KD: the micro-batches the student does not answer take the teacher's
    /// greedy answers instead of the data's.
    #[serde(default)]
    pub seq_kd: bool,
    /// Every N optimizer steps the step's rollouts go to `rollouts.jsonl` with their
    /// per-token log-probabilities (0: never).
    #[serde(default = "default_rollout_log_every")]
    pub log_every: usize,
}

/// The reward of the student's sampled answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// MiniLLM: r_t = log p(y_t) − log q(y_t), length-normalised sums of the rewards after t.
    #[default]
    Minillm,
    /// 1 when the answer equals the data's (VQA-normalised, as the evaluation scores it),
    /// else 0; one value per answer, less the micro-batch's mean (the baseline).
    Task,
    /// LLMR: the teacher's logits z as Q-values, r_t = z_t(y_t) − logsumexp z_{t+1} (0 after
    /// the last token); the answer's mean reward, less the micro-batch's mean.
    Teacher,
}

fn half() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}
fn default_rollout_temperature() -> f64 {
    0.9
}
fn default_rollout_tokens() -> usize {
    64
}
fn default_rollout_log_every() -> usize {
    10
}

impl Default for RolloutSettings {
    fn default() -> Self {
        toml::from_str("").expect("all rollout settings have defaults")
    }
}

impl RolloutSettings {
    pub(super) fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.lambda),
            "rollout.lambda must be in [0, 1], got {}",
            self.lambda
        );
        anyhow::ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "rollout.temperature must be ≥ 0 (0: greedy), got {}",
            self.temperature
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "rollout.top_p must be in (0, 1], got {}",
            self.top_p
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.mix_alpha),
            "rollout.mix_alpha must be in [0, 1], got {}",
            self.mix_alpha
        );
        anyhow::ensure!(
            self.mix_alpha == 0.0 || self.temperature > 0.0,
            "rollout.mix_alpha samples from a mixture: rollout.temperature must be positive"
        );
        anyhow::ensure!(
            self.kl_coef.is_finite() && self.kl_coef >= 0.0,
            "rollout.kl_coef must be ≥ 0, got {}",
            self.kl_coef
        );
        anyhow::ensure!(
            self.kl_coef == 0.0 || self.reward != RewardKind::Minillm,
            "rollout.kl_coef shapes a task or teacher reward (rollout.reward = \"task\" or \
             \"teacher\"); MiniLLM's reward is already the log-ratio to the teacher"
        );
        anyhow::ensure!(
            self.max_new_tokens >= 1,
            "rollout.max_new_tokens must be at least 1"
        );
        Ok(())
    }
}
