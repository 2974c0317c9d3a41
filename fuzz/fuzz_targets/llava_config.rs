#![no_main]
//! A LLaVA `config.json` (vision, text and projector settings).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("config.json", data);
    if let Ok(c) = mmkd::models::llava_config::LlavaConfig::from_file(&path) {
        let _ = c.feature_selection();
        let _ = c.text_config.check_supported();
    }
});
