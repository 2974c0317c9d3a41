//! A model with what it needs to read inputs: its tokenizer and image processor. Every command
//! that loads a checkpoint (training, the teacher cache, evaluation, generation) gets one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use mmkd_vision::ImageProcessor;
use tokenizers::Tokenizer;

use super::load_llava_from;
use crate::models::llava::{BuildOptions, LlavaModel};

pub struct LoadedModel {
    pub model: LlavaModel,
    /// Directory holding `tokenizer.json` (copied into every checkpoint trained from it).
    pub dir: PathBuf,
    /// The model's own directory: the checkpoint, or the adapter (whose base may hold the
    /// tokenizer).
    pub model_dir: PathBuf,
    /// An adapter's base model directory.
    pub base_dir: Option<PathBuf>,
    pub tokenizer: Tokenizer,
    pub processor: ImageProcessor,
    /// Where the weights came from, for run summaries.
    pub origin: String,
    /// What it was trained with (`mmkd_training.json`), when an mmkd stage wrote it.
    pub training: Option<super::training::TrainingRecord>,
}

impl LoadedModel {
    /// Loads model, tokenizer and image processor from a directory or hub id.
    /// A LoRA adapter directory loads on its base (see [`super::load_llava_from`]).
    pub fn load(spec: &str, options: &BuildOptions) -> Result<Self> {
        let (model, dirs) = load_llava_from(spec, options)?;
        let tokenizer_dir = dirs.file_dir(&["tokenizer.json"]).to_path_buf();
        let tokenizer = load_tokenizer(&tokenizer_dir)?;
        let processor =
            load_processor(dirs.file_dir(&["preprocessor_config.json", "processor_config.json"]))?;
        let training = super::training::TrainingRecord::read(&dirs.dir)?;
        let origin = match &dirs.base {
            Some(base) => format!("{} (adapter on {})", dirs.dir.display(), base.display()),
            None => dirs.dir.display().to_string(),
        };
        Ok(Self {
            training,
            model,
            origin,
            dir: tokenizer_dir,
            model_dir: dirs.dir,
            base_dir: dirs.base,
            tokenizer,
            processor,
        })
    }

    /// Token ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding {ids:?}: {e}"))
    }

    /// Preprocessed pixel values `[n, 3, H, W]` for image files.
    pub fn pixel_values(&self, images: &[PathBuf]) -> Result<Tensor> {
        let arrays = images
            .iter()
            .map(|p| self.processor.preprocess_file(p))
            .collect::<Result<Vec<_>>>()?;
        mmkd_vision::to_tensor(&arrays, self.model.device())
    }

    /// The image block: `tokens_per_image` copies of the image token.
    pub fn image_block(&self) -> Vec<u32> {
        vec![self.model.image_token_id(); self.model.tokens_per_image()]
    }

    /// The id of a special token such as `<|endoftext|>`, if the tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        bail!(
            "{} does not exist: the checkpoint has no tokenizer",
            path.display()
        );
    }
    mmkd_datasets::load_tokenizer(&path)
}

/// The image processor: `preprocessor_config.json`, or the `image_processor` entry of
/// `processor_config.json` (what transformers 5 writes).
pub fn load_processor(dir: &Path) -> Result<ImageProcessor> {
    let pre = dir.join("preprocessor_config.json");
    if pre.exists() {
        return ImageProcessor::from_file(&pre);
    }
    let proc = dir.join("processor_config.json");
    if proc.exists() {
        let text = std::fs::read_to_string(&proc)
            .with_context(|| format!("reading {}", proc.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", proc.display()))?;
        let inner = value
            .get("image_processor")
            .with_context(|| format!("{} has no `image_processor` entry", proc.display()))?;
        return ImageProcessor::from_json_value(inner)
            .with_context(|| format!("in {}", proc.display()));
    }
    bail!(
        "no image processor config in {} (neither preprocessor_config.json nor processor_config.json)",
        dir.display()
    )
}
