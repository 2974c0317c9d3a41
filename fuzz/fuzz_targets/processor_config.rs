#![no_main]
//! `preprocessor_config.json` / `processor_config.json`, then preprocessing an image with it.
use std::sync::OnceLock;

fn image() -> &'static std::path::Path {
    static IMAGE: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let img =
            image::RgbImage::from_fn(37, 23, |x, y| image::Rgb([x as u8 * 7, y as u8 * 11, 128]));
        let path = mmkd_fuzz::scratch().join("image.png");
        img.save(&path).expect("writing the test image");
        path
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = mmkd_fuzz::scratch().join("processor");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("preprocessor_config.json"), data).unwrap();
    if let Ok(p) = mmkd::checkpoint::bundle::load_processor(&dir) {
        let _ = p.preprocess_file(image());
    }
});
