//! LLaVA feature selection against transformers' `LlavaModel.get_image_features` (run with an
//! identity projector on the tiny towers of `tower.rs`).

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::{fixtures, load_tensors, max_abs_diff, read_json};
use mmkd_nn::{ParamBuilder, ParamStore};
use mmkd_vision::{load_vision_weights, FeatureSelect, VisionConfig, VisionTower};

fn tower(name: &str) -> (VisionTower, VisionConfig) {
    let dir = fixtures().join(format!("{name}_tower"));
    let cfg = VisionConfig::from_file(&dir.join("config.json")).unwrap();
    let source = load_vision_weights(&dir, &Device::Cpu).unwrap();
    let pb = ParamBuilder::new(&ParamStore::new(), Arc::new(source), 0, &Device::Cpu)
        .strict(true)
        .trainable(false);
    (VisionTower::new(&pb, &cfg).unwrap(), cfg)
}

#[test]
fn selected_features_match_transformers_llava() {
    let pixels = load_tensors("tower_expected.safetensors")["pixel_values"].clone();
    let expected = load_tensors("select_expected.safetensors");
    let cases = read_json("select_cases.json");
    let towers = [("siglip", tower("siglip")), ("clip", tower("clip"))];
    for case in cases.as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let (t, cfg) = &towers.iter().find(|(n, _)| *n == case["tower"]).unwrap().1;
        // The case object carries the two LLaVA config keys.
        let sel = FeatureSelect::from_llava_config(case).unwrap();
        let out = t.forward(&pixels).unwrap();
        let full = sel.select(&out).unwrap();
        let want = &expected[key];
        assert_eq!(full.dims(), want.dims(), "{key}");
        assert_eq!(
            full.dims(),
            &[2, sel.tokens_per_image(cfg), sel.feature_dim(cfg)],
            "{key}: tokens_per_image / feature_dim"
        );
        let d = max_abs_diff(&full, want);
        assert!(d <= 1e-4, "{key}: max |Δ| = {d}");
        // Running only the needed layers gives the same features.
        let partial = sel.features(t, &pixels).unwrap();
        assert_eq!(max_abs_diff(&partial, &full), 0.0, "{key}");
    }
}

#[test]
fn llava_config_defaults_and_out_of_range_layers() {
    let llava = read_json("llava_siglip_config.json");
    let sel = FeatureSelect::from_llava_config(&llava).unwrap();
    assert_eq!(sel, FeatureSelect::default());
    let (t, cfg) = tower("siglip");
    // 16 patches, `default` drops the first one even for SigLIP (no class token).
    assert_eq!(sel.tokens_per_image(&cfg), 15);
    let bad =
        FeatureSelect::from_llava_config(&serde_json::json!({"vision_feature_layer": [-1, 3]}))
            .unwrap();
    let pixels = load_tensors("tower_expected.safetensors")["pixel_values"].clone();
    let err = bad.features(&t, &pixels).unwrap_err().to_string();
    assert!(
        err.contains("vision_feature_layer 3 is out of range"),
        "{err}"
    );
}
