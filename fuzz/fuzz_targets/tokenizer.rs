#![no_main]
//! `tokenizer.json`, then encoding and decoding with it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("tokenizer.json", data);
    if let Ok(t) = mmkd_datasets::load_tokenizer(&path) {
        if let Ok(enc) = t.encode("USER: <image>\nWhat is it? ASSISTANT: a red circle", false) {
            let _ = t.decode(enc.get_ids(), false);
        }
    }
});
