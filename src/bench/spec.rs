//! The benchmark spec (`shared/bench/spec.json`): the shapes of one LLaVA-KD distilled
//! fine-tuning step, and the mmkd configs it stands for.
//!
//! The configs mirror the PyTorch peer (`torch_dft_step.py`): a SigLIP vision tower
//! (transformers' defaults apart from the spec's sizes), an `mlp2x_gelu` projector with exact
//! GELU, feature layer −2 with the `full` strategy, Qwen2 decoders with untied heads, and the
//! image token at id `vocab − 1`.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::models::llava_config::LlavaConfig;

/// The vision tower shared by teacher and student.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSpec {
    pub image_size: usize,
    pub patch: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
}

/// One language model (teacher or student).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl LmSpec {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// One distillation step's shapes: every sample is `prefix_tokens` text tokens, one image
/// block, `prompt_tokens` and `response_tokens`; labels cover the response only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSpec {
    pub vocab: usize,
    pub batch: usize,
    pub prefix_tokens: usize,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
    pub vision: VisionSpec,
    pub student: LmSpec,
    pub teacher: LmSpec,
}

/// The vision hidden state LLaVA feeds the projector (transformers' default −2).
pub const FEATURE_LAYER: i64 = -2;
/// Largest position a sequence may reach (the peer's `max_position_embeddings`).
const MAX_POSITIONS: usize = 512;

impl BenchSpec {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the benchmark spec {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid benchmark spec {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let spec: BenchSpec = serde_json::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every size the step relies on, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab", self.vocab),
            ("batch", self.batch),
            ("response_tokens", self.response_tokens),
            ("vision.image_size", self.vision.image_size),
            ("vision.patch", self.vision.patch),
            ("vision.hidden", self.vision.hidden),
            ("vision.intermediate", self.vision.intermediate),
            ("vision.layers", self.vision.layers),
            ("vision.heads", self.vision.heads),
        ];
        for (key, value) in positive {
            ensure!(value > 0, "`{key}` must be positive");
        }
        ensure!(
            self.vocab >= 3,
            "`vocab` must be at least 3 (two text ids and the image token), got {}",
            self.vocab
        );
        ensure!(
            self.vision.patch <= self.vision.image_size,
            "`vision.patch` ({}) is larger than `vision.image_size` ({})",
            self.vision.patch,
            self.vision.image_size
        );
        ensure!(
            self.vision.hidden.is_multiple_of(self.vision.heads),
            "`vision.hidden` ({}) is not divisible by `vision.heads` ({})",
            self.vision.hidden,
            self.vision.heads
        );
        ensure!(
            self.vision.layers >= 2,
            "`vision.layers` must be at least 2: image features come from the second-to-last layer"
        );
        for (name, lm) in [("student", &self.student), ("teacher", &self.teacher)] {
            for (key, value) in [
                ("hidden", lm.hidden),
                ("intermediate", lm.intermediate),
                ("layers", lm.layers),
                ("heads", lm.heads),
                ("kv_heads", lm.kv_heads),
            ] {
                ensure!(value > 0, "`{name}.{key}` must be positive");
            }
            ensure!(
                lm.hidden.is_multiple_of(lm.heads) && lm.head_dim().is_multiple_of(2),
                "`{name}.hidden` ({}) must split into `{name}.heads` ({}) heads of even width",
                lm.hidden,
                lm.heads
            );
            ensure!(
                lm.heads.is_multiple_of(lm.kv_heads),
                "`{name}.heads` ({}) is not a multiple of `{name}.kv_heads` ({})",
                lm.heads,
                lm.kv_heads
            );
        }
        ensure!(
            self.seq_len() <= MAX_POSITIONS,
            "a sample is {} tokens long; at most {MAX_POSITIONS} are supported",
            self.seq_len()
        );
        Ok(())
    }

    /// Image tokens per sample: `(image_size / patch)²`.
    pub fn image_tokens(&self) -> usize {
        let grid = self.vision.image_size / self.vision.patch;
        grid * grid
    }

