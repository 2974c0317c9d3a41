//! Checkpoint I/O: save → load round trip, the saved layout against what transformers wrote,
//! composing from separate vision and LLM checkpoints, and gradients through the whole model.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{expected, fixture, ids2, mask2, max_abs_diff};
use mmkd::checkpoint::bundle::load_processor;
use mmkd::checkpoint::compose::{compose, ComposeSpec};
use mmkd::checkpoint::{load_llava, read_weights, save_llava, SaveAssets};
use mmkd::models::llava::{BuildOptions, LlavaModel, TokenBatch, Trainable};
use mmkd::models::projector::ProjectorKind;
use mmkd_nn::grad_check::params_without_gradient;
use mmkd_nn::weights::save_safetensors;

fn load(dir: &Path, trainable: Trainable) -> LlavaModel {
    load_llava(dir.to_str().unwrap(), &BuildOptions::new(trainable, 0))
        .unwrap()
        .0
}

fn fixture_batch(name: &str) -> (TokenBatch, Tensor) {
    let exp = expected(name);
    (
        TokenBatch {
            ids: ids2(&exp["input_ids"]),
            mask: mask2(&exp["attention_mask"]),
        },
        exp["pixel_values"].clone(),
    )
}

fn saved_keys(dir: &Path) -> BTreeSet<String> {
    read_raw_keys(dir)
}

fn read_raw_keys(dir: &Path) -> BTreeSet<String> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
        v["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    } else {
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect()
    }
}

#[test]
fn save_then_load_gives_identical_outputs_and_transformers_layout() {
    for name in ["llava_siglip_qwen2", "llava_clip_llama"] {
        let src = fixture(name);
        let model = load(&src, Trainable::NONE);
        let processor = load_processor(&src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        let assets = SaveAssets {
            tokenizer_dir: Some(&src),
            processor: Some(&processor),
            tokenizer: None,
            training: None,
        };
        save_llava(&model, &out, assets).unwrap();
        // Saving again over an existing directory replaces it atomically.
        save_llava(&model, &out, assets).unwrap();
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
            "processor_config.json",
        ] {
            assert!(out.join(file).exists(), "{name}: {file} missing");
        }
        let reloaded = load(&out, Trainable::NONE);
        let (batch, pixels) = fixture_batch(name);
        let a = model.forward(&batch, Some(&pixels)).unwrap().logits;
        let b = reloaded.forward(&batch, Some(&pixels)).unwrap().logits;
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}: reloaded model differs");
        assert_eq!(load_processor(&out).unwrap(), processor);

        // Same tensor names as transformers' default save_pretrained (the clip fixture was
        // written that way; the siglip one with module names, which map to the same set).
        let ours = saved_keys(&out);
        let theirs: BTreeSet<String> = read_raw_keys(&src)
            .into_iter()
            .map(|k| {
                mmkd::checkpoint::layout::saved_key(
                    &mmkd::checkpoint::layout::llava_key(&k).unwrap(),
                )
            })
            .collect();
        // SigLIP's unused post_layernorm is kept; nothing else may differ.
        assert_eq!(
            ours, theirs,
            "{name}: saved tensor names differ from transformers'"
        );
        if name == "llava_clip_llama" {
            assert_eq!(
                ours,
                read_raw_keys(&src),
                "{name}: not transformers' default save layout"
            );
        }
        let cfg_ours: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let cfg_theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        for key in cfg_theirs.as_object().unwrap().keys() {
            assert!(
                cfg_ours.get(key).is_some(),
                "{name}: saved config lacks `{key}`"
            );
        }
    }
}

