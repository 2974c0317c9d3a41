#![no_main]
//! Preset TOML files, resolved for every stage and for the tower.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("preset.toml", data);
    if let Ok(doc) = mmkd::config::load_document(path.to_str().unwrap()) {
        for stage in [mmkd::config::Stage::Pretrain, mmkd::config::Stage::Dft] {
            let _ = mmkd::config::StageSettings::resolve(&doc, stage, mmkd::config::Role::Student);
        }
        let _ = mmkd::config::tower::TowerSettings::resolve(&doc);
    }
});
