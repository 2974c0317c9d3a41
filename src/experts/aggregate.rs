//! Knowledge aggregation (Xue et al. 2022, "One Student Knows All Experts Know"; Kim et al.
//! 2025): the experts of one sparse layer gathered into a dense SwiGLU block. A layer's routed
//! output is Σ_e c_e·E_e(x) in expectation, c_e the router weight expert e gets per token
//! (measured on data), so each method keeps that total mass Σ_e c_e on its neurons:
//!
//! - usage-avg: the experts' weights averaged with weights c_e / Σc (the expert width);
//! - top-k: the k experts with the largest c_e side by side (k × the expert width), expert e's
//!   output scaled by c_e · Σc / Σ_top c (the exact expected mixture when k = every expert);
//! - svd: every expert neuron (its gate row, up row and down column, weighted by √(c_e / mean
//!   c)) stacked, and the r principal directions of that matrix as the r neurons of the dense
//!   block: the best rank-r fit of the stacked expert weights at the dense width r.
//!
//! A shared expert (Qwen2-MoE) is always on: it joins side by side, scaled by its mean gate.

use anyhow::{ensure, Result};
use ndarray::{concatenate, Array2, Axis};
use serde::Serialize;

/// How the experts are gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// The experts' weights averaged by measured router weight.
    UsageAvg,
    /// The k experts with the most router weight, side by side.
    TopK,
    /// The principal neurons of all experts (SVD) at the dense width.
    Svd,
}

impl Aggregation {
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::UsageAvg => "usage-avg",
            Aggregation::TopK => "top-k",
            Aggregation::Svd => "svd",
        }
    }
}

/// A SwiGLU block's weights as transformers stores them: gate and up `[width, hidden]`, down
/// `[hidden, width]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseFfn {
    pub gate: Array2<f32>,
    pub up: Array2<f32>,
    pub down: Array2<f32>,
}

impl DenseFfn {
    pub fn width(&self) -> usize {
        self.gate.nrows()
    }

    pub fn hidden(&self) -> usize {
        self.gate.ncols()
    }

    /// The same block with its output multiplied by `factor`.
    pub fn scaled(mut self, factor: f64) -> Self {
        self.down.mapv_inplace(|w| w * factor as f32);
        self
    }

    /// The blocks side by side: their outputs add (`width` = the sum of theirs).
    pub fn side_by_side(blocks: &[DenseFfn]) -> Result<Self> {
        ensure!(!blocks.is_empty(), "no block to put side by side");
        let hidden = blocks[0].hidden();
        ensure!(
            blocks.iter().all(|b| b.hidden() == hidden),
            "blocks of different hidden sizes"
        );
        let rows = |f: fn(&DenseFfn) -> &Array2<f32>| {
            let views: Vec<_> = blocks.iter().map(|b| f(b).view()).collect();
            concatenate(Axis(0), &views)
        };
        let downs: Vec<_> = blocks.iter().map(|b| b.down.view()).collect();
        Ok(Self {
            gate: rows(|b| &b.gate)?,
            up: rows(|b| &b.up)?,
            down: concatenate(Axis(1), &downs)?,
        })
    }

    /// Widened to `width` with neurons whose weights are all 0 (they add exactly nothing).
    pub fn padded(self, width: usize) -> Result<Self> {
        ensure!(
            width >= self.width(),
            "cannot pad a block of width {} to {width}",
            self.width()
        );
        let extra = width - self.width();
        if extra == 0 {
            return Ok(self);
        }
        let zeros = DenseFfn {
            gate: Array2::zeros((extra, self.hidden())),
            up: Array2::zeros((extra, self.hidden())),
            down: Array2::zeros((self.hidden(), extra)),
        };
        Self::side_by_side(&[self, zeros])
    }

    /// `down(silu(gate x) ⊙ up x)` for one input (tests and checks).
    pub fn forward(&self, x: &ndarray::Array1<f32>) -> ndarray::Array1<f32> {
        let g = self.gate.dot(x);
        let u = self.up.dot(x);
        let h = ndarray::Zip::from(&g)
            .and(&u)
            .map_collect(|&g, &u| g / (1.0 + (-g).exp()) * u);
        self.down.dot(&h)
    }
}

