#![no_main]
//! A safetensors weights file.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("model.safetensors", data);
    if let Ok(w) = mmkd_nn::WeightSource::from_file(&path, &candle_core::Device::Cpu) {
        let _ = w.names().count();
    }
});
