#![no_main]
//! A LoRA adapter's `adapter_config.json` (PEFT's format), next to the committed fixture's
//! weights; read, then loaded on the committed base when it reads.
use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = mmkd_fuzz::scratch().join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let weights = dir.join("adapter_model.safetensors");
    if !weights.exists() {
        std::fs::copy(root.join("tests/fixtures/lora_peft/adapter_model.safetensors"), &weights)
            .unwrap();
    }
    std::fs::write(dir.join("adapter_config.json"), data).unwrap();
    if mmkd::checkpoint::adapter::read_adapter(&dir).is_ok() {
        let _ = mmkd::checkpoint::LoadedModel::load(
            dir.to_str().unwrap(),
            &mmkd::models::llava::BuildOptions::new(mmkd::models::llava::Trainable::NONE, 0),
        );
    }
});
