//! The training stages a recipe runs, and what each one is by default.

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::distill::DistillLossConfig;
use crate::objective::TermSpec;

/// The training stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// PT: captions, `plain` template, cross-entropy; trains the projector (or
    /// `train.trainable`'s modules: the shapes presets add the LLM).
    Pretrain,
    /// SFT: instructions, chat template, cross-entropy; trains projector + LLM.
    Sft,
    /// DPT: captions; CE + α·L_res + β·L_vis + γ·L_rel against a teacher; trains the projector
    /// (or `train.trainable`'s modules).
    Dpt,
    /// DFT: instructions; the same loss; trains projector + LLM.
    Dft,
    /// GKD (Agarwal et al. 2024): instructions; the generalized JSD at the response tokens,
    /// a share λ of the micro-batches answered by the student itself (`[rollout]`); trains
    /// projector + LLM.
    Gkd,
    /// MiniLLM (Gu et al. 2024): instructions; the reverse KL by policy gradient on answers
    /// the student samples (teacher-mixed, α 0.2), plus the cross-entropy on the data; trains
    /// projector + LLM.
    Minillm,
    /// RL: instructions; the clipped policy gradient on answers the student samples, for the
    /// task's reward (exact match with the data's answer, `[rollout] reward`), optionally
    /// shaped by the KL to the teacher (`kl_coef`) or replaced by the teacher's (LLMR); trains
    /// projector + LLM.
    Rl,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Sft => "sft",
            Stage::Dpt => "dpt",
            Stage::Dft => "dft",
            Stage::Gkd => "gkd",
            Stage::Minillm => "minillm",
            Stage::Rl => "rl",
        }
    }

    /// Every stage, in recipe order.
    pub const ALL: [Stage; 7] = [
        Stage::Pretrain,
        Stage::Sft,
        Stage::Dpt,
        Stage::Dft,
        Stage::Gkd,
        Stage::Minillm,
        Stage::Rl,
    ];

    /// The objective of a stage whose preset names none: cross-entropy alone, LLaVA-KD's
    /// L_ce + α·L_res + β·L_vis + γ·L_rel with the `[distill]` weights (DPT, DFT), GKD's
    /// generalized JSD alone, MiniLLM's single-step and long-term parts with the
    /// cross-entropy on the data (L_PT), or RL's policy gradient.
    pub fn builtin_objective(self, distill: &DistillLossConfig) -> Vec<TermSpec> {
        match self {
            Stage::Gkd => vec![TermSpec::new("gkd", 1.0)],
            Stage::Minillm => vec![
                TermSpec::new("minillm.single", 1.0),
                TermSpec::new("minillm.long", 1.0),
                TermSpec::new("ce", 1.0),
            ],
            Stage::Rl => vec![TermSpec::new("pg", 1.0)],
            _ => TermSpec::builtin(self.distills(), distill),
        }
    }

    pub fn distills(self) -> bool {
        matches!(
            self,
            Stage::Dpt | Stage::Dft | Stage::Gkd | Stage::Minillm | Stage::Rl
        )
    }

    pub fn trains_llm(self) -> bool {
        matches!(
            self,
            Stage::Sft | Stage::Dft | Stage::Gkd | Stage::Minillm | Stage::Rl
        )
    }

    /// Pre-training stages use the caption data and the `plain` template.
    pub fn is_pretraining(self) -> bool {
        matches!(self, Stage::Pretrain | Stage::Dpt)
    }

    /// The paper's settings (TinyLLaVA recipe): lr 1e-3 for projector-only stages, 2e-5
    /// otherwise; cosine with 3 % warmup; no weight decay; one epoch. GKD and MiniLLM roll
    /// out with their papers' defaults (`[rollout]`): GKD λ 0.5 at temperature 0.9; MiniLLM
    /// every micro-batch, sampled at temperature 1 from the mixture with the teacher at α 0.2.
    pub(super) fn defaults(self) -> Table {
        let lr = if self.is_pretraining() { 1e-3 } else { 2e-5 };
        let mut t = Table::new();
        t.insert("lr".into(), Value::Float(lr));
        match self {
            Stage::Gkd => {
                t.insert("rollout".into(), Value::Table(Table::new()));
            }
            Stage::Minillm => {
                let mut rollout = Table::new();
                rollout.insert("lambda".into(), Value::Float(1.0));
                rollout.insert("temperature".into(), Value::Float(1.0));
                rollout.insert("mix_alpha".into(), Value::Float(0.2));
                t.insert("rollout".into(), Value::Table(rollout));
            }
            Stage::Rl => {
                let mut rollout = Table::new();
                rollout.insert("lambda".into(), Value::Float(1.0));
                rollout.insert("temperature".into(), Value::Float(1.0));
                rollout.insert("reward".into(), Value::String("task".into()));
                t.insert("rollout".into(), Value::Table(rollout));
            }
            _ => {}
        }
        t
    }
}
