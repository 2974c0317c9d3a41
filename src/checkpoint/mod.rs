//! Hugging Face LLaVA checkpoint directories: load (current or legacy key layout, single or
//! sharded safetensors), compose from separate vision and LLM checkpoints, and save in the layout
//! `transformers.LlavaForConditionalGeneration.from_pretrained` loads.

pub mod adapter;
pub mod bundle;
pub mod compose;
pub mod hub;
pub mod layout;
pub mod lock;
pub mod storage;
pub mod training;

pub use bundle::LoadedModel;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use mmkd_nn::weights::{save_safetensors, SAFETENSORS_SINGLE};
use mmkd_nn::WeightSource;

use crate::models::llava::{BuildOptions, LlavaModel};
use crate::models::llava_config::LlavaConfig;

/// Tokenizer files copied into a saved checkpoint.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// What a saved checkpoint needs besides config and weights.
#[derive(Clone, Copy, Default)]
pub struct SaveAssets<'a> {
    /// Directory whose tokenizer files are copied.
    pub tokenizer_dir: Option<&'a Path>,
    /// A tokenizer written as `tokenizer.json` (over any copied one).
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
    /// Image processor written as `preprocessor_config.json` and `processor_config.json`.
    pub processor: Option<&'a mmkd_vision::ImageProcessor>,
    /// What the model was trained with, written as `mmkd_training.json`.
    pub training: Option<&'a training::TrainingRecord>,
}

/// Reads `DIR/config.json` as a LLaVA config.
pub fn read_config(dir: &Path) -> Result<LlavaConfig> {
    let path = dir.join("config.json");
    anyhow::ensure!(path.exists(), "{} does not exist", path.display());
    LlavaConfig::from_file(&path)
}

/// Loads the weights of a LLaVA checkpoint directory, renamed to the current layout.
pub fn read_weights(dir: &Path, device: &candle_core::Device) -> Result<WeightSource> {
    let mut source = WeightSource::from_dir(dir, device)?;
    source.rename(layout::llava_key);
    Ok(source)
}

/// Loads a LLaVA model from a local directory or hub id.
pub fn load_llava(model: &str, options: &BuildOptions) -> Result<(LlavaModel, PathBuf)> {
    let (llava, dirs) = load_llava_from(model, options)?;
    Ok((llava, dirs.dir))
}

/// Where a loaded model's files are: its directory, and for an adapter also its base's.
#[derive(Clone, Debug)]
pub struct ModelDirs {
    pub dir: PathBuf,
    pub base: Option<PathBuf>,
}

impl ModelDirs {
    /// The directory holding any of `names`: the model's own, else its base's (an adapter
    /// written by PEFT holds no tokenizer or processor of its own).
    pub fn file_dir(&self, names: &[&str]) -> &Path {
        match &self.base {
            Some(base) if !names.iter().any(|n| self.dir.join(n).exists()) => base,
            _ => &self.dir,
        }
    }
}

/// Loads a LLaVA model from a checkpoint directory, a hub id, or a LoRA adapter directory on
/// its base. An adapter is folded into the base's weights (a plain model), unless
/// `options.lora` asks for adapters (training them further): then its tensors are loaded into
/// them.
pub fn load_llava_from(model: &str, options: &BuildOptions) -> Result<(LlavaModel, ModelDirs)> {
    let dir = hub::resolve_model(model)?;
    if adapter::is_adapter(&dir) {
        let adapter = adapter::read_adapter(&dir)?;
        let base = hub::resolve_model(&adapter.base)
            .with_context(|| format!("the base model of the adapter in {}", dir.display()))?;
        let config = read_config(&base)?;
        let mut weights = read_weights(&base, &options.device)?;
        match options.lora {
            None => adapter.fold_into(&mut weights)?,
            Some(_) => adapter.add_to(&mut weights),
        }
        let llava = LlavaModel::build(&config, Arc::new(weights), options).with_context(|| {
            format!(
                "loading the adapter in {} on {}",
                dir.display(),
                base.display()
            )
        })?;
        return Ok((
            llava,
            ModelDirs {
                dir,
                base: Some(base),
            },
        ));
    }
    let config = read_config(&dir)?;
    let weights = read_weights(&dir, &options.device)?;
    let llava = LlavaModel::build(&config, Arc::new(weights), options)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    Ok((llava, ModelDirs { dir, base: None }))
}

