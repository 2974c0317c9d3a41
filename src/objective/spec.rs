//! A term as a preset writes it (`[[stages.<stage>.objective]]`), and the built-in stages'
//! objectives.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::terms::TermKind;
use crate::distill::{DistillLossConfig, Divergence};

/// One `[[stages.<stage>.objective]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermSpec {
    /// The registered term (`ce`, `mdist.response`, `mdist.visual`, `rdist`).
    pub term: String,
    /// Its weight in the objective (0 turns it off).
    #[serde(default = "one")]
    pub weight: f64,
    /// The name it is logged under in metrics.jsonl, summary.json and loss.png (default: the
    /// term's own, e.g. `l_res` for `mdist.response`). Needed when a term appears twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Divergence of a distribution term (default: `[distill] divergence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence: Option<Divergence>,
    /// Softmax temperature of a distribution term (default: `[distill] temperature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Multiply a distribution term by T² (default: `[distill] t2_scaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t2_scaling: Option<bool>,
}

fn one() -> f64 {
    1.0
}

impl TermSpec {
    pub fn new(term: &str, weight: f64) -> Self {
        Self {
            term: term.into(),
            weight,
            name: None,
            divergence: None,
            temperature: None,
            t2_scaling: None,
        }
    }

    /// The objective of a built-in stage: cross-entropy alone, or (distilling) LLaVA-KD's
    /// L_ce + α·L_res + β·L_vis + γ·L_rel with the `[distill]` weights.
    pub fn builtin(distills: bool, distill: &DistillLossConfig) -> Vec<TermSpec> {
        let mut terms = vec![TermSpec::new("ce", 1.0)];
        if distills {
            terms.extend([
                TermSpec::new("mdist.response", distill.alpha_res),
                TermSpec::new("mdist.visual", distill.beta_vis),
                TermSpec::new("rdist", distill.gamma_rel),
            ]);
        }
        terms
    }

    /// The divergence settings of this term: its own options over `defaults`; options the
    /// term does not take are errors naming the ones it does.
    pub(super) fn resolve(
        &self,
        kind: &TermKind,
        defaults: &DistillLossConfig,
    ) -> Result<DistillLossConfig> {
        if !kind.divergence_options {
            for (option, set) in [
                ("divergence", self.divergence.is_some()),
                ("temperature", self.temperature.is_some()),
                ("t2_scaling", self.t2_scaling.is_some()),
            ] {
                if set {
                    bail!(
                        "objective term `{}` takes no `{option}` (its options: term, weight, name)",
                        self.term
                    );
                }
            }
        }
        let cfg = DistillLossConfig {
            divergence: self.divergence.unwrap_or(defaults.divergence),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            t2_scaling: self.t2_scaling.unwrap_or(defaults.t2_scaling),
            ..defaults.clone()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