/// Splits the siglip fixture into a standalone vision checkpoint and a Qwen2 checkpoint, as they
/// come from the hub, then composes them again.
#[test]
fn composing_vision_and_llm_checkpoints_reproduces_the_model() {
    let src = fixture("llava_siglip_qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let (vision_dir, llm_dir) = (tmp.path().join("vision"), tmp.path().join("llm"));
    std::fs::create_dir_all(&vision_dir).unwrap();
    std::fs::create_dir_all(&llm_dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    std::fs::write(
        vision_dir.join("config.json"),
        config["vision_config"].to_string(),
    )
    .unwrap();
    let mut text = config["text_config"].clone();
    text["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(llm_dir.join("config.json"), text.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), llm_dir.join("tokenizer.json")).unwrap();

    let weights = read_weights(&src, &Device::Cpu).unwrap();
    let (mut vision, mut llm, mut projector) = (
        BTreeMap::new(),
        BTreeMap::new(),
        std::collections::HashMap::new(),
    );
    for name in weights.names() {
        let t = weights.get(name).unwrap().clone();
        if let Some(rest) = name.strip_prefix("model.vision_tower.") {
            vision.insert(rest.to_string(), t);
        } else if let Some(rest) = name.strip_prefix("model.language_model.") {
            llm.insert(format!("model.{rest}"), t);
        } else if name.starts_with("lm_head.") {
            llm.insert(name.to_string(), t);
        } else {
            projector.insert(name.to_string(), t);
        }
    }
    save_safetensors(&vision, &vision_dir.join("model.safetensors")).unwrap();
    save_safetensors(&llm, &llm_dir.join("model.safetensors")).unwrap();

    let spec = ComposeSpec {
        vision: vision_dir.to_str().unwrap().into(),
        llm: llm_dir.to_str().unwrap().into(),
        projector: ProjectorKind::Mlp { depth: 2 },
        feature_layer: serde_json::json!(-2),
        select_strategy: "full".into(),
        image_token: "<image>".into(),
    };
    let mut composed = compose(&spec, &Device::Cpu).unwrap();
    assert_eq!(composed.config.image_token_id, 255);

    // A fresh projector: builds without projector weights and differs from the fixture.
    let mut options = BuildOptions::new(Trainable::PROJECTOR, 7);
    options.require = vec![
        mmkd::models::llava::VISION_PREFIX,
        mmkd::models::llava::LM_PREFIX,
    ];
    let fresh = LlavaModel::build(
        &composed.config,
        Arc::new(composed.weights.clone()),
        &options,
    )
    .unwrap();
    let (batch, pixels) = fixture_batch("llava_siglip_qwen2");
    let exp = expected("llava_siglip_qwen2");
    assert!(
        max_abs_diff(
            &fresh.forward(&batch, Some(&pixels)).unwrap().logits,
            &exp["logits"]
        ) > 1e-2
    );

    // With the fixture's projector weights added, the composed model is the fixture model.
    composed.weights.merge_renamed(
        mmkd_nn::WeightSource::from_tensors("projector", projector),
        |n| Some(n.to_string()),
    );
    let full = LlavaModel::build(
        &composed.config,
        Arc::new(composed.weights),
        &BuildOptions::new(Trainable::NONE, 0),
    )
    .unwrap();
    let d = max_abs_diff(
        &full.forward(&batch, Some(&pixels)).unwrap().logits,
        &exp["logits"],
    );
    assert!(d <= 1e-4, "composed model differs by {d}");
}

/// Every trainable parameter gets a non-zero gradient, except those transformers' LLaVA never
/// reads: the tower's post_layernorm and encoder layers past the deepest selected one.
#[test]
fn every_trainable_parameter_of_the_llava_models_gets_a_gradient() {
    let cases = [
        ("llava_siglip_qwen2", Trainable::PROJECTOR_AND_LLM, vec![]),
        ("llava_siglip_qwen2", Trainable::PROJECTOR, vec![]),
        (
            "llava_siglip_qwen2",
            Trainable::ALL,
            vec![
                "vision_model.encoder.layers.1.",
                "vision_model.post_layernorm.",
            ],
        ),
        (
            "llava_clip_llama",
            Trainable::ALL,
            vec!["vision_model.post_layernorm."],
        ),
    ];
    for (name, trainable, unused) in cases {
        let model = load(&fixture(name), trainable);
        let (batch, pixels) = fixture_batch(name);
        let out = model.forward(&batch, Some(&pixels)).unwrap();
        let weights = Tensor::randn(0f32, 1.0, out.logits.shape(), &Device::Cpu).unwrap();
        let loss = (out.logits * weights).unwrap().sum_all().unwrap();
        let missing = params_without_gradient(&model.store, &loss).unwrap();
        let unexpected: Vec<&String> = missing
            .iter()
            .filter(|m| !unused.iter().any(|u| m.contains(u)))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{name} {trainable:?}: {unexpected:?}"
        );
        if trainable == Trainable::PROJECTOR {
            assert_eq!(
                model.store.trainable_vars().len(),
                4,
                "only the projector trains"
            );
        }
    }
}

#[test]
fn image_and_placeholder_count_mismatch_is_a_clear_error() {
    let model = load(&fixture("llava_siglip_qwen2"), Trainable::NONE);
    let (batch, pixels) = fixture_batch("llava_siglip_qwen2");
    let one_image = pixels.narrow(0, 0, 1).unwrap();
    let err = model
        .forward(&batch, Some(&one_image))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("48 image-token positions") && err.contains("16 features"),
        "{err}"
    );
}

/// Frozen modules may be held in bf16/f16 while the projector trains in f32.
#[test]
fn half_precision_frozen_modules_stay_close_and_train_the_projector() {
    let (batch, pixels) = fixture_batch("llava_siglip_qwen2");
    let exp = expected("llava_siglip_qwen2");
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let mut options = BuildOptions::new(Trainable::PROJECTOR, 0);
        options.frozen_dtype = dtype;
        let model = load_llava(fixture("llava_siglip_qwen2").to_str().unwrap(), &options)
            .unwrap()
            .0;
        let out = model.forward(&batch, Some(&pixels)).unwrap();
        let d = max_abs_diff(&out.logits, &exp["logits"]);
        println!("{dtype:?}: max |Δ logits| {d}");
        // bf16 keeps 8 mantissa bits: a few tenths on logits of spread ~7 is expected.
        let bound = if dtype == candle_core::DType::BF16 {
            0.6
        } else {
            0.1
        };
        assert!(d < bound, "{dtype:?}: logits differ by {d}");
        let loss = out
            .logits
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let missing = params_without_gradient(&model.store, &loss).unwrap();
        assert!(missing.is_empty(), "{dtype:?}: {missing:?}");
    }
}
