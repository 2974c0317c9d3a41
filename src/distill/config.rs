//! The distillation settings every divergence term reads: the divergence, its temperature and
//! the T² option, and the LLaVA-KD weights (α, β, γ) of the built-in distillation objective.

use anyhow::{ensure, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::divergence::Divergence;

/// Distillation loss settings. Defaults are the paper's: forward KL at T = 1 without T²,
/// (α, β, γ) = (1.0, 1.0, 0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillLossConfig {
    pub divergence: Divergence,
    /// Softmax temperature T applied to both teacher and student logits.
    pub temperature: f64,
    /// Multiply the divergence terms (L_res, L_vis) by T², as in Hinton et al., so their
    /// gradient scale does not shrink with T. LLaVA-KD and TRL do not.
    pub t2_scaling: bool,
    /// Weight α of L_res.
    pub alpha_res: f64,
    /// Weight β of L_vis.
    pub beta_vis: f64,
    /// Weight γ of L_rel.
    pub gamma_rel: f64,
}

impl Default for DistillLossConfig {
    fn default() -> Self {
        Self {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            t2_scaling: false,
            alpha_res: 1.0,
            beta_vis: 1.0,
            gamma_rel: 0.5,
        }
    }
}

impl DistillLossConfig {
    pub fn validate(&self) -> Result<()> {
        self.divergence.validate()?;
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "distillation `temperature` must be a positive number, got {}",
            self.temperature
        );
        for (name, w) in [
            ("alpha_res", self.alpha_res),
            ("beta_vis", self.beta_vis),
            ("gamma_rel", self.gamma_rel),
        ] {
            ensure!(
                w.is_finite() && w >= 0.0,
                "distillation weight `{name}` must be ≥ 0, got {w}"
            );
        }
        Ok(())
    }

    /// Per-row divergence of `[N, V]` logits at this temperature, times T² when enabled.
    pub fn per_token(&self, student_rows: &Tensor, teacher_rows: &Tensor) -> Result<Tensor> {
        let d = self
            .divergence
            .per_token(student_rows, teacher_rows, self.temperature)?;
        if self.t2_scaling {
            Ok(d.affine(self.temperature * self.temperature, 0.0)?)
        } else {
            Ok(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_toml_with_defaults() {
        let cfg: DistillLossConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, DistillLossConfig::default());
        let cfg: DistillLossConfig =
            toml::from_str("divergence = { kind = \"jsd\", beta = 0.9 }\ntemperature = 2.0\nt2_scaling = true\ngamma_rel = 0.0")
                .unwrap();
        assert_eq!(cfg.divergence, Divergence::GeneralizedJsd { beta: 0.9 });
        assert_eq!(
            (
                cfg.temperature,
                cfg.t2_scaling,
                cfg.alpha_res,
                cfg.gamma_rel
            ),
            (2.0, true, 1.0, 0.0)
        );
        let err = toml::from_str::<DistillLossConfig>("alpha = 1.0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `alpha`"), "{err}");
        let bad = DistillLossConfig {
            beta_vis: -1.0,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "distillation weight `beta_vis` must be ≥ 0, got -1"
        );
    }
}
