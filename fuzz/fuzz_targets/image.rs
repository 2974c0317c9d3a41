#![no_main]
//! Image files: decoding, checking and preprocessing.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = mmkd_fuzz::as_file("image.png", data);
    let _ = mmkd_datasets::check_image(&path, mmkd_datasets::ImageCheck::Decode);
    let p = mmkd_vision::ImageProcessor::defaults(mmkd_vision::ProcessorKind::Llava);
    let _ = p.preprocess_file(&path);
});
