//! Puts random LoRA adapters on every linear layer of a LLaVA checkpoint's tower and language
//! model, perturbs its projector (trained fully: PEFT's `modules_to_save`), writes them as a
//! PEFT adapter and the adapted model's logits on the checkpoint's reference batch (used by
//! `tests/fixtures/check_adapter_with_peft.py` to prove PEFT loads mmkd's adapters with the
//! same outputs).
//!
//! cargo run --example lora_adapter -- tests/fixtures/llava_siglip_qwen2 OUT_DIR

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use mmkd::checkpoint::adapter::{write_adapter, AdapterOutput};
use mmkd::checkpoint::load_llava;
use mmkd::models::llava::{BuildOptions, TokenBatch, Trainable};
use mmkd_nn::{LoraPlan, LoraTargets, SeededRng};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, src, out] = args.as_slice() else {
        bail!("usage: lora_adapter SRC_DIR OUT_DIR");
    };
    let plan = LoraPlan {
        targets: LoraTargets::Rule {
            modules: ["model.vision_tower", "model.language_model"]
                .map(String::from)
                .to_vec(),
            names: vec!["all-linear".into()],
        },
        rank: 3,
        alpha: 6.0,
        rslora: true,
        dropout: 0.0,
        trainable: true,
        require_weights: false,
    };
    let mut options = BuildOptions::new(Trainable::PROJECTOR, 0);
    options.lora = Some(Arc::new(plan.clone()));
    let (model, _) = load_llava(src, &options)?;
    // Trained-looking adapters and projector: B and the projector away from their start.
    for (name, var) in model.store.trainable_vars() {
        let noise = SeededRng::for_name(7, &name).normal_vec(var.elem_count(), 0.1);
        let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu)?;
        if name.contains("lora_B") {
            var.set(&noise)?;
        } else if name.starts_with("model.multi_modal_projector") {
            var.set(&(var.as_tensor() + noise)?)?;
        }
    }
    let exp: HashMap<String, Tensor> =
        candle_core::safetensors::load(Path::new(src).join("expected.safetensors"), &Device::Cpu)?;
    let rows = |t: &Tensor| -> Result<Vec<Vec<u32>>> { Ok(t.to_dtype(DType::U32)?.to_vec2()?) };
    let mask: Vec<Vec<u8>> = exp["attention_mask"].to_dtype(DType::U8)?.to_vec2()?;
    let batch = TokenBatch {
        ids: rows(&exp["input_ids"])?,
        mask,
    };
    let logits = model.forward(&batch, Some(&exp["pixel_values"]))?.logits;
    std::fs::create_dir_all(out)?;
    write_adapter(
        Path::new(out),
        &model.store.tensors(),
        |name| name.starts_with("model.multi_modal_projector") && !name.contains(".lora_"),
        &AdapterOutput {
            base: src,
            plan: &plan,
            modules_to_save: vec!["multi_modal_projector".into()],
        },
    )?;
    candle_core::safetensors::save(
        &HashMap::from([("logits".to_string(), logits)]),
        Path::new(out).join("mmkd_logits.safetensors"),
    )?;
    println!("wrote an adapter of rank {} on {src} to {out}", plan.rank);
    Ok(())
}
