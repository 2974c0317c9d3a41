//! Building the model a stage trains (or the frozen teacher it distils from): from a previous
//! checkpoint (`--init`), by composing vision and LLM checkpoints, or fresh from the preset's
//! architecture (the synthetic experiments).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use mmkd_nn::WeightSource;
use mmkd_vision::ImageProcessor;
use tokenizers::Tokenizer;

use crate::checkpoint::bundle::{load_processor, load_tokenizer};
use crate::checkpoint::compose::{compose, ComposeSpec};
use crate::checkpoint::{hub, read_config, read_weights};
use crate::config::ModelSpec;
use crate::models::llava::{BuildOptions, LlavaModel, Trainable, LM_PREFIX, VISION_PREFIX};
use crate::models::llava_config::LlavaConfig;
use crate::models::projector::ProjectorKind;

/// A model with the files it reads inputs with.
pub struct PreparedModel {
    pub model: LlavaModel,
    /// Directory holding `tokenizer.json` (copied into every checkpoint).
    pub tokenizer_dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub processor: ImageProcessor,
    /// Where the weights came from, for the run summary.
    pub origin: String,
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("unknown dtype `{other}` (f32, bf16, f16)"),
    })
}

/// Loads a LLaVA checkpoint (directory or hub id) with every module required.
pub fn from_checkpoint(
    spec: &str,
    trainable: Trainable,
    frozen_dtype: DType,
) -> Result<PreparedModel> {
    let dir = hub::resolve_model(spec)?;
    let config = read_config(&dir)?;
    let weights = read_weights(&dir, &candle_core::Device::Cpu)?;
    let mut options = BuildOptions::new(trainable, 0);
    options.frozen_dtype = frozen_dtype;
    let model = LlavaModel::build(&config, Arc::new(weights), &options)
        .with_context(|| format!("loading {}", dir.display()))?;
    Ok(PreparedModel {
        model,
        tokenizer: load_tokenizer(&dir)?,
        processor: load_processor(&dir)?,
        tokenizer_dir: dir.clone(),
        origin: dir.display().to_string(),
    })
}

/// Builds a new model from the preset's model spec: composed from checkpoints, or fresh.
pub fn from_spec(
    spec: &ModelSpec,
    tokenizer_file: Option<&Path>,
    trainable: Trainable,
    frozen_dtype: DType,
) -> Result<PreparedModel> {
    let projector = ProjectorKind::parse(&spec.projector)?;
    let feature_layer = serde_json::to_value(&spec.feature_layer)?;
    let mut options = BuildOptions::new(trainable, spec.seed);
    options.frozen_dtype = frozen_dtype;
    match (&spec.vision, &spec.llm, &spec.vision_config, &spec.text_config) {
        (Some(vision), Some(llm), None, None) => {
            let composed = compose(
                &ComposeSpec {
                    vision: vision.clone(),
                    llm: llm.clone(),
                    projector,
                    feature_layer,
                    select_strategy: spec.select_strategy.clone(),
                    image_token: spec.image_token.clone(),
                },
                &options.device,
            )?;
            options.require = vec![VISION_PREFIX, LM_PREFIX];
            let model = LlavaModel::build(&composed.config, Arc::new(composed.weights), &options)?;
            Ok(PreparedModel {
                model,
                tokenizer: load_tokenizer(&composed.llm_dir)?,
                tokenizer_dir: composed.llm_dir.clone(),
                processor: composed.processor,
                origin: format!("{vision} + {llm} + fresh {}", projector.name()),
            })
        }
        (None, None, Some(vision_cfg), Some(text_cfg)) => {
            let tokenizer_file = tokenizer_file.context(
                "a freshly built model needs a tokenizer: pass --tokenizer FILE or set data.tokenizer",
            )?;
            let tokenizer = mmkd_datasets::load_tokenizer(tokenizer_file)?;
            let image_token_id = tokenizer.token_to_id(&spec.image_token).with_context(|| {
                format!("tokenizer {} has no `{}` token", tokenizer_file.display(), spec.image_token)
            })?;
            let mut text = serde_json::to_value(text_cfg)?;
            if text.get("vocab_size").is_none() {
                text["vocab_size"] = tokenizer.get_vocab_size(true).into();
            }
            let vision = serde_json::to_value(vision_cfg)?;
            let config_json = serde_json::json!({
                "model_type": "llava",
                "image_token_index": image_token_id,
                "projector_hidden_act": "gelu",
                "vision_feature_layer": feature_layer,
                "vision_feature_select_strategy": spec.select_strategy,
                "mm_projector_type": projector.name(),
                "tie_word_embeddings": text.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
                "text_config": text,
                "vision_config": vision,
            });
            let mut config = LlavaConfig::from_json_str(&config_json.to_string())
                .context("the preset's model architecture")?;
            let tokens = config.feature_selection()?.tokens_per_image(&config.vision_config);
            config.extra.insert("image_seq_length".into(), tokens.into());
            options.require = vec![];
            let model = LlavaModel::build(&config, Arc::new(WeightSource::empty()), &options)?;
            let processor = ImageProcessor::for_tower(&config.vision_config);
            let tokenizer_dir = tokenizer_file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            Ok(PreparedModel {
                model,
                tokenizer,
                tokenizer_dir,
                processor,
                origin: format!("fresh (seed {})", spec.seed),
            })
        }
        _ => bail!(
            "the preset's model needs either `vision` and `llm` checkpoints, or `vision_config` and \
             `text_config` for a fresh model (or pass --init DIR)"
        ),
    }
}
