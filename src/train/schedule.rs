//! Learning-rate schedules: linear warmup, then cosine, linear or constant decay to a floor,
//! with the formulas of transformers' `get_*_schedule_with_warmup`.
//!
//! `factor(step)` multiplies the base learning rate at optimizer step `step` (0-based, the
//! value LambdaLR has before the step's `scheduler.step()`): during warmup `step / warmup`
//! (so the first step has lr 0 when there is warmup, as in transformers), then with
//! `progress = (step − warmup) / (total − warmup)` and floor r = `min_lr_ratio`:
//! - cosine: r + (1 − r)·½(1 + cos(π·progress)) (`get_cosine_with_min_lr_schedule_with_warmup`;
//!   r = 0 is `get_cosine_schedule_with_warmup`),
//! - linear: r + (1 − r)·(1 − progress) (r = 0 is `get_linear_schedule_with_warmup`),
//! - constant: 1 (`get_constant_schedule_with_warmup`).
//!
//! Steps past `total` stay at the final value (transformers' cosine would rise again).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Warmup length: a number of optimizer steps, or a fraction of the total
/// (`ceil(total × ratio)`, as transformers' `TrainingArguments.get_warmup_steps`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    Steps(usize),
    Ratio(f64),
}

impl Default for Warmup {
    /// LLaVA-KD / TinyLLaVA: 3 % of the steps.
    fn default() -> Self {
        Warmup::Ratio(0.03)
    }
}

/// As written in a preset: `decay = "cosine"`, `warmup = { ratio = 0.03 }` or
/// `warmup = { steps = 100 }`, `min_lr_ratio = 0.0`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub decay: Decay,
    pub warmup: Warmup,
    /// The floor as a fraction of the base learning rate.
    pub min_lr_ratio: f64,
}

/// A schedule resolved for a run of `total_steps` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    base_lr: f64,
    warmup_steps: usize,
    total_steps: usize,
    decay: Decay,
    min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn new(cfg: &ScheduleConfig, base_lr: f64, total_steps: usize) -> Result<Self> {
        ensure!(
            base_lr.is_finite() && base_lr >= 0.0,
            "learning rate must be ≥ 0, got {base_lr}"
        );
        ensure!(
            (0.0..=1.0).contains(&cfg.min_lr_ratio),
            "`min_lr_ratio` must be in [0, 1], got {}",
            cfg.min_lr_ratio
        );
        let warmup_steps = match cfg.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => {
                ensure!(
                    (0.0..=1.0).contains(&r),
                    "warmup `ratio` must be in [0, 1], got {r}"
                );
                (total_steps as f64 * r).ceil() as usize
            }
        };
        ensure!(
            warmup_steps <= total_steps,
            "{warmup_steps} warmup steps exceed the {total_steps} training steps"
        );
        Ok(Self {
            base_lr,
            warmup_steps,
            total_steps,
            decay: cfg.decay,
            min_lr_ratio: cfg.min_lr_ratio,
        })
    }

    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// The multiplier of the base learning rate at step `step`.
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let shape = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => return 1.0,
        };
        self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_syntax() {
        let cfg: ScheduleConfig =
            toml::from_str("decay = \"linear\"\nwarmup = { steps = 10 }\nmin_lr_ratio = 0.1")
                .unwrap();
        assert_eq!(
            cfg,
            ScheduleConfig {
                decay: Decay::Linear,
                warmup: Warmup::Steps(10),
                min_lr_ratio: 0.1
            }
        );
        let cfg: ScheduleConfig = toml::from_str("").unwrap();
        assert_eq!(
            (cfg.decay, cfg.warmup),
            (Decay::Cosine, Warmup::Ratio(0.03))
        );
        let err = toml::from_str::<ScheduleConfig>("decay = \"step\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `step`"), "{err}");
    }

    #[test]
    fn hand_computed_values() {
        let cfg = ScheduleConfig {
            decay: Decay::Cosine,
            warmup: Warmup::Steps(2),
            min_lr_ratio: 0.0,
        };
        let s = LrSchedule::new(&cfg, 1e-3, 10).unwrap();
        assert_eq!((s.lr(0), s.lr(1), s.lr(2)), (0.0, 5e-4, 1e-3));
        // Half-way through the decay (step 6 of 2..10) cosine is at one half.
        assert!((s.lr(6) - 5e-4).abs() < 1e-15);
        assert_eq!(s.lr(10), 0.0);
        assert_eq!(s.lr(50), 0.0);
        let no_warmup = ScheduleConfig {
            warmup: Warmup::Steps(0),
            ..cfg
        };
        assert_eq!(LrSchedule::new(&no_warmup, 1.0, 10).unwrap().lr(0), 1.0);
    }

    #[test]
    fn bad_settings_are_errors() {
        let cfg = ScheduleConfig {
            warmup: Warmup::Steps(20),
            ..Default::default()
        };
        let err = LrSchedule::new(&cfg, 1e-3, 10).unwrap_err().to_string();
        assert_eq!(err, "20 warmup steps exceed the 10 training steps");
        let cfg = ScheduleConfig {
            warmup: Warmup::Ratio(1.5),
            ..Default::default()
        };
        assert!(LrSchedule::new(&cfg, 1e-3, 10).is_err());
    }
}
