#![no_main]
//! A teacher cache's shard (top-8, as `scripts/fuzz.sh` seeds it): opened, then every sample's
//! rows and relation matrix read, as a distillation step reads them.
use mmkd::teacher_cache::shard::{Part, ShardReader};

const K: usize = 8;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("shard-00000.safetensors", data);
    if let Ok(reader) = ShardReader::open(&path, K) {
        let mut positions = Vec::new();
        let mut rows = mmkd::distill::TopKHost::empty(K);
        for slot in &reader.slots {
            let _ = reader.read_rows(slot, Part::Response, &mut positions, &mut rows);
            let _ = reader.read_rows(slot, Part::Visual, &mut positions, &mut rows);
            let _ = reader.relation(slot);
        }
    }
});
