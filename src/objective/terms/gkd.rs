//! `gkd`: GKD's loss (Agarwal et al., ICLR 2024, eq. 3 with the generalized JSD of §3): the
//! generalized Jensen–Shannon divergence JSD(β) between teacher p and student q at every
//! position that predicts a response token, averaged over those positions (TRL's
//! `batchmean` with labels). With M = β·p + (1−β)·q, JSD(β) = β·KL(p‖M) + (1−β)·KL(q‖M);
//! β = 0 is forward KL(p‖q) and β = 1 reverse KL(q‖p), as in TRL. Whether the responses are
//! the data's, the teacher's or the student's own is the stage's `[rollout]`, not the term's.

use anyhow::{ensure, Result};
use candle_core::Tensor;

use super::TermKind;
use crate::distill::{DistillLossConfig, Divergence, LossInputs};
use crate::objective::{Needs, Term};

/// GKD's β when the preset gives none (TRL's default).
const DEFAULT_BETA: f64 = 0.5;

pub const KIND: TermKind = TermKind {
    name: "gkd",
    log_name: "l_gkd",
    about: "GKD's generalized JSD(beta) at the response tokens",
    divergence_options: false,
    options: &["beta", "temperature", "t2_scaling"],
    build: |cfg| {
        let beta = cfg.spec.beta.unwrap_or(DEFAULT_BETA);
        ensure!(
            (0.0..=1.0).contains(&beta),
            "objective term `gkd`: `beta` must be in [0, 1], got {beta}"
        );
        Ok(Box::new(Gkd {
            cfg: DistillLossConfig {
                divergence: Divergence::GeneralizedJsd { beta },
                ..cfg.loss.clone()
            },
        }))
    },
};

#[derive(Debug)]
struct Gkd {
    cfg: DistillLossConfig,
}

impl Term for Gkd {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            teacher_temperature: Some(self.cfg.temperature),
            ..Needs::default()
        }
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        inputs.response_divergence(&self.cfg)
    }
}