    /// Tokens per sample.
    pub fn seq_len(&self) -> usize {
        self.prefix_tokens + self.image_tokens() + self.prompt_tokens + self.response_tokens
    }

    /// The image token id (the last id of the vocabulary, as in the peer).
    pub fn image_token_id(&self) -> u32 {
        (self.vocab - 1) as u32
    }

    /// Vision encoder layers the feature selection needs (layer −2 of `layers + 1` states).
    pub fn vision_layers_needed(&self) -> usize {
        (self.vision.layers as i64 + 1 + FEATURE_LAYER) as usize
    }

    /// The LLaVA config of the teacher or student language model `lm`.
    pub fn llava_config(&self, lm: &LmSpec) -> Result<LlavaConfig> {
        let v = &self.vision;
        let config = json!({
            "model_type": "llava",
            "image_token_index": self.image_token_id(),
            "projector_hidden_act": "gelu",
            "vision_feature_layer": FEATURE_LAYER,
            "vision_feature_select_strategy": "full",
            "multimodal_projector_bias": true,
            "mm_projector_type": "mlp2x_gelu",
            "tie_word_embeddings": false,
            "text_config": {
                "model_type": "qwen2",
                "vocab_size": self.vocab,
                "hidden_size": lm.hidden,
                "intermediate_size": lm.intermediate,
                "num_hidden_layers": lm.layers,
                "num_attention_heads": lm.heads,
                "num_key_value_heads": lm.kv_heads,
                "max_position_embeddings": MAX_POSITIONS,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-6,
                "hidden_act": "silu",
                "tie_word_embeddings": false,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden,
                "intermediate_size": v.intermediate,
                "num_hidden_layers": v.layers,
                "num_attention_heads": v.heads,
                "image_size": v.image_size,
                "patch_size": v.patch,
            },
        });
        LlavaConfig::from_json_str(&config.to_string()).context("building the LLaVA config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED_SPEC: &str = r#"{
      "vocab": 2048, "batch": 8, "prefix_tokens": 8, "prompt_tokens": 16, "response_tokens": 32,
      "vision": {"image_size": 64, "patch": 8, "hidden": 192, "intermediate": 768, "layers": 4, "heads": 3},
      "student": {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 4, "kv_heads": 2},
      "teacher": {"hidden": 512, "intermediate": 2048, "layers": 6, "heads": 8, "kv_heads": 4}
    }"#;

    #[test]
    fn the_shared_spec_gives_the_peer_shapes() {
        let spec = BenchSpec::from_json_str(SHARED_SPEC).unwrap();
        assert_eq!(spec.image_tokens(), 64);
        assert_eq!(spec.seq_len(), 120);
        assert_eq!(spec.vision_layers_needed(), 3);
        let cfg = spec.llava_config(&spec.teacher).unwrap();
        assert_eq!(cfg.image_token_id, 2047);
        assert_eq!(cfg.text_config.kv_heads(), 4);
        assert_eq!(cfg.vision_config.num_patches(), 64);
        let sel = cfg.feature_selection().unwrap();
        assert_eq!(sel.tokens_per_image(&cfg.vision_config), 64);
    }

    #[test]
    fn bad_specs_name_the_key() {
        let bad = SHARED_SPEC.replace("\"kv_heads\": 2", "\"kv_heads\": 3");
        let err = BenchSpec::from_json_str(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "`student.heads` (4) is not a multiple of `student.kv_heads` (3)"
        );
        let bad = SHARED_SPEC.replace("\"batch\": 8", "\"batch\": 0");
        let err = BenchSpec::from_json_str(&bad).unwrap_err().to_string();
        assert_eq!(err, "`batch` must be positive");
        let bad = SHARED_SPEC.replace("\"vocab\"", "\"vocabulary\"");
        let err = BenchSpec::from_json_str(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `vocabulary`"), "{err}");
    }
}
