//! Image preprocessing against transformers 5.24's PIL-backend processors.

mod common;

use candle_core::Device;
use common::{fixtures, load_tensors, read_json};
use mmkd_vision::{load_image, to_tensor, ImageProcessor, ProcessorKind};

/// Allowed deviation from transformers, in 0–255 pixel levels (|Δ| · std · 255).
const MAX_LEVELS: f32 = 3.0;
/// From a lossless file the 8-bit pipeline reproduces Pillow exactly; only f32 rounding remains.
const MAX_LEVELS_LOSSLESS: f32 = 0.01;

/// Max deviation in pixel levels of `ours` from `expected` (`[3, H, W]`), per channel std.
fn deviation_levels(
    ours: &ndarray::Array3<f32>,
    expected: &candle_core::Tensor,
    std: [f64; 3],
) -> f32 {
    let exp = expected.to_vec3::<f32>().unwrap();
    assert_eq!(
        ours.shape(),
        &[exp.len(), exp[0].len(), exp[0][0].len()],
        "output shape differs from transformers"
    );
    let mut worst = 0f32;
    for ((c, y, x), v) in ours.indexed_iter() {
        let d = (v - exp[c][y][x]).abs() * std[c] as f32 * 255.0;
        worst = worst.max(d);
    }
    worst
}

#[test]
fn every_processor_variant_matches_transformers_within_three_levels() {
    let cases = read_json("preprocess_cases.json");
    let main = load_tensors("preprocess_expected.safetensors");
    let upscale = load_tensors("preprocess_upscale.safetensors");
    let mut report = Vec::new();
    for case in cases.as_array().unwrap() {
        let proc_dir = fixtures().join(case["processor"].as_str().unwrap());
        let image = case["image"].as_str().unwrap();
        let key = case["key"].as_str().unwrap();
        let expected = match case.get("file").and_then(|f| f.as_str()) {
            Some("preprocess_upscale.safetensors") => &upscale[key],
            _ => &main[key],
        };
        let processor = ImageProcessor::from_dir(&proc_dir).unwrap();
        let ours = processor
            .preprocess_file(&fixtures().join("images").join(image))
            .unwrap();
        let dims = expected.dims();
        assert_eq!(
            processor.output_size(61, 97),
            (dims[1], dims[2]),
            "{key}: output_size"
        );
        let levels = deviation_levels(&ours, expected, processor.image_std);
        report.push(format!("{key}: max {levels:.3} levels"));
        assert!(
            levels <= MAX_LEVELS,
            "{key}: {levels} pixel levels from transformers"
        );
        // JPEG decoders (libjpeg in Pillow, zune-jpeg here) differ slightly; PNG must be exact.
        if image.ends_with(".png") {
            assert!(
                levels <= MAX_LEVELS_LOSSLESS,
                "{key}: {levels} pixel levels from transformers"
            );
        }
    }
    // The filters really differ on this image, so matching each one means using the right one.
    let box_vs_hamming = (&main["siglip_box/photo.png"] - &main["siglip_hamming/photo.png"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        box_vs_hamming * 0.5 * 255.0 > 3.0 * MAX_LEVELS,
        "{box_vs_hamming}"
    );
    // Printed with `cargo test -- --nocapture`; the figures go into reports.
    println!(
        "deviation from transformers (0-255 levels):\n  {}",
        report.join("\n  ")
    );
}

#[test]
fn llava_pad_to_square_uses_the_truncated_mean_colour() {
    let p = ImageProcessor::from_dir(&fixtures().join("pre_llava_pad")).unwrap();
    assert_eq!((p.kind, p.do_pad), (ProcessorKind::Llava, true));
    // A 2×1 white image padded to 2×2: it stays on row ⌊(2−1)/2⌋ = 0, row 1 is the mean colour
    // int(mean·255) = (122, 116, 104).
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        2,
        1,
        image::Rgb([255, 255, 255]),
    ));
    let no_resize = ImageProcessor {
        do_resize: false,
        do_center_crop: false,
        do_normalize: false,
        ..p
    };
    let out = no_resize.preprocess(&img).unwrap();
    assert_eq!(out.shape(), &[3, 2, 2]);
    let expected_row1 = [122.0 / 255.0, 116.0 / 255.0, 104.0 / 255.0];
    for (c, e) in expected_row1.iter().enumerate() {
        for x in 0..2 {
            assert!(
                (out[[c, 1, x]] - e).abs() < 1e-6,
                "channel {c}: {} vs {e}",
                out[[c, 1, x]]
            );
            assert!((out[[c, 0, x]] - 1.0).abs() < 1e-6);
        }
    }
}

