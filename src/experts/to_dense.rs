//! `mmkd moe-to-dense`: a Mixture-of-Experts LLaVA gathered into a dense one. Each sparse
//! layer's experts become one SwiGLU block ([`super::aggregate`], with the router weights
//! measured on data), the dense layers keep their MLP, every block is padded with zero neurons
//! to one width, and attention, embeddings, head, projector and tower are copied: a Qwen2
//! (from Qwen2-MoE) or Llama (from Mixtral) LLaVA checkpoint with the teacher's tokenizer and
//! processor, which every stage takes as `--init` and transformers loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use ndarray::Array2;
use serde::Serialize;

use super::aggregate::{aggregate, Aggregation, DenseFfn};
use super::usage::{measure_usage, RouterUsage, UsageData};
use crate::checkpoint::lock::OutputLock;
use crate::checkpoint::{
    filled_temp_sibling, replace_dir, write_llava_files, LoadedModel, SaveAssets,
};
use crate::models::llava::{BuildOptions, LlavaModel, Trainable, LM_PREFIX};
use crate::models::moe::Expert;
use crate::models::text_config::{TextConfig, TextFamily};
use mmkd_nn::WeightSource;

/// What `moe_to_dense.json` records next to the dense model.
pub const RECORD_FILE: &str = "moe_to_dense.json";

pub struct ToDenseRequest<'a> {
    pub teacher: String,
    pub data: UsageData<'a>,
    pub method: Aggregation,
    /// The dense width of the routed experts' part (svd; default top_k × the expert width).
    pub width: Option<usize>,
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub force: bool,
}

/// How a dense model was gathered.
#[derive(Debug, Serialize)]
pub struct DenseRecord {
    pub teacher: String,
    pub method: Aggregation,
    /// The dense model's `intermediate_size`.
    pub intermediate_size: usize,
    pub teacher_parameters: usize,
    pub dense_parameters: usize,
    pub usage: RouterUsage,
    pub out: String,
}

/// Runs the job; the dense checkpoint is written atomically with its record.
pub fn moe_to_dense(req: &ToDenseRequest<'_>) -> Result<DenseRecord> {
    if req.out.exists() && !req.force {
        bail!(
            "{} already exists: choose another --out or pass --force to replace it",
            req.out.display()
        );
    }
    if req.width.is_some() && req.method != Aggregation::Svd {
        bail!(
            "--width sets the SVD's dense width; {} keeps the experts' own widths",
            req.method.name()
        );
    }
    let _lock = OutputLock::acquire_beside(&req.out)?;
    let bundle = LoadedModel::load(&req.teacher, &BuildOptions::new(Trainable::NONE, 0))?;
    let text = &bundle.model.config.text_config;
    if !text.model_type.is_sparse() {
        bail!(
            "moe-to-dense gathers the experts of a Mixture-of-Experts model; {} is a dense {} \
             model",
            bundle.model_dir.display(),
            serde_json::to_string(&text.model_type)?
        );
    }
    let usage = measure_usage(&bundle, &req.data)?;
    let blocks = dense_blocks(&bundle.model, &usage, req.method, req.width)?;
    let width = blocks.iter().map(DenseFfn::width).max().unwrap_or(0);
    let dense_text = dense_text_config(text, width);
    let mut config = bundle.model.config.clone();
    config.text_config = dense_text;
    let tensors = dense_tensors(&bundle.model, blocks, width)?;
    // Every module must come from the gathered weights (BuildOptions requires all three).
    let options = BuildOptions::new(Trainable::NONE, 0);
    let source = WeightSource::from_tensors(bundle.model_dir.clone(), tensors);
    let dense = LlavaModel::build(&config, Arc::new(source), &options)
        .context("building the dense model from the gathered weights")?;
    let record = DenseRecord {
        teacher: req.teacher.clone(),
        method: req.method,
        intermediate_size: width,
        teacher_parameters: bundle.model.store.count(""),
        dense_parameters: dense.store.count(""),
        usage,
        out: req.out.display().to_string(),
    };
    let assets = SaveAssets {
        tokenizer_dir: Some(&bundle.dir),
        tokenizer: None,
        processor: Some(&bundle.processor),
        training: bundle.training.as_ref(),
    };
    let tmp = filled_temp_sibling(&req.out, |dir| {
        write_llava_files(&dense, dir, assets)?;
        let path = dir.join(RECORD_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&record)?)
            .with_context(|| format!("writing {}", path.display()))
    })?;
    replace_dir(&tmp, &req.out)?;
    Ok(record)
}