/// The experts of one layer gathered by `method`; `mean_weight[e]`: the router weight expert
/// e's output gets per token; `width`: the dense width (svd only).
pub fn aggregate(
    experts: &[DenseFfn],
    mean_weight: &[f64],
    method: Aggregation,
    top_k: usize,
    width: Option<usize>,
) -> Result<DenseFfn> {
    ensure!(!experts.is_empty(), "a sparse layer without experts");
    ensure!(
        experts.len() == mean_weight.len(),
        "{} experts, {} router weights",
        experts.len(),
        mean_weight.len()
    );
    let mass: f64 = mean_weight.iter().sum();
    ensure!(
        mass > 0.0 && mean_weight.iter().all(|w| w.is_finite() && *w >= 0.0),
        "the router weights measured are not usable: {mean_weight:?}"
    );
    match method {
        Aggregation::UsageAvg => {
            let mut sum = DenseFfn {
                gate: Array2::zeros(experts[0].gate.raw_dim()),
                up: Array2::zeros(experts[0].up.raw_dim()),
                down: Array2::zeros(experts[0].down.raw_dim()),
            };
            for (e, c) in experts.iter().zip(mean_weight) {
                let w = (c / mass) as f32;
                sum.gate.scaled_add(w, &e.gate);
                sum.up.scaled_add(w, &e.up);
                sum.down.scaled_add(w, &e.down);
            }
            Ok(sum.scaled(mass))
        }
        Aggregation::TopK => {
            ensure!(
                (1..=experts.len()).contains(&top_k),
                "top-{top_k} of {} experts",
                experts.len()
            );
            let weights: Vec<f32> = mean_weight.iter().map(|&w| w as f32).collect();
            let chosen = crate::models::moe::top_k(&weights, top_k);
            let kept: f64 = chosen.iter().map(|&e| mean_weight[e]).sum();
            let blocks: Vec<DenseFfn> = chosen
                .iter()
                .map(|&e| experts[e].clone().scaled(mean_weight[e] * mass / kept))
                .collect();
            DenseFfn::side_by_side(&blocks)
        }
        Aggregation::Svd => {
            let width = width.unwrap_or(top_k * experts[0].width());
            svd_fit(experts, mean_weight, width)
        }
    }
}