#[test]
fn saved_config_reloads_identically_and_keeps_unknown_keys() {
    for name in ["pre_siglip", "pre_clip", "pre_llava_pad", "pre_clip_capped"] {
        let dir = fixtures().join(name);
        let original: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        let p = ImageProcessor::from_dir(&dir).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        p.save(tmp.path()).unwrap();
        let back = ImageProcessor::from_dir(tmp.path()).unwrap();
        assert_eq!(back, p, "{name}");
        // transformers wrote every key explicitly, so the saved file is the same JSON.
        let saved: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved, original, "{name}");
    }
}

#[test]
fn batches_stack_in_order() {
    let p = ImageProcessor::from_dir(&fixtures().join("pre_siglip")).unwrap();
    let a = p
        .preprocess_file(&fixtures().join("images/photo.png"))
        .unwrap();
    let b = p
        .preprocess_file(&fixtures().join("images/photo_gray.png"))
        .unwrap();
    let t = to_tensor(&[a.clone(), b.clone()], &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 32, 32]);
    let second = t.get(1).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(second[2][5][7], b[[2, 5, 7]]);
    assert_eq!(
        t.get(0).unwrap().to_vec3::<f32>().unwrap()[0][31][0],
        a[[0, 31, 0]]
    );
}

#[test]
fn unreadable_images_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.png");
    let err = format!("{:#}", load_image(&missing).unwrap_err());
    assert!(
        err.contains("nope.png") && err.contains("cannot open image"),
        "{err}"
    );

    let truncated = fixtures().join("images/truncated.png");
    let err = format!("{:#}", load_image(&truncated).unwrap_err());
    assert!(
        err.contains("truncated.png") && err.contains("cannot decode image"),
        "{err}"
    );

    let text = dir.path().join("notes.png");
    std::fs::write(&text, "this is not an image").unwrap();
    let err = format!("{:#}", load_image(&text).unwrap_err());
    assert!(
        err.contains("notes.png") && err.contains("cannot decode image"),
        "{err}"
    );

    let unknown = dir.path().join("notes.dat");
    std::fs::write(&unknown, "this is not an image").unwrap();
    let err = format!("{:#}", load_image(&unknown).unwrap_err());
    assert!(
        err.contains("notes.dat") && err.contains("unsupported image format"),
        "{err}"
    );

    // TIFF is recognised but not compiled in.
    let tiff = dir.path().join("scan.tiff");
    std::fs::write(&tiff, b"II*\0\x08\0\0\0").unwrap();
    let err = format!("{:#}", load_image(&tiff).unwrap_err());
    assert!(
        err.contains("scan.tiff") && err.to_lowercase().contains("not supported"),
        "{err}"
    );

    let p = ImageProcessor::from_dir(&fixtures().join("pre_clip")).unwrap();
    let err = format!("{:#}", p.preprocess_file(&truncated).unwrap_err());
    assert!(err.contains("truncated.png"), "{err}");
}

#[test]
fn missing_processor_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", ImageProcessor::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("preprocessor_config.json"), "{err}");
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"image_processor_type": "CLIPImageProcessor", "image_std": [0.5, 0.5]}"#,
    )
    .unwrap();
    let err = format!("{:#}", ImageProcessor::from_dir(dir.path()).unwrap_err());
    assert!(
        err.contains("`image_std`") && err.contains("preprocessor_config.json"),
        "{err}"
    );
}

#[test]
fn exif_orientation_is_applied_by_the_one_loader_training_and_evaluation_share() {
    // A 6×2 JPEG stored sideways (EXIF orientation 6); shown as transformers shows it, 2×6
    // with its red end at the top (make_exif_fixture.py).
    let path = fixtures().join("images/exif_orientation_6.jpg");
    let for_training = mmkd_datasets::load_image(&path).unwrap().to_rgb8();
    let for_eval = load_image(&path).unwrap().to_rgb8();
    assert_eq!(for_training.dimensions(), (2, 6));
    assert_eq!(for_training.as_raw(), for_eval.as_raw());
    let (top, bottom) = (for_training.get_pixel(0, 0), for_training.get_pixel(1, 5));
    assert!(top[0] > 200 && top[2] < 60, "top is not red: {top:?}");
    assert!(
        bottom[2] > 200 && bottom[0] < 60,
        "bottom is not blue: {bottom:?}"
    );
}
