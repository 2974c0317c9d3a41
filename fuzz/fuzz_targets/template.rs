#![no_main]
//! Conversation template TOML files.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("template.toml", data);
    let _ = mmkd_datasets::Template::from_file(&path);
});
