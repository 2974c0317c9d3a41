//! SigLIP / CLIP towers against transformers on tiny noise-scaled checkpoints.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, load_tensors, max_abs_diff};
use mmkd_nn::grad_check::params_without_gradient;
use mmkd_nn::{ParamBuilder, ParamStore, WeightSource};
use mmkd_vision::{load_vision_weights, VisionConfig, VisionKind, VisionTower};

const TOL: f64 = 1e-4;

fn load(name: &str, trainable: bool, dtype: DType) -> (VisionTower, VisionConfig, ParamStore) {
    let dir = fixtures().join(name);
    let cfg = VisionConfig::from_file(&dir.join("config.json")).unwrap();
    let source = load_vision_weights(&dir, &Device::Cpu).unwrap();
    let store = ParamStore::new();
    let pb = ParamBuilder::new(&store, Arc::new(source), 0, &Device::Cpu)
        .strict(true)
        .trainable(trainable)
        .frozen_dtype(dtype);
    let tower = VisionTower::new(&pb, &cfg).unwrap();
    (tower, cfg, store)
}

#[test]
fn every_hidden_state_matches_transformers() {
    let expected = load_tensors("tower_expected.safetensors");
    let pixels = &expected["pixel_values"];
    for (name, prefix) in [("siglip_tower", "siglip"), ("clip_tower", "clip")] {
        let (tower, cfg, store) = load(name, false, DType::F32);
        assert!(store.trainable_vars().is_empty());
        let out = tower.forward(pixels).unwrap();
        assert_eq!(out.hidden_states.len(), cfg.num_hidden_layers + 1);
        let mut worst = 0f64;
        for (i, h) in out.hidden_states.iter().enumerate() {
            let want = &expected[&format!("{prefix}.hidden_states.{i}")];
            let d = max_abs_diff(h, want);
            worst = worst.max(d);
            assert!(d <= TOL, "{prefix} hidden_states[{i}]: max |Δ| = {d}");
        }
        println!("{prefix}: max |Δ| over hidden states = {worst:e}");
        let d = max_abs_diff(
            &out.last_hidden_state,
            &expected[&format!("{prefix}.last_hidden_state")],
        );
        assert!(d <= TOL, "{prefix} last_hidden_state: max |Δ| = {d}");
        match cfg.kind {
            VisionKind::Clip => {
                let d = max_abs_diff(
                    out.pooler_output.as_ref().unwrap(),
                    &expected["clip.pooler_output"],
                );
                assert!(d <= TOL, "clip pooler_output: max |Δ| = {d}");
            }
            VisionKind::Siglip => assert!(out.pooler_output.is_none()),
        }
        // SigLIP's attention-pooling head is in the checkpoint but never built.
        assert!(store.names().iter().all(|n| !n.contains(".head.")));
    }
}

