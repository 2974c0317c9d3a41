#![no_main]
//! LLaVA JSON / JSONL data files.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("data.json", data);
    if let Ok(set) = mmkd_datasets::LlavaDataset::read(&path, &mmkd_fuzz::scratch()) {
        for s in &set.samples {
            let _ = s.rounds().count();
        }
    }
});