/// The `width` principal neurons of all experts' neurons (see the module's doc).
fn svd_fit(experts: &[DenseFfn], mean_weight: &[f64], width: usize) -> Result<DenseFfn> {
    let hidden = experts[0].hidden();
    let neurons: usize = experts.iter().map(DenseFfn::width).sum();
    let reachable = neurons.min(3 * hidden);
    ensure!(
        width >= 1 && width <= reachable,
        "an SVD of the {neurons} expert neurons (each 3 × {hidden} weights) reaches widths 1 to \
         {reachable}; --width {width} is beyond it"
    );
    let mean_c = mean_weight.iter().sum::<f64>() / mean_weight.len() as f64;
    let mut rows = nalgebra::DMatrix::<f64>::zeros(neurons, 3 * hidden);
    let mut at = 0;
    for (e, c) in experts.iter().zip(mean_weight) {
        let w = (c / mean_c).sqrt();
        for i in 0..e.width() {
            for h in 0..hidden {
                rows[(at, h)] = w * e.gate[(i, h)] as f64;
                rows[(at, hidden + h)] = w * e.up[(i, h)] as f64;
                rows[(at, 2 * hidden + h)] = w * e.down[(h, i)] as f64;
            }
            at += 1;
        }
    }
    let svd = rows.svd(true, true);
    let (u, v_t) = (svd.u.expect("asked for U"), svd.v_t.expect("asked for Vᵀ"));
    // nalgebra does not sort the singular values.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    // Each principal neuron at a typical neuron's norm: ‖S_r V_rᵀ‖² ≈ r/n of ‖N‖².
    let norm = (neurons as f64 / width as f64).sqrt();
    let mut dense = DenseFfn {
        gate: Array2::zeros((width, hidden)),
        up: Array2::zeros((width, hidden)),
        down: Array2::zeros((hidden, width)),
    };
    for (j, &k) in order.iter().take(width).enumerate() {
        // A neuron and its negation are different functions: take the direction most of the
        // expert neurons point along.
        let sign = if u.column(k).sum() < 0.0 { -1.0 } else { 1.0 };
        let scale = sign * svd.singular_values[k] / norm;
        for h in 0..hidden {
            dense.gate[(j, h)] = (scale * v_t[(k, h)]) as f32;
            dense.up[(j, h)] = (scale * v_t[(k, hidden + h)]) as f32;
            dense.down[(h, j)] = (scale * v_t[(k, 2 * hidden + h)]) as f32;
        }
    }
    // The layer's mass Σ_n c_n over its neurons, spread over the dense block's.
    let per_neuron = mean_c * neurons as f64 / width as f64;
    Ok(dense.scaled(per_neuron))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;
    use rand::{Rng, SeedableRng};

    fn random_ffn(rng: &mut rand_chacha::ChaCha8Rng, width: usize, hidden: usize) -> DenseFfn {
        let mut m = |r, c| Array2::from_shape_fn((r, c), |_| rng.gen_range(-0.5f32..0.5));
        DenseFfn {
            gate: m(width, hidden),
            up: m(width, hidden),
            down: m(hidden, width),
        }
    }

    fn close(a: &Array1<f32>, b: &Array1<f32>, tol: f32) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn top_k_of_every_expert_is_the_expected_mixture_and_usage_avg_averages_the_weights() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let experts: Vec<DenseFfn> = (0..3).map(|_| random_ffn(&mut rng, 4, 6)).collect();
        let c = [0.5, 0.3, 0.2];
        let x = Array1::from_shape_fn(6, |_| rng.gen_range(-1f32..1.0));
        let mixture = experts.iter().zip(c).fold(Array1::zeros(6), |acc, (e, c)| {
            acc + e.forward(&x) * c as f32
        });
        let all = aggregate(&experts, &c, Aggregation::TopK, 3, None).unwrap();
        assert_eq!(all.width(), 12);
        assert!(close(&all.forward(&x), &mixture, 1e-5));
        // Two of three: experts 0 and 1, their weights renormalised to the whole mass.
        let two = aggregate(&experts, &c, Aggregation::TopK, 2, None).unwrap();
        let want = experts[0].forward(&x) * (0.5 / 0.8) as f32
            + experts[1].forward(&x) * (0.3 / 0.8) as f32;
        assert!(close(&two.forward(&x), &want, 1e-5));

        let avg = aggregate(&experts, &c, Aggregation::UsageAvg, 2, None).unwrap();
        assert_eq!(avg.width(), 4);
        let want_gate = &experts[0].gate * 0.5 + &experts[1].gate * 0.3 + &experts[2].gate * 0.2;
        assert!(avg
            .gate
            .iter()
            .zip(&want_gate)
            .all(|(a, b)| (a - b).abs() < 1e-6));
        // Σc = 1: the averaged down projection is not rescaled.
        let want_down = &experts[0].down * 0.5 + &experts[1].down * 0.3 + &experts[2].down * 0.2;
        assert!(avg
            .down
            .iter()
            .zip(&want_down)
            .all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn svd_of_identical_experts_recovers_the_expert_and_refuses_unreachable_widths() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let one = random_ffn(&mut rng, 1, 5);
        let experts = vec![one.clone(); 4];
        let c = [0.25; 4];
        let fit = aggregate(&experts, &c, Aggregation::Svd, 1, Some(1)).unwrap();
        let x = Array1::from_shape_fn(5, |_| rng.gen_range(-1f32..1.0));
        // Mass 1 over one neuron: the expert itself.
        assert!(close(&fit.forward(&x), &one.forward(&x), 1e-5), "{fit:?}");
        let err = aggregate(&experts, &c, Aggregation::Svd, 1, Some(5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reaches widths 1 to 4") && err.contains("--width 5"),
            "{err}"
        );
    }

    #[test]
    fn side_by_side_blocks_add_and_zero_padding_adds_nothing() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (a, b) = (random_ffn(&mut rng, 3, 4), random_ffn(&mut rng, 2, 4));
        let x = Array1::from_shape_fn(4, |_| rng.gen_range(-1f32..1.0));
        let both = DenseFfn::side_by_side(&[a.clone(), b.clone()]).unwrap();
        assert!(close(
            &both.forward(&x),
            &(a.forward(&x) + b.forward(&x)),
            1e-6
        ));
        let padded = a.clone().padded(7).unwrap();
        assert_eq!(padded.width(), 7);
        assert!(close(&padded.forward(&x), &a.forward(&x), 0.0));
    }
}
