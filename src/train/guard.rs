//! Spike guards: a step whose loss or gradient norm jumps far above the run's recent values is
//! stopped before its update (`train.max_loss_spike`, `train.max_grad_norm_spike`), as a
//! loss that is not a finite number always is. The reference is the median of the last
//! [`WINDOW`] accepted steps, once [`WARMUP`] steps have been seen.

use std::collections::VecDeque;

/// Steps the median is taken over.
pub const WINDOW: usize = 20;
/// Steps seen before a guard can fire.
pub const WARMUP: usize = 10;

/// The factors over the recent median that stop a step (`None`: that guard is off).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpikeLimits {
    pub loss: Option<f64>,
    pub grad_norm: Option<f64>,
}

/// A step stopped by a guard, before its update.
#[derive(Debug, thiserror::Error)]
#[error("{what} jumped to {value:.4}, {ratio:.1}× the median {median:.4} of the last {window} steps (limit {limit}×)")]
pub struct Spike {
    pub what: &'static str,
    pub value: f64,
    pub median: f64,
    pub ratio: f64,
    pub limit: f64,
    pub window: usize,
}

/// The recent history of one value and its limit.
#[derive(Debug, Default)]
struct Track {
    recent: VecDeque<f64>,
}

impl Track {
    fn check(&self, what: &'static str, value: f64, limit: Option<f64>) -> Result<(), Spike> {
        let Some(limit) = limit else { return Ok(()) };
        if self.recent.len() < WARMUP {
            return Ok(());
        }
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if median > 0.0 && value > limit * median {
            return Err(Spike {
                what,
                value,
                median,
                ratio: value / median,
                limit,
                window: self.recent.len(),
            });
        }
        Ok(())
    }

    fn accept(&mut self, value: f64) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(value);
    }
}

/// Both guards with their histories (kept across steps; a resumed run starts them afresh).
#[derive(Debug, Default)]
pub struct SpikeGuard {
    limits: SpikeLimits,
    loss: Track,
    grad_norm: Track,
}

impl SpikeGuard {
    pub fn new(limits: SpikeLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Checks a step's loss and gradient norm; accepted values join the history.
    pub fn check(&mut self, loss: f64, grad_norm: f64) -> Result<(), Spike> {
        self.loss.check("the loss", loss, self.limits.loss)?;
        self.grad_norm
            .check("the gradient norm", grad_norm, self.limits.grad_norm)?;
        self.loss.accept(loss);
        self.grad_norm.accept(grad_norm);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spike_over_the_recent_median_stops_after_the_warmup_only() {
        let mut guard = SpikeGuard::new(SpikeLimits {
            loss: Some(3.0),
            grad_norm: None,
        });
        // During the warm-up nothing fires, not even a huge value.
        guard.check(100.0, 1.0).unwrap();
        for _ in 1..WARMUP {
            guard.check(1.0, 50.0).unwrap();
        }
        guard.check(2.9, 1e6).unwrap();
        let spike = guard.check(3.5, 1.0).unwrap_err();
        assert_eq!(spike.what, "the loss");
        assert!((spike.median - 1.0).abs() < 1e-12, "{spike}");
        assert!(spike.to_string().contains("3.5× the median"), "{spike}");
        // A rejected value does not join the history.
        guard.check(2.0, 1.0).unwrap();

        let mut grads = SpikeGuard::new(SpikeLimits {
            loss: None,
            grad_norm: Some(10.0),
        });
        for _ in 0..WARMUP {
            grads.check(1.0, 0.5).unwrap();
        }
        assert!(grads.check(1e9, 4.9).is_ok());
        assert_eq!(grads.check(1.0, 5.1).unwrap_err().what, "the gradient norm");
    }

    #[test]
    fn the_median_follows_the_last_window_of_steps() {
        let mut guard = SpikeGuard::new(SpikeLimits {
            loss: Some(2.0),
            grad_norm: None,
        });
        for _ in 0..WINDOW {
            guard.check(10.0, 1.0).unwrap();
        }
        // The loss falls: after a window of small values, the old scale no longer counts.
        for _ in 0..WINDOW {
            guard.check(1.0, 1.0).unwrap();
        }
        assert!(guard.check(2.5, 1.0).is_err());
    }
}
