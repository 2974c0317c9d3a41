//! The trained tower written as a standalone SigLIP/CLIP vision checkpoint (`config.json`,
//! `model.safetensors`, `preprocessor_config.json`), its residual stream rescaled.
//!
//! Trained features come out several times larger than a fresh tower's, and a fresh projector
//! and LLM then learn far worse from them (measured on the shapes world's val split: PT loss 0.53
//! against 0.21 after rescaling). The tower's residual stream is therefore rescaled so the
//! selected features have a set RMS per element. Every block reads the stream through a
//! LayerNorm, which ignores its scale, so scaling the stream's inputs (patch and position
//! embeddings, or CLIP's pre-LayerNorm) and every block's outputs (attention `out_proj`, MLP
//! `fc2`) by α scales every hidden state by exactly α (up to LayerNorm's ε) and changes nothing
//! else.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use mmkd_nn::ParamStore;
use mmkd_vision::VisionKind;

use super::encoder::{ImageRef, TowerEncoder, TOWER_PREFIX};

/// Whether a tower tensor carries the residual stream's scale (see the module docs).
fn scales_with_stream(kind: VisionKind, name: &str) -> bool {
    let input = match kind {
        VisionKind::Siglip => {
            name.contains(".embeddings.patch_embedding.")
                || name.contains(".embeddings.position_embedding.")
        }
        VisionKind::Clip => name.contains(".pre_layrnorm."),
    };
    input || name.contains(".self_attn.out_proj.") || name.contains(".mlp.fc2.")
}

/// The tower's tensors (`vision_model.*`) with the residual stream scaled by `alpha`.
pub fn scaled_tower_tensors(
    store: &ParamStore,
    kind: VisionKind,
    alpha: f64,
) -> Result<BTreeMap<String, Tensor>> {
    store
        .tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with(TOWER_PREFIX))
        .map(|(name, t)| {
            let t = if scales_with_stream(kind, &name) {
                t.affine(alpha, 0.0)?
            } else {
                t.detach()
            };
            Ok((name, t))
        })
        .collect()
}

/// RMS per element of the selected features over `images`.
pub fn feature_rms(encoder: &TowerEncoder, images: &[&ImageRef], batch: usize) -> Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in images.chunks(batch.max(1)) {
        let f = encoder
            .features(&encoder.pixels(&ImageRef::pairs(chunk))?)?
            .detach();
        sum += f
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        count += f.elem_count();
    }
    Ok((sum / count.max(1) as f64).sqrt())
}

/// Writes the tower of `store`, its stream scaled by `scale`, with its config and processor
/// into `dir`.
pub fn write_tower(
    encoder: &TowerEncoder,
    store: &ParamStore,
    scale: f64,
    dir: &Path,
) -> Result<()> {
    ensure!(scale.is_finite() && scale > 0.0, "tower scale {scale}");
    let mut config = encoder.config.to_json();
    let (architecture, head_key) = match encoder.config.kind {
        VisionKind::Siglip => ("SiglipVisionModel", Some("vision_use_head")),
        VisionKind::Clip => ("CLIPVisionModel", None),
    };
    config["architectures"] = serde_json::json!([architecture]);
    if let Some(key) = head_key {
        // No attention-pooling head: LLaVA never uses it, and this tower was not trained with one.
        config[key] = serde_json::Value::Bool(false);
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let tensors = scaled_tower_tensors(store, encoder.config.kind, scale)?;
    mmkd_nn::weights::save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    encoder.processor.save(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tower::tests::{max_abs_diff, tiny_spec};
    use candle_core::Device;
    use mmkd_nn::ParamBuilder;
    use mmkd_vision::VisionTower;
    use std::collections::HashMap;

    #[test]
    fn rescaling_the_residual_stream_scales_the_features_and_nothing_else() {
        let siglip = tiny_spec();
        // CLIP's stream starts at its pre-LayerNorm; `default` drops its class token.
        let mut clip = tiny_spec();
        let table = clip.vision_config.as_mut().unwrap();
        table.insert("model_type".into(), "clip_vision_model".into());
        clip.select_strategy = "default".into();
        for spec in [siglip, clip] {
            let store = ParamStore::new();
            let encoder =
                TowerEncoder::new(&ParamBuilder::fresh(&store, 5, &Device::Cpu), &spec).unwrap();
            let kind = encoder.config.kind;
            let pixels = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
            let before = encoder.features(&pixels).unwrap();
            let alpha = 0.3;
            let tensors: HashMap<String, Tensor> = scaled_tower_tensors(&store, kind, alpha)
                .unwrap()
                .into_iter()
                .collect();
            assert!(tensors.keys().all(|k| k.starts_with(TOWER_PREFIX)));
            let source = mmkd_nn::WeightSource::from_tensors("scaled", tensors);
            let scaled_store = ParamStore::new();
            let pb = ParamBuilder::new(&scaled_store, std::sync::Arc::new(source), 0, &Device::Cpu)
                .strict(true);
            let tower = VisionTower::new(&pb, &encoder.config).unwrap();
            let after = encoder.select.features(&tower, &pixels).unwrap();
            let expected = before.affine(alpha, 0.0).unwrap();
            let scale = before
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(&after, &expected);
            assert!(
                diff <= 1e-4 * f64::from(scale),
                "{kind:?}: max |diff| {diff} (features up to {scale})"
            );
            // Unscaled, the tower would not pass: the check can fail.
            let unscaled = max_abs_diff(&before, &expected);
            assert!(unscaled > 0.1 * f64::from(scale), "{kind:?}");
        }
    }
}
