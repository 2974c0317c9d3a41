//! Building the model a stage trains: from a previous checkpoint (`--init`), by composing
//! vision and LLM checkpoints, or fresh from the preset's architecture (the synthetic
//! experiments).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use mmkd_nn::WeightSource;
use mmkd_vision::{load_vision_weights, ImageProcessor, VisionConfig};

use crate::checkpoint::bundle::load_tokenizer;
use crate::checkpoint::compose::{compose, saved_processor, ComposeSpec};
use crate::checkpoint::{hub, layout, read_weights, LoadedModel};
use crate::config::ModelSpec;
use crate::models::llava::{BuildOptions, LlavaModel, Trainable, LM_PREFIX, VISION_PREFIX};
use crate::models::llava_config::LlavaConfig;
use crate::models::projector::ProjectorKind;

/// Loads a LLaVA checkpoint (directory or hub id) with every module required, its frozen
/// modules in `frozen_dtype`, on `device`.
pub fn from_checkpoint(
    spec: &str,
    trainable: Trainable,
    frozen_dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    from_checkpoint_with(spec, trainable, frozen_dtype, device, None)
}

/// [`from_checkpoint`] with LoRA adapters where `lora` says (loaded from the checkpoint when
/// it has them, new otherwise).
pub fn from_checkpoint_with(
    spec: &str,
    trainable: Trainable,
    frozen_dtype: DType,
    device: &Device,
    lora: Option<Arc<mmkd_nn::LoraPlan>>,
) -> Result<LoadedModel> {
    let mut options = BuildOptions::new(trainable, 0);
    options.frozen_dtype = frozen_dtype;
    options.device = device.clone();
    options.lora = lora;
    LoadedModel::load(spec, &options)
}

/// The image processor of a fresh model: the tower checkpoint's (`saved`) or the tower's
/// defaults, with the spec's per-channel statistics when it sets them.
pub fn fresh_processor(
    spec: &ModelSpec,
    config: &VisionConfig,
    saved: Option<ImageProcessor>,
) -> Result<ImageProcessor> {
    let mut processor = saved.unwrap_or_else(|| ImageProcessor::for_tower(config));
    if let Some(mean) = spec.image_mean {
        processor.image_mean = mean;
    }
    if let Some(std) = spec.image_std {
        anyhow::ensure!(
            std.iter().all(|s| *s > 0.0),
            "image_std must be positive in every channel, found {std:?}"
        );
        processor.image_std = std;
    }
    Ok(processor)
}

/// Builds a new model from the preset's model spec: composed from checkpoints, or fresh.
pub fn from_spec(
    spec: &ModelSpec,
    tokenizer_file: Option<&Path>,
    trainable: Trainable,
    frozen_dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let projector = ProjectorKind::parse(&spec.projector)?;
    let feature_layer = serde_json::to_value(&spec.feature_layer)?;
    let mut options = BuildOptions::new(trainable, spec.seed);
    options.frozen_dtype = frozen_dtype;
    options.device = device.clone();
    match (
        &spec.vision,
        &spec.llm,
        &spec.vision_config,
        &spec.text_config,
    ) {
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
            Ok(LoadedModel {
                training: None,
                model,
                tokenizer: load_tokenizer(&composed.llm_dir)?,
                dir: composed.llm_dir.clone(),
                model_dir: composed.llm_dir.clone(),
                base_dir: None,
                processor: composed.processor,
                origin: format!("{vision} + {llm} + fresh {}", projector.name()),
            })
        }
        (None, None, Some(vision_cfg), Some(text_cfg)) => {
            let vision = FreshTower {
                config: serde_json::to_value(vision_cfg)?,
                weights: WeightSource::empty(),
                processor: None,
                origin: "fresh".into(),
            };
            fresh_llm(spec, vision, text_cfg, tokenizer_file, options)
        }
        (Some(vision), None, expected, Some(text_cfg)) => {
            let tower = tower_from_checkpoint(vision, device)?;
            if let Some(expected) = expected {
                check_tower_config(&tower, expected)?;
            }
            fresh_llm(spec, tower, text_cfg, tokenizer_file, options)
        }
        _ => bail!(
            "the preset's model needs either `vision` and `llm` checkpoints, `vision_config` and \
             `text_config` for a fresh model, or a `vision` checkpoint with a fresh `text_config` \
             (or pass --init DIR)"
        ),
    }
}

/// The vision side of a model whose LLM is fresh: a new tower, or one taken from a checkpoint.
struct FreshTower {
    /// `vision_config` of the LLaVA config.
    config: serde_json::Value,
    /// Tower weights under the LLaVA names (empty: initialised from the seed).
    weights: WeightSource,
    /// The checkpoint's image processor; `None`: the tower's default.
    processor: Option<ImageProcessor>,
    origin: String,
}

