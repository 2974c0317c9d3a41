//! LoRA adapters on the LLaVA models: a PEFT-written adapter loads with PEFT's logits, an
//! adapter starts as its base, only adapters train and every one gets a gradient, and what
//! mmkd writes reads back as the same model.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{expected, fixture, ids2, mask2, max_abs_diff};
use mmkd::checkpoint::adapter::{read_adapter, write_adapter, AdapterOutput};
use mmkd::checkpoint::{load_llava, LoadedModel};
use mmkd::models::llava::{BuildOptions, LlavaModel, TokenBatch, Trainable};
use mmkd_nn::grad_check::params_without_gradient;
use mmkd_nn::{LoraPlan, LoraTargets};

fn batch() -> (TokenBatch, Tensor) {
    let exp = expected("llava_siglip_qwen2");
    (
        TokenBatch {
            ids: ids2(&exp["input_ids"]),
            mask: mask2(&exp["attention_mask"]),
        },
        exp["pixel_values"].clone(),
    )
}

fn logits(model: &LlavaModel) -> Tensor {
    let (tokens, pixels) = batch();
    model.forward(&tokens, Some(&pixels)).unwrap().logits
}

fn with_lora(plan: Option<LoraPlan>) -> BuildOptions {
    let mut options = BuildOptions::new(Trainable::NONE, 0);
    options.lora = plan.map(Arc::new);
    options
}

/// Adapters on every linear layer of every module, fresh.
fn everywhere() -> LoraPlan {
    LoraPlan {
        targets: LoraTargets::Rule {
            modules: [
                "model.vision_tower",
                "model.multi_modal_projector",
                "model.language_model",
            ]
            .map(String::from)
            .to_vec(),
            names: vec!["all-linear".into()],
        },
        rank: 2,
        alpha: 4.0,
        rslora: false,
        dropout: 0.0,
        trainable: true,
        require_weights: false,
    }
}

#[test]
fn a_peft_written_adapter_gives_pefts_logits_folded_or_as_adapters() {
    let dir = fixture("lora_peft");
    let want = &common::expected("lora_peft")["logits"];
    // Folded into the base (eval, score, generate, a teacher).
    let folded = LoadedModel::load(
        dir.to_str().unwrap(),
        &BuildOptions::new(Trainable::NONE, 0),
    )
    .unwrap();
    let d = max_abs_diff(&logits(&folded.model), want);
    assert!(d < 1e-4, "folded: max |Δ logits| {d}");
    assert!(folded.origin.contains("adapter on"), "{}", folded.origin);
    // As separate adapter branches (what training them further uses).
    let plan = read_adapter(&dir).unwrap().plan;
    let (branches, _) = load_llava(dir.to_str().unwrap(), &with_lora(Some(plan))).unwrap();
    let d = max_abs_diff(&logits(&branches), want);
    assert!(d < 1e-4, "as adapters: max |Δ logits| {d}");
    // The base alone is another model.
    let base = &expected("llava_siglip_qwen2")["logits"];
    assert!(max_abs_diff(want, base) > 0.1);
}

#[test]
fn fresh_adapters_start_as_the_base_and_are_all_that_trains() {
    let base_dir = fixture("llava_siglip_qwen2");
    let (model, _) =
        load_llava(base_dir.to_str().unwrap(), &with_lora(Some(everywhere()))).unwrap();
    // B = 0: the base model's logits, exactly.
    let (plain, _) = load_llava(base_dir.to_str().unwrap(), &with_lora(None)).unwrap();
    assert_eq!(max_abs_diff(&logits(&model), &logits(&plain)), 0.0);
    let trainable: Vec<String> = model
        .store
        .trainable_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        trainable
            .iter()
            .all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")),
        "{trainable:?}"
    );
    // Every linear layer of the three modules but the LM head: 2 vision layers × 6, the
    // projector's 2, 2 LLM layers × 7.
    assert_eq!(trainable.len(), 2 * (2 * 6 + 2 + 2 * 7), "{trainable:?}");
    assert!(!trainable.iter().any(|n| n.starts_with("lm_head")));
    // With B ≠ 0 (as after a step), every adapter gets a gradient.
    for (name, var) in model.store.trainable_vars() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let loss = logits(&model).sqr().unwrap().mean_all().unwrap();
    // The tower's last layer is never run (LLaVA reads the second to last), as without LoRA.
    let missing: Vec<String> = params_without_gradient(&model.store, &loss)
        .unwrap()
        .into_iter()
        .filter(|m| !m.contains("vision_model.encoder.layers.1."))
        .collect();
    assert!(missing.is_empty(), "{missing:?}");
}

#[test]
fn an_adapter_mmkd_writes_reads_back_as_the_same_model() {
    let base_dir = fixture("llava_siglip_qwen2");
    let (model, _) =
        load_llava(base_dir.to_str().unwrap(), &with_lora(Some(everywhere()))).unwrap();
    for (name, var) in model.store.trainable_vars() {
        let t = Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap();
        if name.contains("lora_B") {
            var.set(&t).unwrap();
        }
    }
    let trained = logits(&model);
    let out = tempfile::tempdir().unwrap();
    let tensors: BTreeMap<String, Tensor> = model.store.tensors();
    write_adapter(
        out.path(),
        &tensors,
        |_| false,
        &AdapterOutput {
            base: base_dir.to_str().unwrap(),
            plan: &everywhere(),
            modules_to_save: vec![],
        },
    )
    .unwrap();
    for file in ["tokenizer.json", "preprocessor_config.json"] {
        assert!(!out.path().join(file).exists());
    }
    let back = LoadedModel::load(
        out.path().to_str().unwrap(),
        &BuildOptions::new(Trainable::NONE, 0),
    )
    .unwrap();
    let d = max_abs_diff(&logits(&back.model), &trained);
    assert!(d < 1e-4, "{d}");
    // Tokenizer and processor come from the base.
    assert_eq!(back.dir, base_dir);
    let adapter = read_adapter(out.path()).unwrap();
    assert_eq!(adapter.config.r, 2);
    assert_eq!(adapter.config.lora_alpha, 4.0);
}

#[test]
fn adapters_mmkd_cannot_apply_exactly_are_refused_naming_the_file() {
    let src = fixture("lora_peft");
    for (key, value, says) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 8}),
            "rank_pattern",
        ),
        ("peft_type", serde_json::json!("IA3"), "is not LORA"),
        (
            "base_model_name_or_path",
            serde_json::json!(null),
            "base_model_name_or_path is not set",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        config[key] = value;
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        let err = format!("{:#}", read_adapter(dir.path()).err().expect(key));
        assert!(
            err.contains(says) && err.contains("adapter_config.json"),
            "{key}: {err}"
        );
    }
}
