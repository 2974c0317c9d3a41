//! Router usage measured over a data set: per sparse layer, how many of the real tokens' top-k
//! assignments each expert receives, the router weight each gets on average (what the layer's
//! output mixes in expectation), and the shared expert's mean gate.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, D};
use serde::Serialize;

use crate::batch::{prepare_data, training_tokenize_config, ModelInputs};
use crate::checkpoint::LoadedModel;
use crate::models::llava::ImageInput;
use crate::models::moe::top_k;

/// Where the tokens the routers are measured on come from.
#[derive(Clone, Copy, Debug)]
pub struct UsageData<'a> {
    /// LLaVA JSON/JSONL conversations.
    pub data: &'a Path,
    pub images: &'a Path,
    /// A template name or file; `None`: the model's own (its training record), else `plain`.
    pub template: Option<&'a str>,
    pub batch_size: usize,
    pub max_length: usize,
}

/// One sparse layer's use of its experts.
#[derive(Clone, Debug, Serialize)]
pub struct LayerUsage {
    pub layer: usize,
    /// Real (unpadded) tokens routed.
    pub tokens: u64,
    /// Top-k assignments per expert.
    pub assignments: Vec<u64>,
    /// Σ over tokens of the router weight each expert's output is mixed with (0 when not
    /// chosen).
    pub weight_sum: Vec<f64>,
    /// Σ over tokens of the shared expert's sigmoid gate (0 without a shared expert).
    pub shared_gate_sum: f64,
}

impl LayerUsage {
    /// Each expert's share of the assignments (sums to 1).
    pub fn load(&self) -> Vec<f64> {
        let total: u64 = self.assignments.iter().sum();
        self.assignments
            .iter()
            .map(|&a| a as f64 / total.max(1) as f64)
            .collect()
    }

    /// The router weight each expert's output gets per token on average: the layer's routed
    /// output is Σ_e c_e·E_e(x) in expectation.
    pub fn mean_weight(&self) -> Vec<f64> {
        let n = self.tokens.max(1) as f64;
        self.weight_sum.iter().map(|w| w / n).collect()
    }

    pub fn mean_shared_gate(&self) -> f64 {
        self.shared_gate_sum / self.tokens.max(1) as f64
    }

    /// The busiest expert's load over the even load 1/experts (1 = balanced).
    pub fn imbalance(&self) -> f64 {
        let load = self.load();
        load.iter().cloned().fold(0.0, f64::max) * load.len() as f64
    }
}

/// A model's router usage on a data set.
#[derive(Clone, Debug, Serialize)]
pub struct RouterUsage {
    pub experts: usize,
    pub top_k: usize,
    pub samples: usize,
    pub layers: Vec<LayerUsage>,
}

impl RouterUsage {
    pub fn layer(&self, layer: usize) -> Option<&LayerUsage> {
        self.layers.iter().find(|l| l.layer == layer)
    }

    /// A table for people: per layer the load of every expert (share of assignments).
    pub fn table(&self) -> String {
        let mut out = format!(
            "router usage on {} samples ({} experts, top-{}):\n",
            self.samples, self.experts, self.top_k
        );
        out += &format!(
            "{:<6} {:>8}  {:<width$}  {:>9}  {:>11}\n",
            "layer",
            "tokens",
            "load per expert (% of assignments)",
            "imbalance",
            "shared gate",
            width = 7 * self.experts.max(5)
        );
        for l in &self.layers {
            let loads: String = l
                .load()
                .iter()
                .map(|x| format!("{:>6.1} ", 100.0 * x))
                .collect();
            out += &format!(
                "{:<6} {:>8}  {:<width$}  {:>9.2}  {:>11}\n",
                l.layer,
                l.tokens,
                loads,
                l.imbalance(),
                if l.shared_gate_sum > 0.0 {
                    format!("{:.3}", l.mean_shared_gate())
                } else {
                    "-".into()
                },
                width = 7 * self.experts.max(5)
            );
        }
        out
    }
}

/// Runs `bundle` over `data` and counts its routers' choices at every real token.
pub fn measure_usage(bundle: &LoadedModel, data: &UsageData<'_>) -> Result<RouterUsage> {
    let model = &bundle.model;
    let shape = model.config.text_config.moe_shape();
    let sparse: Vec<usize> = model.lm.sparse_blocks().iter().map(|(i, _)| *i).collect();
    let Some(shape) = shape.filter(|_| !sparse.is_empty()) else {
        anyhow::bail!(
            "{} is a dense model ({:?}): it has no router to measure",
            bundle.model_dir.display(),
            model.config.text_config.model_type
        );
    };
    ensure!(data.batch_size > 0, "--batch-size must be at least 1");
    let template = crate::checkpoint::training::template_for(
        bundle.training.as_ref(),
        &bundle.model_dir,
        data.template,
        "plain",
    )?;
    let prepared = prepare_data(
        data.data,
        data.images,
        &bundle.tokenizer,
        &template,
        &training_tokenize_config(model, data.max_length),
        "router statistics",
    )?;
    let mut layers: Vec<LayerUsage> = sparse
        .iter()
        .map(|&layer| LayerUsage {
            layer,
            tokens: 0,
            assignments: vec![0; shape.experts],
            weight_sum: vec![0.0; shape.experts],
            shared_gate_sum: 0.0,
        })
        .collect();
    let indices: Vec<usize> = (0..prepared.samples.len()).collect();
    for chunk in indices.chunks(data.batch_size) {
        let inputs = ModelInputs::collate(&prepared.samples, chunk.to_vec(), bundle)?;
        let out = model
            .forward_images(
                &inputs.tokens,
                inputs.pixels.as_ref().map(ImageInput::Pixels),
            )
            .with_context(|| {
                format!(
                    "router statistics on samples {}",
                    inputs.collated.sample_ids.join(", ")
                )
            })?;
        let real: Vec<bool> = inputs
            .tokens
            .mask
            .iter()
            .flatten()
            .map(|&m| m == 1)
            .collect();
        let gates = &out.layers.shared_gates;
        for (at, (usage, logits)) in layers.iter_mut().zip(&out.layers.router_logits).enumerate() {
            let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?
                .to_vec2::<f32>()?;
            let gate: Option<Vec<f32>> = match gates.get(at) {
                Some(g) => Some(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
                None => None,
            };
            for (t, row) in probs.iter().enumerate().filter(|(t, _)| real[*t]) {
                usage.tokens += 1;
                let chosen = top_k(row, shape.top_k);
                let mass: f32 = chosen.iter().map(|&e| row[e]).sum();
                for &e in &chosen {
                    usage.assignments[e] += 1;
                    let w = if shape.norm_topk_prob {
                        row[e] / mass
                    } else {
                        row[e]
                    };
                    usage.weight_sum[e] += w as f64;
                }
                if let Some(g) = &gate {
                    usage.shared_gate_sum += g[t] as f64;
                }
            }
        }
    }
    Ok(RouterUsage {
        experts: shape.experts,
        top_k: shape.top_k,
        samples: prepared.samples.len(),
        layers,
    })
}