#[test]
fn half_precision_frozen_towers_compute_in_their_dtype() {
    let expected = load_tensors("tower_expected.safetensors");
    for (name, prefix) in [("siglip_tower", "siglip"), ("clip_tower", "clip")] {
        for dtype in [DType::F16, DType::BF16] {
            let (tower, _, store) = load(name, false, dtype);
            assert_eq!(
                store
                    .get("vision_model.post_layernorm.weight")
                    .unwrap()
                    .tensor
                    .dtype(),
                dtype
            );
            let out = tower.forward(&expected["pixel_values"]).unwrap();
            let last = out.hidden_states.last().unwrap();
            assert_eq!(last.dtype(), dtype);
            let want = &expected[&format!("{prefix}.hidden_states.2")];
            // Relative to the states' scale (tens): f16/bf16 keep 3/2 significant digits.
            let scale = want
                .abs()
                .unwrap()
                .max_keepdim(2)
                .unwrap()
                .max_keepdim(1)
                .unwrap()
                .max_keepdim(0)
                .unwrap();
            let scale = scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
            let d = max_abs_diff(last, want) / scale;
            let tol = if dtype == DType::F16 { 0.01 } else { 0.05 };
            println!("{prefix} {dtype:?}: max |Δ| / max |h| = {d:e}");
            assert!(d < tol, "{prefix} {dtype:?}: relative error {d}");
        }
    }
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let expected = load_tensors("tower_expected.safetensors");
    for name in ["siglip_tower", "clip_tower"] {
        let (tower, cfg, store) = load(name, true, DType::F32);
        let out = tower.forward(&expected["pixel_values"]).unwrap();
        // post_layernorm reaches only last_hidden_state (SigLIP) / pooler_output (CLIP), so the
        // loss uses those plus an intermediate state; fixed uneven weights avoid symmetric zeros.
        let weights = |t: &Tensor| {
            let n = t.elem_count();
            let w: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            Tensor::from_vec(w, t.shape(), &Device::Cpu).unwrap()
        };
        let mut loss = (&out.last_hidden_state * &weights(&out.last_hidden_state))
            .unwrap()
            .sum_all()
            .unwrap();
        let mid = &out.hidden_states[1];
        loss = (loss + (mid * &weights(mid)).unwrap().sum_all().unwrap()).unwrap();
        if let Some(p) = &out.pooler_output {
            loss = (loss + (p * &weights(p)).unwrap().sum_all().unwrap()).unwrap();
        }
        let missing = params_without_gradient(&store, &loss).unwrap();
        assert!(missing.is_empty(), "{name}: {missing:?}");
        let expected_count = match cfg.kind {
            // patch w+b, position, 16 per layer, post-LN 2
            VisionKind::Siglip => 3 + 16 * cfg.num_hidden_layers + 2,
            // patch w, class, position, pre-LN 2, 16 per layer, post-LN 2
            VisionKind::Clip => 5 + 16 * cfg.num_hidden_layers + 2,
        };
        assert_eq!(store.trainable_vars().len(), expected_count, "{name}");
    }
}

#[test]
fn config_json_round_trips_and_llava_config_gives_the_same_tower() {
    for name in ["siglip_tower", "clip_tower"] {
        let path = fixtures().join(name).join("config.json");
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let cfg = VisionConfig::from_json_value(&original).unwrap();
        assert_eq!(cfg.to_json(), original, "{name}");
        assert_eq!((cfg.hidden_size, cfg.num_patches()), (32, 16));
    }
    let llava = common::read_json("llava_siglip_config.json");
    let from_llava = VisionConfig::from_llava_config(&llava).unwrap();
    let standalone = VisionConfig::from_file(&fixtures().join("siglip_tower/config.json")).unwrap();
    let arch = |c: &VisionConfig| {
        (
            c.kind,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.image_size,
            c.patch_size,
            c.hidden_act,
        )
    };
    assert_eq!(arch(&from_llava), arch(&standalone));
    assert_eq!(from_llava.layer_norm_eps, standalone.layer_norm_eps);
}

