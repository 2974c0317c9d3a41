//! The vision tower being pre-trained: the preset's fresh SigLIP/CLIP tower, how LLaVA will
//! take features from it, and the image processor the LLaVA stages will give it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use mmkd_nn::ParamBuilder;
use mmkd_vision::{FeatureSelect, ImageProcessor, VisionConfig, VisionTower};
use rayon::prelude::*;

use crate::config::ModelSpec;
use crate::stages::init::fresh_processor;

/// Where the tower's tensors live in the stage's parameter store (its own checkpoint layout).
pub const TOWER_PREFIX: &str = "vision_model.";

pub struct TowerEncoder {
    pub config: VisionConfig,
    pub tower: VisionTower,
    /// The layer(s) and tokens LLaVA reads: what the objectives train.
    pub select: FeatureSelect,
    pub processor: ImageProcessor,
}

impl TowerEncoder {
    /// A fresh tower of `spec`'s `vision_config` (its parameters from `pb`).
    pub fn new(pb: &ParamBuilder, spec: &ModelSpec) -> Result<Self> {
        let config = spec.fresh_vision_config()?.context(
            "vision pre-training trains a fresh tower: the preset's model needs a `vision_config`",
        )?;
        let select = spec.feature_select()?;
        let tower = VisionTower::new(pb, &config)?;
        // The processor the teacher's fresh model gets.
        let processor = fresh_processor(spec, &config, None)?;
        Ok(Self {
            config,
            tower,
            select,
            processor,
        })
    }

    /// Selected features `[n, tokens, dim]`.
    pub fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.select.features(&self.tower, pixels)
    }

    pub fn feature_dim(&self) -> usize {
        self.select.feature_dim(&self.config)
    }

    /// Pixel values `[n, 3, h, w]` of image files, preprocessed in parallel. Errors name the
    /// sample and the file.
    pub fn pixels(&self, images: &[(&str, &Path)]) -> Result<Tensor> {
        let arrays = images
            .par_iter()
            .map(|(id, path)| {
                self.processor
                    .preprocess_file(path)
                    .with_context(|| format!("sample {id}: image {}", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        mmkd_vision::to_tensor(&arrays, &Device::Cpu)
    }
}

/// One training example's image: its id (for messages) and file.
#[derive(Clone, Debug)]
pub struct ImageRef {
    pub id: String,
    pub path: PathBuf,
}

impl ImageRef {
    pub fn pairs<'a>(refs: &[&'a ImageRef]) -> Vec<(&'a str, &'a Path)> {
        refs.iter()
            .map(|r| (r.id.as_str(), r.path.as_path()))
            .collect()
    }
}