/// Saves `model` to `out` (config, weights, tokenizer and image processor), atomically: written
/// to a temporary sibling directory, then renamed into place.
pub fn save_llava(model: &LlavaModel, out: &Path, assets: SaveAssets<'_>) -> Result<()> {
    let tmp = filled_temp_sibling(out, |dir| write_llava_files(model, dir, assets))?;
    replace_dir(&tmp, out)
}

/// A fresh, empty temporary directory next to `out` (same filesystem, so renames are atomic).
pub fn temp_sibling(out: &Path) -> Result<PathBuf> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out
        .file_name()
        .with_context(|| format!("{} has no directory name", out.display()))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// A temporary sibling of `out` filled by `write`; removed again when `write` fails (a full
/// disk must not be made fuller by the half-written attempt).
pub fn filled_temp_sibling(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let tmp = temp_sibling(out)?;
    if let Err(err) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    Ok(tmp)
}

/// Writes files into the existing directory `out` through a temporary sibling, then moves them
/// in one by one (each rename is atomic): a reader of `out` never sees a half-written file.
pub fn write_files_into(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = filled_temp_sibling(&out.join("final"), write)?;
    for entry in std::fs::read_dir(&tmp)? {
        let entry = entry?;
        std::fs::rename(entry.path(), out.join(entry.file_name()))?;
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// Writes the checkpoint files of `model` into the existing directory `dir`.
pub fn write_llava_files(model: &LlavaModel, dir: &Path, assets: SaveAssets<'_>) -> Result<()> {
    let mut config = model.config.clone();
    // mmkd never builds SigLIP's pooling head; say so, or transformers would expect its weights.
    if config.vision_config.kind == mmkd_vision::config::VisionKind::Siglip {
        config
            .vision_config
            .extra
            .insert("vision_use_head".into(), serde_json::Value::Bool(false));
    }
    config.extra.insert(
        "architectures".into(),
        serde_json::json!(["LlavaForConditionalGeneration"]),
    );
    std::fs::write(dir.join("config.json"), config.to_json_string()?)?;
    let tensors = model
        .store
        .tensors()
        .into_iter()
        .map(|(name, t)| (layout::saved_key(&name), t))
        .collect();
    save_safetensors(&tensors, &dir.join(SAFETENSORS_SINGLE))?;
    write_model_assets(model, dir, assets)
}

/// What a checkpoint holds besides config and weights: training record, tokenizer, image
/// processor (a LoRA adapter directory holds these too).
pub fn write_model_assets(model: &LlavaModel, dir: &Path, assets: SaveAssets<'_>) -> Result<()> {
    if let Some(record) = assets.training {
        record.write(dir)?;
    }
    if let Some(src) = assets.tokenizer_dir {
        for file in TOKENIZER_FILES {
            let from = src.join(file);
            if from.exists() {
                std::fs::copy(&from, dir.join(file))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
    }
    if let Some(tokenizer) = assets.tokenizer {
        let path = dir.join("tokenizer.json");
        let text = tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(processor) = assets.processor {
        write_processor_configs(dir, processor, model)?;
    }
    Ok(())
}

/// Moves `tmp` to `out`, replacing any previous `out` only once the new one is complete.
pub fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let old = out.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("moving aside {}", out.display()))?;
        std::fs::rename(tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    }
    Ok(())
}

/// transformers 5 reads the processor from `processor_config.json`; older versions and
/// `AutoImageProcessor` from `preprocessor_config.json`. Both are written.
fn write_processor_configs(
    dir: &Path,
    processor: &mmkd_vision::ImageProcessor,
    model: &LlavaModel,
) -> Result<()> {
    let image_processor = processor.to_json();
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&image_processor)?,
    )?;
    let additional = match model.config.vision_config.kind {
        mmkd_vision::VisionKind::Clip => 1,
        mmkd_vision::VisionKind::Siglip => 0,
    };
    let processor_config = serde_json::json!({
        "image_processor": image_processor,
        "image_token": "<image>",
        "num_additional_image_tokens": additional,
        "patch_size": model.config.vision_config.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
    });
    std::fs::write(
        dir.join("processor_config.json"),
        serde_json::to_string_pretty(&processor_config)?,
    )?;
    Ok(())
}
