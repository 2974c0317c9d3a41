//! The LLaVA `config.json` (`LlavaConfig` in transformers): vision and text configs plus the
//! projector, feature-selection and image-token settings. Unknown keys round-trip.

use std::path::Path;

use anyhow::{Context, Result};
use mmkd_nn::Activation;
use mmkd_vision::config::VisionConfig;
use mmkd_vision::select::FeatureSelect;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::projector::ProjectorKind;
use super::text_config::TextConfig;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlavaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(alias = "image_token_id", rename = "image_token_index")]
    pub image_token_id: u32,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: Activation,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: Value,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    /// LLaVA's `mm_projector_type`; transformers' class always builds `mlp2x_gelu`.
    #[serde(default = "default_projector", rename = "mm_projector_type")]
    pub projector_type: ProjectorKind,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub text_config: TextConfig,
    #[serde(with = "vision_json")]
    pub vision_config: VisionConfig,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_model_type() -> String {
    "llava".into()
}
fn default_projector_act() -> Activation {
    Activation::Gelu
}
fn default_feature_layer() -> Value {
    Value::from(-2)
}
fn default_strategy() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_projector() -> ProjectorKind {
    ProjectorKind::Mlp { depth: 2 }
}

mod vision_json {
    use super::*;

    pub fn serialize<S: serde::Serializer>(cfg: &VisionConfig, s: S) -> Result<S::Ok, S::Error> {
        cfg.to_json().serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<VisionConfig, D::Error> {
        let value = Value::deserialize(d)?;
        VisionConfig::from_json_value(&value)
            .map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl LlavaConfig {
    /// Reads `config.json`, with errors naming the file and the offending key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid LLaVA config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        anyhow::ensure!(
            model_type == "llava",
            "unsupported architecture: model_type is `{model_type}`, mmkd loads `llava` checkpoints \
             (vision tower + projector + Qwen2/Llama decoder)"
        );
        let mut config: LlavaConfig = serde_json::from_value(value)?;
        config.tie_word_embeddings |= config.text_config.tie_word_embeddings;
        config.text_config.tie_word_embeddings = config.tie_word_embeddings;
        config.feature_selection()?;
        config.text_config.check_supported()?;
        Ok(config)
    }

    pub fn to_json_string(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// How image features are taken from the tower's hidden states.
    pub fn feature_selection(&self) -> Result<FeatureSelect> {
        FeatureSelect::from_llava_config(&serde_json::json!({
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
        }))
    }
}
