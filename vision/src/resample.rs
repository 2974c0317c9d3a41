//! Image resizing with the semantics of Pillow's `Image.resize` on 8-bit RGB images, which is
//! what transformers' image processors call.
//!
//! Pillow resamples separably, horizontally first, and rounds to 8 bits between the passes.
//! For a target size `out` and source size `in`, output pixel `i` is centred at
//! `(i + 0.5)·in/out` in source coordinates; when shrinking, the filter is stretched by the
//! scale factor (so it averages over all covered source pixels). Weights are normalised to
//! sum 1 and quantised to 22-bit fixed point, and each result is rounded and clamped.
//! `NEAREST` picks source pixel `⌊(i + 0.5)·in/out⌋` instead.
//! The `image` crate's filters do not stretch when shrinking and round differently, which is
//! why this is written out here.

use std::f64::consts::PI;

use anyhow::{bail, Result};

/// Pillow's resampling filters, numbered as in `PIL.Image.Resampling` (the `resample` value of
/// a `preprocessor_config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    pub fn from_pil(code: u64) -> Result<Self> {
        Ok(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            other => bail!("unknown PIL resampling filter {other} (expected 0–5)"),
        })
    }

    pub fn pil_code(self) -> u64 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    /// Half-width of the filter kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Resample::Nearest | Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn kernel(self, x: f64) -> f64 {
        match self {
            Resample::Nearest | Resample::Box => {
                if (-0.5..0.5).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => (1.0 - x.abs()).max(0.0),
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = PI * x;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Resample::Bicubic => {
                // Keys' cubic convolution with a = -0.5 (Pillow's choice).
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if x.abs() < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = PI * x;
        px.sin() / px
    }
}

/// An 8-bit interleaved RGB image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    /// `height · width · 3` bytes, row-major, RGB interleaved.
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn filled(width: usize, height: usize, color: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&color);
        }
        Self {
            width,
            height,
            data,
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Fixed-point precision of the quantised weights (Pillow's 8-bit path: 32 − 8 − 2 bits).
const PRECISION_BITS: u32 = 22;

/// For each output pixel: first source index and quantised weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i64>>,
}

fn taps(in_size: usize, out_size: usize, filter: Resample) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        // Truncation toward zero then clamping, as Pillow computes the window.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(lo as i64) as usize;
        let raw: Vec<f64> = (lo..hi)
            .map(|x| filter.kernel((x as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = raw.iter().sum();
        let unit = (1u64 << PRECISION_BITS) as f64;
        let q = raw
            .iter()
            .map(|w| {
                let w = if total != 0.0 { w / total } else { 0.0 };
                // Round half away from zero into fixed point.
                if w < 0.0 {
                    (w * unit - 0.5) as i64
                } else {
                    (w * unit + 0.5) as i64
                }
            })
            .collect();
        start.push(lo);
        weights.push(q);
    }
    Taps { start, weights }
}

fn clamp_u8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resize_horizontal(src: &Rgb8, out_w: usize, filter: Resample) -> Rgb8 {
    let t = taps(src.width, out_w, filter);
    let mut data = Vec::with_capacity(out_w * src.height * 3);
    for y in 0..src.height {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for x in 0..out_w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (k, w) in t.weights[x].iter().enumerate() {
                let p = (t.start[x] + k) * 3;
                for c in 0..3 {
                    acc[c] += row[p + c] as i64 * w;
                }
            }
            data.extend(acc.iter().map(|&a| clamp_u8(a)));
        }
    }
    Rgb8 {
        width: out_w,
        height: src.height,
        data,
    }
}

fn resize_vertical(src: &Rgb8, out_h: usize, filter: Resample) -> Rgb8 {
    let t = taps(src.height, out_h, filter);
    let stride = src.width * 3;
    let mut data = Vec::with_capacity(out_h * stride);
    for y in 0..out_h {
        for i in 0..stride {
            let mut acc = 1i64 << (PRECISION_BITS - 1);
            for (k, w) in t.weights[y].iter().enumerate() {
                acc += src.data[(t.start[y] + k) * stride + i] as i64 * w;
            }
            data.push(clamp_u8(acc));
        }
    }
    Rgb8 {
        width: src.width,
        height: out_h,
        data,
    }
}

fn resize_nearest(src: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    let pick = |i: usize, in_size: usize, out_size: usize| {
        let v = (i as f64 + 0.5) * in_size as f64 / out_size as f64;
        (v as usize).min(in_size - 1)
    };
    let mut data = Vec::with_capacity(out_w * out_h * 3);
    for y in 0..out_h {
        let sy = pick(y, src.height, out_h);
        for x in 0..out_w {
            data.extend_from_slice(&src.pixel(pick(x, src.width, out_w), sy));
        }
    }
    Rgb8 {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Resizes `src` to `out_w × out_h` as Pillow's `Image.resize(size, resample)` does.
pub fn resize(src: &Rgb8, out_w: usize, out_h: usize, filter: Resample) -> Result<Rgb8> {
    if out_w == 0 || out_h == 0 {
        bail!("cannot resize to an empty image ({out_w}×{out_h})");
    }
    if src.width == 0 || src.height == 0 {
        bail!(
            "cannot resize an empty image ({}×{})",
            src.width,
            src.height
        );
    }
    if filter == Resample::Nearest {
        return Ok(resize_nearest(src, out_w, out_h));
    }
    // An axis whose size does not change is not filtered at all.
    let horizontal = if out_w != src.width {
        resize_horizontal(src, out_w, filter)
    } else {
        src.clone()
    };
    Ok(if out_h != src.height {
        resize_vertical(&horizontal, out_h, filter)
    } else {
        horizontal
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_interpolating_at_integers() {
        for f in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Hamming,
        ] {
            assert_eq!(f.kernel(0.0), 1.0, "{f:?}");
            assert!(f.kernel(1.0).abs() < 1e-12, "{f:?}");
            assert!(f.kernel(2.0).abs() < 1e-12, "{f:?}");
        }
    }

    #[test]
    fn constant_images_stay_constant_and_identity_is_exact() {
        let img = Rgb8::filled(13, 7, [10, 200, 255]);
        for f in [
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Box,
            Resample::Nearest,
        ] {
            let out = resize(&img, 5, 11, f).unwrap();
            assert_eq!(out, Rgb8::filled(5, 11, [10, 200, 255]), "{f:?}");
        }
        let mut ramp = Rgb8::filled(4, 3, [0, 0, 0]);
        for (i, v) in ramp.data.iter_mut().enumerate() {
            *v = (i * 7) as u8;
        }
        assert_eq!(resize(&ramp, 4, 3, Resample::Bicubic).unwrap(), ramp);
    }

    #[test]
    fn box_downscale_by_two_averages_pairs() {
        let mut img = Rgb8::filled(4, 1, [0, 0, 0]);
        for (x, v) in [10u8, 20, 30, 41].iter().enumerate() {
            img.data[x * 3] = *v;
        }
        let out = resize(&img, 2, 1, Resample::Box).unwrap();
        // (10+20)/2 = 15, (30+41)/2 = 35.5 → 36 (round half up).
        assert_eq!((out.data[0], out.data[3]), (15, 36));
    }
}
