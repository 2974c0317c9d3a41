//! A matmul throughput ceiling for this machine: the best of several square f32 products
//! through candle (the same gemm every Linear uses), to put the step's GFLOP/s in context.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::bench::data::normal_tensor;

/// Best GFLOP/s of `reps` products of two `n × n` f32 matrices (after one untimed warm-up).
pub fn matmul_peak_gflops(n: usize, reps: usize) -> Result<f64> {
    let a = normal_tensor((n, n), 1, &Device::Cpu)?;
    let b = normal_tensor((n, n), 2, &Device::Cpu)?;
    a.matmul(&b)?;
    let flops = 2.0 * (n as f64).powi(3);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let c: Tensor = a.matmul(&b)?;
        let seconds = start.elapsed().as_secs_f64();
        drop(c);
        best = best.max(flops / seconds / 1e9);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_peak_is_finite_and_positive() {
        let g = matmul_peak_gflops(32, 2).unwrap();
        assert!(g.is_finite() && g > 0.0, "{g}");
    }
}