/// The tower of a checkpoint: a SigLIP/CLIP vision checkpoint or a LLaVA checkpoint (its
/// `vision_tower`), so students can share a teacher's trained tower.
fn tower_from_checkpoint(spec: &str, device: &Device) -> Result<FreshTower> {
    let dir = hub::resolve_model(spec)?;
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    let is_llava = value.get("model_type").and_then(|t| t.as_str()) == Some("llava");
    let (config, weights) = if is_llava {
        let config = LlavaConfig::from_json_str(&text)
            .with_context(|| format!("invalid LLaVA config {}", config_path.display()))?;
        let mut weights = WeightSource::empty();
        weights.merge_renamed(read_weights(&dir, device)?, |name| {
            name.starts_with(VISION_PREFIX).then(|| name.to_string())
        });
        (config.vision_config, weights)
    } else {
        let config = VisionConfig::from_json_value(&value)
            .with_context(|| format!("{}: not a vision tower config", config_path.display()))?;
        let mut weights = load_vision_weights(&dir, device)?;
        weights.rename(layout::vision_key);
        (config, weights)
    };
    anyhow::ensure!(
        !weights.is_empty(),
        "{}: no vision tower weights found",
        dir.display()
    );
    Ok(FreshTower {
        config: config.to_json(),
        weights,
        processor: saved_processor(&dir)?,
        origin: format!("tower of {}", dir.display()),
    })
}

/// A preset may name both a tower checkpoint and the `vision_config` it expects (the demo's
/// students take the teacher's trained tower): every key given must match the checkpoint's.
fn check_tower_config(tower: &FreshTower, expected: &toml::Table) -> Result<()> {
    for (key, value) in expected {
        let want = serde_json::to_value(value)?;
        let found = tower.config.get(key);
        let same = match (found, &want) {
            (Some(f), w) if f == w => true,
            // TOML integers vs JSON floats and the like.
            (Some(f), w) => f.as_f64().is_some() && f.as_f64() == w.as_f64(),
            (None, _) => false,
        };
        anyhow::ensure!(
            same,
            "the {} has `{key}` = {}, but the preset's vision_config says {want}",
            tower.origin,
            found.map_or("nothing".to_string(), |f| f.to_string())
        );
    }
    Ok(())
}

/// A model with a fresh LLM and projector on `tower`, for experiments from scratch.
fn fresh_llm(
    spec: &ModelSpec,
    tower: FreshTower,
    text_cfg: &toml::Table,
    tokenizer_file: Option<&Path>,
    mut options: BuildOptions,
) -> Result<LoadedModel> {
    let projector = ProjectorKind::parse(&spec.projector)?;
    let tokenizer_file = tokenizer_file.context(
        "a freshly built model needs a tokenizer: pass --tokenizer FILE or set data.tokenizer",
    )?;
    let tokenizer = mmkd_datasets::load_tokenizer(tokenizer_file)?;
    let image_token_id = tokenizer.token_to_id(&spec.image_token).with_context(|| {
        format!(
            "tokenizer {} has no `{}` token",
            tokenizer_file.display(),
            spec.image_token
        )
    })?;
    let mut text = serde_json::to_value(text_cfg)?;
    if text.get("vocab_size").is_none() {
        text["vocab_size"] = tokenizer.get_vocab_size(true).into();
    }
    let config_json = serde_json::json!({
        "model_type": "llava",
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": serde_json::to_value(&spec.feature_layer)?,
        "vision_feature_select_strategy": spec.select_strategy,
        "mm_projector_type": projector.name(),
        "tie_word_embeddings": text.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
        "text_config": text,
        "vision_config": tower.config,
    });
    let mut config = LlavaConfig::from_json_str(&config_json.to_string())
        .context("the preset's model architecture")?;
    let tokens = config
        .feature_selection()?
        .tokens_per_image(&config.vision_config);
    config
        .extra
        .insert("image_seq_length".into(), tokens.into());
    options.require = if tower.weights.is_empty() {
        vec![]
    } else {
        vec![VISION_PREFIX]
    };
    let model = LlavaModel::build(&config, Arc::new(tower.weights), &options)?;
    let processor = fresh_processor(spec, &config.vision_config, tower.processor)?;
    let dir = tokenizer_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(LoadedModel {
        training: None,
        model,
        tokenizer,
        model_dir: dir.clone(),
        base_dir: None,
        dir,
        processor,
        origin: format!("{} + fresh LLM (seed {})", tower.origin, spec.seed),
    })
}