#[test]
fn missing_model_type_is_an_error_naming_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"hidden_size": 32, "num_attention_heads": 4}"#).unwrap();
    let err = format!("{:#}", VisionConfig::from_file(&path).unwrap_err());
    assert!(
        err.contains("missing key `model_type`") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn wrong_shaped_weights_are_errors_naming_the_tensor() {
    // The config says intermediate_size 48, the checkpoint has 64.
    let dir = fixtures().join("clip_tower");
    let mut cfg = VisionConfig::from_file(&dir.join("config.json")).unwrap();
    cfg.intermediate_size = 48;
    let source = load_vision_weights(&dir, &Device::Cpu).unwrap();
    let pb = ParamBuilder::new(&ParamStore::new(), Arc::new(source), 0, &Device::Cpu).strict(true);
    let err = format!("{:#}", VisionTower::new(&pb, &cfg).unwrap_err());
    assert!(
        err.contains("vision_model.encoder.layers.0.mlp.fc1.weight")
            && err.contains("[64, 32]")
            && err.contains("[48, 32]"),
        "{err}"
    );

    // A strict build over a checkpoint without the tensor names the missing one.
    let t = Tensor::zeros((32, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let only_patch = WeightSource::from_tensors(
        "partial.safetensors",
        HashMap::from([(
            "vision_model.embeddings.patch_embedding.weight".to_string(),
            t,
        )]),
    );
    let pb =
        ParamBuilder::new(&ParamStore::new(), Arc::new(only_patch), 0, &Device::Cpu).strict(true);
    let err = format!("{:#}", VisionTower::new(&pb, &cfg).unwrap_err());
    assert!(
        err.contains("vision_model.embeddings.class_embedding")
            && err.contains("partial.safetensors"),
        "{err}"
    );
}

#[test]
fn wrong_pixel_shape_is_an_error() {
    let (tower, _, _) = load("siglip_tower", false, DType::F32);
    let x = Tensor::zeros((1, 3, 24, 32), DType::F32, &Device::Cpu).unwrap();
    let err = tower.forward(&x).unwrap_err().to_string();
    assert!(
        err.contains("[1, 3, 24, 32]") && err.contains("[n, 3, 32, 32]"),
        "{err}"
    );
}

#[test]
fn fresh_towers_are_seeded_and_nest_under_a_prefix() {
    let cfg = VisionConfig::from_file(&fixtures().join("clip_tower/config.json")).unwrap();
    let build = || {
        let store = ParamStore::new();
        let pb = ParamBuilder::fresh(&store, 7, &Device::Cpu)
            .pp("model")
            .pp("vision_tower");
        let tower = VisionTower::new(&pb, &cfg).unwrap();
        (tower, store)
    };
    let (a, store) = build();
    let (b, _) = build();
    assert!(store
        .names()
        .contains(&"model.vision_tower.vision_model.pre_layrnorm.weight".to_string()));
    let x = load_tensors("tower_expected.safetensors")["pixel_values"].clone();
    let (ya, yb) = (a.forward(&x).unwrap(), b.forward(&x).unwrap());
    assert_eq!(
        max_abs_diff(&ya.last_hidden_state, &yb.last_hidden_state),
        0.0
    );
}

/// Directional finite differences through the patchify matmul, class token and position
/// embeddings (the tower's own gradient paths; the layers are checked in mmkd-nn).
#[test]
fn embedding_gradients_match_finite_differences() {
    let expected = load_tensors("tower_expected.safetensors");
    let pixels = &expected["pixel_values"];
    for name in ["siglip_tower", "clip_tower"] {
        let (tower, _, store) = load(name, true, DType::F32);
        let loss_of = |t: &VisionTower| -> Tensor {
            let out = t.forward(pixels).unwrap();
            let h = &out.hidden_states[1];
            let w: Vec<f32> = (0..h.elem_count())
                .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
                .collect();
            let w = Tensor::from_vec(w, h.shape(), &Device::Cpu).unwrap();
            (h * w).unwrap().sum_all().unwrap()
        };
        let grads = loss_of(&tower).backward().unwrap();
        let mut names = vec![
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
        ];
        if name == "clip_tower" {
            names.push("vision_model.embeddings.class_embedding");
        }
        for pname in names {
            let var = store
                .trainable_vars()
                .into_iter()
                .find(|(n, _)| n == pname)
                .unwrap()
                .1;
            let w0 = var.as_tensor().copy().unwrap();
            let n = w0.elem_count();
            let dir: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 / 5.0) - 1.0).collect();
            let dir = Tensor::from_vec(dir, w0.shape(), &Device::Cpu).unwrap();
            let analytic = (grads.get(var.as_tensor()).unwrap() * &dir)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let eps = 1e-3;
            let at = |s: f64| {
                var.set(&(&w0 + (&dir * s).unwrap()).unwrap()).unwrap();
                loss_of(&tower)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = ((at(eps) - at(-eps)) / (2.0 * eps)) as f32;
            var.set(&w0).unwrap();
            let rel = (analytic - numeric).abs() / analytic.abs().max(1.0);
            assert!(
                rel < 1e-2,
                "{name} {pname}: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
}
