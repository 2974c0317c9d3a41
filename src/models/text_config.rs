//! The language model's `config.json` (Qwen2 family and Llama family), read and written in the
//! Hugging Face layout. Unknown keys are kept so a saved config round-trips.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Decoder families with their architectural differences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextFamily {
    /// Qwen1.5 / Qwen2 / Qwen2.5: q/k/v projections carry a bias.
    Qwen2,
    /// Llama 2/3, TinyLlama, Vicuna, …: no attention bias unless `attention_bias` says so.
    Llama,
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
            TextFamily::Llama => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn o_bias(&self) -> bool {
        match self.model_type {
            TextFamily::Qwen2 => false,
            TextFamily::Llama => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }
}
