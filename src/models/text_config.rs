//! The language model's `config.json` (the Qwen2 and Llama families and their sparse
//! Mixture-of-Experts kinds, Qwen2-MoE and Mixtral), read and written in the Hugging Face
//! layout. Unknown keys are kept so a saved config round-trips.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::moe::{ExpertLayout, MoeShape};

/// Decoder families with their architectural differences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextFamily {
    /// Qwen1.5 / Qwen2 / Qwen2.5: q/k/v projections carry a bias.
    Qwen2,
    /// Llama 2/3, TinyLlama, Vicuna, …: no attention bias unless `attention_bias` says so.
    Llama,
    /// Qwen1.5-MoE / Qwen2-MoE: Qwen2 attention (q/k/v bias unless `qkv_bias` is false), sparse
    /// blocks with a gated shared expert every `decoder_sparse_step` layers.
    #[serde(rename = "qwen2_moe")]
    Qwen2Moe,
    /// Mixtral: Llama attention without biases, a sparse block (`block_sparse_moe`) in every
    /// layer, top-k weights always renormalised.
    Mixtral,
}

impl TextFamily {
    pub fn is_sparse(self) -> bool {
        matches!(self, TextFamily::Qwen2Moe | TextFamily::Mixtral)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TextConfig {
    pub model_type: TextFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Older configs carry `rope_theta` at top level; transformers ≥ 5 writes `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: mmkd_nn::Activation,
    /// Llama's switch for q/k/v/o biases (Qwen2 always has q/k/v biases and no o bias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Qwen2-MoE's switch for the q/k/v biases (absent: on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    /// Qwen2-MoE's expert count (Mixtral calls it `num_local_experts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    /// Each routed expert's width (Qwen2-MoE; Mixtral's experts use `intermediate_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    32768
}
fn default_act() -> mmkd_nn::Activation {
    mmkd_nn::Activation::Silu
}

impl TextConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        if let Some(theta) = self.rope_theta {
            return theta;
        }
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0)
    }

    /// Rope scaling other than the default is not implemented; refuse it rather than silently
    /// computing different positions.
    pub fn check_supported(&self) -> anyhow::Result<()> {
        let scaling = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type"))
            .and_then(Value::as_str)
            .or_else(|| {
                self.extra
                    .get("rope_scaling")
                    .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
                    .and_then(Value::as_str)
            });
        match scaling {
            None | Some("default") => {}
            Some(other) => anyhow::bail!("rope scaling type `{other}` is not supported"),
        }
        // Bounds far beyond any released model: a corrupt config must not make the builder's
        // arithmetic overflow or its allocations explode.
        for (key, value, max) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_key_value_heads", self.kv_heads(), 1024),
            ("head_dim", self.head_dim.unwrap_or(0), 1 << 12),
        ] {
            anyhow::ensure!(
                value <= max,
                "text config: `{key}` = {value} is beyond any language model (at most {max})"
            );
        }
        if let Some(moe) = self.moe_shape() {
            for (key, value, max) in [
                ("number of experts", moe.experts, 1 << 12),
                ("expert width", moe.expert_intermediate, 1 << 18),
                (
                    "shared_expert_intermediate_size",
                    moe.shared_intermediate,
                    1 << 18,
                ),
            ] {
                anyhow::ensure!(
                    value <= max,
                    "text config: {key} = {value} is beyond any language model (at most {max})"
                );
            }
            anyhow::ensure!(
                moe.top_k >= 1 && moe.top_k <= moe.experts,
                "text config: num_experts_per_tok = {} with {} experts: a router chooses between \
                 1 and num_experts",
                moe.top_k,
                moe.experts
            );
        }
        anyhow::ensure!(
            self.num_attention_heads > 0 && self.kv_heads() > 0 && self.hidden_size > 0,
            "text config: hidden_size, num_attention_heads and num_key_value_heads must be positive"
        );
        anyhow::ensure!(
            self.hidden_size.is_multiple_of(self.num_attention_heads) || self.head_dim.is_some(),
            "hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        anyhow::ensure!(
            self.num_attention_heads.is_multiple_of(self.kv_heads()),
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            self.num_attention_heads,
            self.kv_heads()
        );
        Ok(())
    }

    pub fn qkv_bias(&self) -> bool {
        match self.model_type {
            TextFamily::Qwen2 => true,
            TextFamily::Qwen2Moe => self.qkv_bias.unwrap_or(true),
            TextFamily::Llama => self.attention_bias.unwrap_or(false),
            TextFamily::Mixtral => false,
        }
    }

    pub fn o_bias(&self) -> bool {
        match self.model_type {
            TextFamily::Qwen2 | TextFamily::Qwen2Moe | TextFamily::Mixtral => false,
            TextFamily::Llama => self.attention_bias.unwrap_or(false),
        }
    }

    /// The sparse block's shape, for a Mixture-of-Experts family (defaults as transformers').
    pub fn moe_shape(&self) -> Option<MoeShape> {
        let (experts, top_k, expert_intermediate, shared, norm, layout) = match self.model_type {
            TextFamily::Qwen2 | TextFamily::Llama => return None,
            TextFamily::Qwen2Moe => (
                self.num_experts.unwrap_or(60),
                self.num_experts_per_tok.unwrap_or(4),
                self.moe_intermediate_size.unwrap_or(1408),
                self.shared_expert_intermediate_size.unwrap_or(5632),
                self.norm_topk_prob.unwrap_or(false),
                ExpertLayout::Qwen2Moe,
            ),
            TextFamily::Mixtral => (
                self.num_local_experts.unwrap_or(8),
                self.num_experts_per_tok.unwrap_or(2),
                self.intermediate_size,
                0,
                true,
                ExpertLayout::Mixtral,
            ),
        };
        Some(MoeShape {
            hidden: self.hidden_size,
            expert_intermediate,
            shared_intermediate: shared,
            experts,
            top_k,
            norm_topk_prob: norm,
            act: self.hidden_act,
            layout,
        })
    }

    /// The feed-forward width a token goes through, averaged over the layers: the dense MLP's,
    /// or a sparse block's every expert and shared expert (mmkd runs all experts on every
    /// token; see `models::moe`). For memory estimates.
    pub fn mean_ffn_width(&self) -> usize {
        let layers = self.num_hidden_layers.max(1);
        let total: usize = (0..layers)
            .map(
                |layer| match self.moe_shape().filter(|_| self.is_sparse_layer(layer)) {
                    Some(moe) => moe.experts * moe.expert_intermediate + moe.shared_intermediate,
                    None => self.intermediate_size,
                },
            )
            .sum();
        total / layers
    }

    /// Whether decoder layer `layer` has a sparse block (Qwen2-MoE: not in `mlp_only_layers`
    /// and every `decoder_sparse_step`-th layer; Mixtral: every layer).
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        match self.model_type {
            TextFamily::Qwen2 | TextFamily::Llama => false,
            TextFamily::Mixtral => true,
            TextFamily::Qwen2Moe => {
                let step = self.decoder_sparse_step.unwrap_or(1).max(1);
                let dense = self.mlp_only_layers.as_deref().unwrap_or(&[]);
                self.moe_shape().is_some_and(|s| s.experts > 0)
                    && !dense.contains(&layer)
                    && (layer + 1).is_multiple_of(step)
            }
        }
    }

    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }
}
