//! `minillm.single` and `minillm.long`: MiniLLM's reverse-KL policy gradient on the answers
//! the student sampled (Gu et al., ICLR 2024), the single-step part computed exactly and the
//! length-normalised long-term part with PPO-style clipping; the formulas and their equations
//! are in [`crate::distill::policy`]. Both read the stage's rollouts (`mmkd minillm`); on a
//! micro-batch the student did not answer they have no value.

use anyhow::{ensure, Result};
use candle_core::Tensor;

use super::TermKind;
use crate::distill::policy::{long_term_loss, single_step_loss};
use crate::distill::LossInputs;
use crate::objective::{Needs, Term};

/// MiniLLM's clip range when the preset gives none (the paper's 0.2).
const DEFAULT_CLIP: f64 = 0.2;

pub const SINGLE: TermKind = TermKind {
    name: "minillm.single",
    log_name: "l_single",
    about: "MiniLLM's single-step reverse KL at the student's sampled answers",
    divergence_options: false,
    options: &[],
    build: |_| Ok(Box::new(SingleStep)),
};

pub const LONG: TermKind = TermKind {
    name: "minillm.long",
    log_name: "l_long",
    about: "MiniLLM's clipped long-term policy gradient at the student's sampled answers",
    divergence_options: false,
    options: &["clip"],
    build: |cfg| {
        let clip = cfg.spec.clip.unwrap_or(DEFAULT_CLIP);
        ensure!(
            clip > 0.0 && clip.is_finite(),
            "objective term `{}`: `clip` must be positive, got {clip}",
            cfg.spec.term
        );
        Ok(Box::new(LongTerm { clip }))
    },
};

/// The same clipped policy gradient for any reward of the stage's rollouts (`mmkd rl`).
pub const PG: TermKind = TermKind {
    name: "pg",
    log_name: "l_pg",
    about: "clipped policy gradient on the rollouts' rewards ([rollout] reward)",
    divergence_options: false,
    options: &["clip"],
    build: LONG.build,
};

fn needs() -> Needs {
    Needs {
        teacher: true,
        teacher_logits: true,
        rollouts: true,
        ..Needs::default()
    }
}

#[derive(Debug)]
struct SingleStep;

impl Term for SingleStep {
    fn needs(&self) -> Needs {
        needs()
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        let Some((policy, student)) = inputs.policy_rows()? else {
            return Ok(None);
        };
        let teacher = inputs.teacher_rows_at(&policy.rows, SINGLE.name)?;
        single_step_loss(&student, &teacher, policy).map(Some)
    }
}

#[derive(Debug)]
struct LongTerm {
    clip: f64,
}

impl Term for LongTerm {
    fn needs(&self) -> Needs {
        needs()
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        let Some((policy, student)) = inputs.policy_rows()? else {
            return Ok(None);
        };
        long_term_loss(&student, policy, self.clip).map(Some)
    }
}
