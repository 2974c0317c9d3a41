//! The geometric steps of image preprocessing: padding to a square and transformers'
//! centre crop, on 8-bit RGB pixels.

use crate::resample::Rgb8;

/// Centers `img` on a square canvas of its longer side filled with `color`.
pub(crate) fn pad_to_square(img: &Rgb8, color: [u8; 3]) -> Rgb8 {
    let side = img.width.max(img.height);
    if img.width == img.height {
        return img.clone();
    }
    let mut out = Rgb8::filled(side, side, color);
    let (x0, y0) = ((side - img.width) / 2, (side - img.height) / 2);
    for y in 0..img.height {
        let src = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let start = ((y + y0) * side + x0) * 3;
        out.data[start..start + src.len()].copy_from_slice(src);
    }
    out
}

/// transformers' `center_crop`: the crop window starts at `⌊(size − crop)/2⌋`; where the image
/// is smaller than the crop it is first centred on a zero canvas (offset `⌈(crop − size)/2⌉`).
pub(crate) fn center_crop(img: &Rgb8, crop_h: usize, crop_w: usize) -> Rgb8 {
    // Offset of the image inside the output along one axis (may be negative = cropped away).
    let offset = |size: usize, crop: usize| -> i64 {
        let (size, crop) = (size as i64, crop as i64);
        if crop <= size {
            -((size - crop).div_euclid(2))
        } else {
            // Padded by ⌈(crop − size)/2⌉, then cropped from ⌊(size − crop)/2⌋ + pad = 0.
            (crop - size + 1) / 2
        }
    };
    let (oy, ox) = (offset(img.height, crop_h), offset(img.width, crop_w));
    let mut out = Rgb8::filled(crop_w, crop_h, [0, 0, 0]);
    for y in 0..crop_h {
        let sy = y as i64 - oy;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..crop_w {
            let sx = x as i64 - ox;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let src = (sy as usize * img.width + sx as usize) * 3;
            let dst = (y * crop_w + x) * 3;
            out.data[dst..dst + 3].copy_from_slice(&img.data[src..src + 3]);
        }
    }
    out
}