/// Every decoder layer's dense block: the gathered experts (and shared expert) of a sparse
/// layer, the MLP of a dense one.
fn dense_blocks(
    model: &LlavaModel,
    usage: &RouterUsage,
    method: Aggregation,
    width: Option<usize>,
) -> Result<Vec<DenseFfn>> {
    let sparse: HashMap<usize, _> = model.lm.sparse_blocks().into_iter().collect();
    (0..model.lm.num_layers())
        .map(|layer| {
            let Some(moe) = sparse.get(&layer) else {
                let prefix = format!("{LM_PREFIX}.layers.{layer}.mlp");
                let weight = |name: &str| {
                    host_matrix(&store_tensor(model, &format!("{prefix}.{name}.weight"))?)
                };
                return Ok(DenseFfn {
                    gate: weight("gate_proj")?,
                    up: weight("up_proj")?,
                    down: weight("down_proj")?,
                });
            };
            let stats = usage
                .layer(layer)
                .with_context(|| format!("no router usage measured for layer {layer}"))?;
            let experts = moe
                .experts()
                .iter()
                .map(expert_ffn)
                .collect::<Result<Vec<_>>>()?;
            let routed = aggregate(&experts, &stats.mean_weight(), method, moe.top_k(), width)
                .with_context(|| format!("gathering layer {layer}'s experts"))?;
            match moe.shared_expert() {
                Some(shared) => {
                    let shared = expert_ffn(shared)?.scaled(stats.mean_shared_gate());
                    DenseFfn::side_by_side(&[routed, shared])
                }
                None => Ok(routed),
            }
        })
        .collect()
}

fn store_tensor(model: &LlavaModel, name: &str) -> Result<Tensor> {
    model
        .store
        .get(name)
        .map(|p| p.tensor.clone())
        .with_context(|| format!("the model has no tensor {name}"))
}

fn expert_ffn(expert: &Expert) -> Result<DenseFfn> {
    let [gate, up, down] = expert.weights();
    Ok(DenseFfn {
        gate: host_matrix(gate)?,
        up: host_matrix(up)?,
        down: host_matrix(down)?,
    })
}

fn host_matrix(t: &Tensor) -> Result<Array2<f32>> {
    let (r, c) = t.dims2()?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Array2::from_shape_vec((r, c), data)?)
}

fn device_matrix(a: &Array2<f32>) -> Result<Tensor> {
    let (r, c) = a.dim();
    Ok(Tensor::from_vec(
        a.iter().copied().collect::<Vec<_>>(),
        (r, c),
        &Device::Cpu,
    )?)
}

/// The MoE text config as its dense family's, at `width`.
fn dense_text_config(moe: &TextConfig, width: usize) -> TextConfig {
    let mut dense = moe.clone();
    dense.model_type = match moe.model_type {
        TextFamily::Qwen2Moe => TextFamily::Qwen2,
        TextFamily::Mixtral => TextFamily::Llama,
        family => family,
    };
    dense.intermediate_size = width;
    dense.qkv_bias = None;
    dense.num_experts = None;
    dense.num_local_experts = None;
    dense.num_experts_per_tok = None;
    dense.moe_intermediate_size = None;
    dense.shared_expert_intermediate_size = None;
    dense.decoder_sparse_step = None;
    dense.mlp_only_layers = None;
    dense.norm_topk_prob = None;
    for key in [
        "router_aux_loss_coef",
        "output_router_logits",
        "router_jitter_noise",
    ] {
        dense.extra.remove(key);
    }
    dense
}

/// The teacher's tensors with every layer's feed-forward replaced by its dense block (padded
/// to `width`), and zero q/k/v biases where a Qwen2-MoE without them becomes a Qwen2.
fn dense_tensors(
    model: &LlavaModel,
    blocks: Vec<DenseFfn>,
    width: usize,
) -> Result<HashMap<String, Tensor>> {
    let layers = format!("{LM_PREFIX}.layers.");
    let mut tensors: HashMap<String, Tensor> = model
        .store
        .tensors()
        .into_iter()
        .filter(|(name, _)| {
            !(name.starts_with(&layers)
                && (name.contains(".mlp.") || name.contains(".block_sparse_moe.")))
        })
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let text = &model.config.text_config;
    for (layer, block) in blocks.into_iter().enumerate() {
        let block = block.padded(width)?;
        let prefix = format!("{layers}{layer}.mlp");
        tensors.insert(
            format!("{prefix}.gate_proj.weight"),
            device_matrix(&block.gate)?,
        );
        tensors.insert(
            format!("{prefix}.up_proj.weight"),
            device_matrix(&block.up)?,
        );
        tensors.insert(
            format!("{prefix}.down_proj.weight"),
            device_matrix(&block.down)?,
        );
        if text.model_type == TextFamily::Qwen2Moe && !text.qkv_bias() {
            for (proj, out) in [
                ("q_proj", text.num_attention_heads),
                ("k_proj", text.kv_heads()),
                ("v_proj", text.kv_heads()),
            ] {
                let zeros = Tensor::zeros(out * text.head_dim(), DType::F32, &Device::Cpu)?;
                tensors.insert(format!("{layers}{layer}.self_attn.{proj}.bias"), zeros);
            }
        }
    }
    Ok(tensors)
}

/// The one-line summary `mmkd moe-to-dense` prints.
pub fn describe(record: &DenseRecord, out: &Path) -> String {
    format!(
        "moe-to-dense ({}): {} → {} parameters, dense width {}, router usage from {} samples; \
         written to {}",
        record.method.name(),
        record.teacher_parameters,
        record.dense_parameters,
        record.intermediate_size,
        record.usage.samples,
        out.display()
    )
}
