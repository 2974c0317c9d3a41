//! Vision-tower weight names.
//!
//! Checkpoints name the tower's modules in two ways: older transformers versions and the Hub's
//! original SigLIP/CLIP checkpoints write `vision_model.embeddings.*`, while transformers ≥ 5
//! saves `SiglipVisionModel`/`CLIPVisionModel` (standalone or as LLaVA's `vision_tower`)
//! without the `vision_model.` level. mmkd builds and saves the `vision_model.*` form (which
//! transformers 5 loads too) and renames the other form on load.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use mmkd_nn::WeightSource;

/// The submodules of a vision model, as they appear directly below `vision_model.`.
const VISION_MODEL_CHILDREN: [&str; 5] = [
    "embeddings.",
    "encoder.",
    "pre_layrnorm.",
    "post_layernorm.",
    "head.",
];

/// Maps a tower-relative weight name to the `vision_model.*` form; other names are unchanged.
pub fn canonical_vision_name(relative: &str) -> String {
    if VISION_MODEL_CHILDREN
        .iter()
        .any(|c| relative.starts_with(c))
    {
        format!("vision_model.{relative}")
    } else {
        relative.to_string()
    }
}

/// Renames the tensors below `tower_prefix` (e.g. `model.vision_tower`; "" for a standalone
/// vision checkpoint) to the `vision_model.*` form. Tensors elsewhere are left alone.
pub fn canonicalize_vision_names(source: &mut WeightSource, tower_prefix: &str) {
    let head = if tower_prefix.is_empty() {
        String::new()
    } else {
        format!("{tower_prefix}.")
    };
    source.rename(|name| match name.strip_prefix(head.as_str()) {
        Some(rest) => Some(format!("{head}{}", canonical_vision_name(rest))),
        None => Some(name.to_string()),
    });
}

/// Loads a standalone vision checkpoint directory (`model.safetensors` or sharded) with its
/// names in the `vision_model.*` form, ready for a [`crate::VisionTower`] built at prefix "".
pub fn load_vision_weights(dir: &Path, device: &Device) -> Result<WeightSource> {
    let mut source = WeightSource::from_dir(dir, device)
        .with_context(|| format!("loading vision tower weights from {}", dir.display()))?;
    canonicalize_vision_names(&mut source, "");
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::collections::HashMap;

    #[test]
    fn both_layouts_map_to_vision_model_names() {
        assert_eq!(
            canonical_vision_name("encoder.layers.0.mlp.fc1.weight"),
            "vision_model.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            canonical_vision_name("vision_model.post_layernorm.bias"),
            "vision_model.post_layernorm.bias"
        );
        assert_eq!(
            canonical_vision_name("text_model.embeddings.x"),
            "text_model.embeddings.x"
        );

        let t = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut src = WeightSource::from_tensors(
            "m.safetensors",
            HashMap::from([
                (
                    "model.vision_tower.embeddings.patch_embedding.weight".to_string(),
                    t.clone(),
                ),
                (
                    "model.vision_tower.vision_model.pre_layrnorm.weight".to_string(),
                    t.clone(),
                ),
                ("model.language_model.embed_tokens.weight".to_string(), t),
            ]),
        );
        canonicalize_vision_names(&mut src, "model.vision_tower");
        let mut names: Vec<&str> = src.names().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "model.language_model.embed_tokens.weight",
                "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
                "model.vision_tower.vision_model.pre_layrnorm.weight",
            ]
        );
    }
}
