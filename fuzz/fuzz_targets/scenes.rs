#![no_main]
//! `scenes.jsonl` of the synthetic data (the tower's labels).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("scenes.jsonl", data);
    if let Ok(scenes) = mmkd_datasets::read_scene_cells(&path) {
        for s in &scenes {
            let _ = s.patch_labels(3, mmkd_datasets::Attribute::ALL[0]);
        }
    }
});
