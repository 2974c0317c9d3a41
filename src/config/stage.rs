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
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Sft => "sft",
            Stage::Dpt => "dpt",
            Stage::Dft => "dft",
            Stage::Gkd => "gkd",
        }
    }

    /// Every stage, in recipe order.
    pub const ALL: [Stage; 5] = [
        Stage::Pretrain,
        Stage::Sft,
        Stage::Dpt,
        Stage::Dft,
        Stage::Gkd,
    ];

    /// The objective of a stage whose preset names none: cross-entropy alone, LLaVA-KD's
    /// L_ce + α·L_res + β·L_vis + γ·L_rel with the `[distill]` weights (DPT, DFT), or GKD's
    /// generalized JSD alone.
    pub fn builtin_objective(self, distill: &DistillLossConfig) -> Vec<TermSpec> {
        match self {
            Stage::Gkd => vec![TermSpec::new("gkd", 1.0)],
            _ => TermSpec::builtin(self.distills(), distill),
        }
    }

    pub fn distills(self) -> bool {
        matches!(self, Stage::Dpt | Stage::Dft | Stage::Gkd)
    }

    pub fn trains_llm(self) -> bool {
        matches!(self, Stage::Sft | Stage::Dft | Stage::Gkd)
    }

    /// Pre-training stages use the caption data and the `plain` template.
    pub fn is_pretraining(self) -> bool {
        matches!(self, Stage::Pretrain | Stage::Dpt)
    }

    /// The paper's settings (TinyLLaVA recipe): lr 1e-3 for projector-only stages, 2e-5
    /// otherwise; cosine with 3 % warmup; no weight decay; one epoch. GKD rolls out with its
    /// paper's defaults (`[rollout]`).
    pub(super) fn defaults(self) -> Table {
        let lr = if self.is_pretraining() { 1e-3 } else { 2e-5 };
        let mut t = Table::new();
        t.insert("lr".into(), Value::Float(lr));
        if self == Stage::Gkd {
            t.insert("rollout".into(), Value::Table(Table::new()));
        }
        t
    }
}
