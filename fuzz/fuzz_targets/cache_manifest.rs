#![no_main]
//! A teacher cache's `manifest.json`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = mmkd_fuzz::scratch().join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), data).unwrap();
    let _ = mmkd::teacher_cache::Manifest::read(&dir);
});
