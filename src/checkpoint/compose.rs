//! Composing a new LLaVA model from a vision checkpoint and a language-model checkpoint plus a
//! fresh projector: how stage 1 (PT / DPT) starts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use mmkd_nn::WeightSource;
use mmkd_vision::{load_vision_weights, ImageProcessor, VisionConfig, VisionKind};
use serde_json::Value;

use super::bundle::{load_processor, load_tokenizer};
use super::hub::resolve_model;
use super::layout;
use crate::models::llava_config::LlavaConfig;
use crate::models::projector::ProjectorKind;
use crate::models::text_config::TextConfig;

/// What to compose.
#[derive(Clone, Debug)]
pub struct ComposeSpec {
    /// Vision checkpoint (SigLIP/CLIP vision model or full SigLIP/CLIP model): directory or hub id.
    pub vision: String,
    /// Causal LM checkpoint (Qwen2/Llama family): directory or hub id.
    pub llm: String,
    pub projector: ProjectorKind,
    /// `vision_feature_layer` (an index or a list of indices).
    pub feature_layer: Value,
    /// `vision_feature_select_strategy`: `default` (drop the first token) or `full`.
    pub select_strategy: String,
    /// The text of the image placeholder token; it must be in the LLM's tokenizer.
    pub image_token: String,
}

/// A composed model ready to build: its config, the weights of tower and LLM (the projector is
/// absent, hence freshly initialised), and where its tokenizer and image processor come from.
pub struct Composed {
    pub config: LlavaConfig,
    pub weights: WeightSource,
    pub llm_dir: PathBuf,
    pub vision_dir: PathBuf,
    pub processor: ImageProcessor,
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The image processor a checkpoint directory saved, if it saved one (vision checkpoints often
/// do not; their tower's defaults apply then).
pub fn saved_processor(dir: &Path) -> Result<Option<ImageProcessor>> {
    let saved = ["preprocessor_config.json", "processor_config.json"]
        .iter()
        .any(|f| dir.join(f).exists());
    saved.then(|| load_processor(dir)).transpose()
}

pub fn compose(spec: &ComposeSpec, device: &Device) -> Result<Composed> {
    let vision_dir = resolve_model(&spec.vision)?;
    let llm_dir = resolve_model(&spec.llm)?;
    let vision_config = VisionConfig::from_file(&vision_dir.join("config.json"))?;
    let text_value = read_json(&llm_dir.join("config.json"))?;
    let text_config: TextConfig =
        serde_json::from_value(text_value.clone()).with_context(|| {
            format!(
                "{}: not a supported causal LM config (Qwen2 or Llama family)",
                llm_dir.join("config.json").display()
            )
        })?;
    let tokenizer = load_tokenizer(&llm_dir)?;
    let image_token_id = tokenizer.token_to_id(&spec.image_token).with_context(|| {
        format!(
            "the tokenizer in {} has no `{}` token; add it as a special token first (e.g. with `mmkd data tokenizer`)",
            llm_dir.display(),
            spec.image_token
        )
    })?;

    let mut weights = load_vision_weights(&vision_dir, device)?;
    weights.rename(layout::vision_key);
    let mut llm_weights = WeightSource::from_dir(&llm_dir, device)?;
    llm_weights.rename(layout::llm_key);
    weights.merge_renamed(llm_weights, |n| Some(n.to_string()));

    let processor = match saved_processor(&vision_dir)? {
        Some(p) => p,
        None => ImageProcessor::for_tower(&vision_config),
    };
    let mut vision_json = vision_config.to_json();
    if vision_config.kind == VisionKind::Siglip {
        vision_json["vision_use_head"] = Value::Bool(false);
    }
    let config_value = serde_json::json!({
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": spec.feature_layer,
        "vision_feature_select_strategy": spec.select_strategy,
        "multimodal_projector_bias": true,
        "mm_projector_type": spec.projector.name(),
        "tie_word_embeddings": text_config.tie_word_embeddings,
        "text_config": text_value,
        "vision_config": vision_json,
    });
    let mut config = LlavaConfig::from_json_str(&config_value.to_string())?;
    let tokens = config
        .feature_selection()?
        .tokens_per_image(&config.vision_config);
    config
        .extra
        .insert("image_seq_length".into(), Value::from(tokens));
    Ok(Composed {
        config,
        weights,
        llm_dir,
        vision_dir,
        processor,
    })
}
