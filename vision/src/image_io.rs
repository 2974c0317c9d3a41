//! Reading image files and converting them to 8-bit RGB.

use std::path::Path;

use anyhow::{anyhow, Result};
use image::DynamicImage;
use mmkd_datasets::ProblemKind;

use crate::resample::Rgb8;

/// Decodes an image file (PNG, JPEG, BMP, GIF, WebP), applying its EXIF orientation as
/// transformers' `load_image` does: `mmkd_datasets::load_image`, the one loader training and
/// evaluation share, with errors that name the file and what went wrong.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    mmkd_datasets::load_image(path).map_err(|fault| {
        let what = match fault.kind {
            ProblemKind::MissingImage => "cannot open image",
            ProblemKind::UnsupportedImage => {
                return anyhow!(
                    "cannot decode image {}: unsupported image format ({}); supported: PNG, \
                     JPEG, BMP, GIF, WebP",
                    fault.path,
                    fault.reason
                )
            }
            _ => "cannot decode image",
        };
        anyhow!("{what} {}: {}", fault.path, fault.reason)
    })
}

/// Converts to 8-bit RGB as transformers' `convert_to_rgb` does: grayscale is replicated,
/// palette images are expanded, and transparency is composited onto a white background.
pub fn to_rgb8(img: &DynamicImage) -> Rgb8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut data = Vec::with_capacity(width * height * 3);
        for px in rgba.pixels() {
            let a = px[3] as u32;
            for c in 0..3 {
                // c·α + 255·(1 − α), rounded: "over" onto opaque white.
                let v = px[c] as u32 * a + 255 * (255 - a);
                data.push(((v + 127) / 255) as u8);
            }
        }
        data
    } else {
        img.to_rgb8().into_raw()
    };
    Rgb8 {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgba, RgbaImage};

    #[test]
    fn grayscale_is_replicated_and_alpha_goes_onto_white() {
        let gray = DynamicImage::ImageLuma8(GrayImage::from_pixel(2, 1, Luma([77])));
        assert_eq!(to_rgb8(&gray).data, vec![77; 6]);
        let mut rgba = RgbaImage::new(3, 1);
        rgba.put_pixel(0, 0, Rgba([10, 20, 30, 255]));
        rgba.put_pixel(1, 0, Rgba([10, 20, 30, 0]));
        rgba.put_pixel(2, 0, Rgba([0, 100, 255, 128]));
        let out = to_rgb8(&DynamicImage::ImageRgba8(rgba));
        // 0·128/255 + 255·127/255 = 127; 100·128/255 + 127 = 177.2; 255 stays 255.
        assert_eq!(out.data, vec![10, 20, 30, 255, 255, 255, 127, 177, 255]);
    }
}
