//! Image preprocessing as transformers' PIL-backend image processors do it
//! (`SiglipImageProcessor`, `CLIPImageProcessor`, `LlavaImageProcessor`), configured by a
//! `preprocessor_config.json`.
//!
//! Pipeline, in 8-bit until the rescale as in transformers: RGB conversion → (LLaVA `do_pad`)
//! pad to square with the mean colour → resize (Pillow semantics, see [`crate::resample`]) →
//! center crop → rescale (`x · rescale_factor`, f64 then f32) → normalize (`(x − mean) / std`
//! in f32).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::DynamicImage;
use ndarray::Array3;
use serde_json::{Map, Value};

use crate::config::{VisionConfig, VisionKind};
use crate::geometry::{center_crop, pad_to_square};
use crate::image_io::{load_image, to_rgb8};
use crate::resample::{resize, Resample, Rgb8};

/// The largest image side a processor may produce (or be configured for): far beyond any
/// vision tower's input, and it bounds what a corrupt config can make preprocessing allocate.
pub const MAX_IMAGE_SIDE: usize = 8192;
/// File name of an image processor config inside a model directory.
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// Which transformers image processor class a config describes (they differ in defaults, and
/// LLaVA's adds pad-to-square).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessorKind {
    Siglip,
    Clip,
    Llava,
}

impl ProcessorKind {
    pub fn class_name(self) -> &'static str {
        match self {
            ProcessorKind::Siglip => "SiglipImageProcessor",
            ProcessorKind::Clip => "CLIPImageProcessor",
            ProcessorKind::Llava => "LlavaImageProcessor",
        }
    }

    /// Accepts the class names with transformers' backend suffixes (`…Pil`, `…Fast`) and the
    /// legacy `CLIPFeatureExtractor`.
    pub(crate) fn from_class_name(name: &str) -> Option<Self> {
        let base = name
            .strip_suffix("Pil")
            .or_else(|| name.strip_suffix("Fast"))
            .unwrap_or(name);
        match base {
            "SiglipImageProcessor" => Some(ProcessorKind::Siglip),
            "CLIPImageProcessor" | "CLIPFeatureExtractor" => Some(ProcessorKind::Clip),
            "LlavaImageProcessor" => Some(ProcessorKind::Llava),
            _ => None,
        }
    }
}

/// Target of the resize step (`size` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTo {
    /// `{"height", "width"}`: exactly this size.
    Exact { height: usize, width: usize },
    /// `{"shortest_edge"}` (optionally with `"longest_edge"`): keep the aspect ratio.
    ShortestEdge {
        shortest: usize,
        longest: Option<usize>,
    },
}

impl ResizeTo {
    /// Output `(height, width)` for an input of `(height, width)`, with transformers' integer
    /// truncations.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match *self {
            ResizeTo::Exact { height, width } => (height, width),
            ResizeTo::ShortestEdge {
                shortest,
                longest: None,
            } => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = (shortest * long) as f64 / short as f64;
                let new_long = new_long as usize;
                if width <= height {
                    (new_long, shortest)
                } else {
                    (shortest, new_long)
                }
            }
            ResizeTo::ShortestEdge {
                shortest,
                longest: Some(max),
            } => size_with_aspect_ratio(height, width, shortest, max),
        }
    }

    pub(crate) fn to_json(self) -> Value {
        let mut m = Map::new();
        match self {
            ResizeTo::Exact { height, width } => {
                m.insert("height".into(), height.into());
                m.insert("width".into(), width.into());
            }
            ResizeTo::ShortestEdge { shortest, longest } => {
                m.insert("shortest_edge".into(), shortest.into());
                if let Some(l) = longest {
                    m.insert("longest_edge".into(), l.into());
                }
            }
        }
        Value::Object(m)
    }
}

/// transformers' `get_size_with_aspect_ratio` (shortest edge capped by a longest edge).
fn size_with_aspect_ratio(height: usize, width: usize, size: usize, max: usize) -> (usize, usize) {
    let (h, w) = (height as f64, width as f64);
    let (min_orig, max_orig) = (h.min(w), h.max(w));
    let mut size = size;
    let mut raw = None;
    if max_orig / min_orig * size as f64 > max as f64 {
        let r = max as f64 * min_orig / max_orig;
        raw = Some(r);
        size = r.round_ties_even() as usize;
    }
    if (height <= width && height == size) || (width <= height && width == size) {
        return (height, width);
    }
    let scaled = |num: f64, den: f64| match raw {
        Some(r) => (r * num / den) as usize,
        None => (size as f64 * num / den) as usize,
    };
    if width < height {
        (scaled(h, w), size)
    } else {
        (size, scaled(w, h))
    }
}

/// An image processor: turns decoded images into normalised `[3, H, W]` pixel arrays.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub kind: ProcessorKind,
    pub do_convert_rgb: bool,
    /// LLaVA only: pad to a square with the mean colour before resizing.
    pub do_pad: bool,
    pub do_resize: bool,
    pub size: ResizeTo,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// `(height, width)`; required when `do_center_crop`.
    pub crop_size: Option<(usize, usize)>,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Keys not modelled above (`image_processor_type`, `processor_class`, ...), written back
    /// unchanged.
    pub extra: Map<String, Value>,
}

impl ImageProcessor {
    /// The class defaults of `kind` in transformers 5.
    pub fn defaults(kind: ProcessorKind) -> Self {
        let (mean, std) = match kind {
            ProcessorKind::Siglip => (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
            ProcessorKind::Clip | ProcessorKind::Llava => (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        };
        let (size, crop) = match kind {
            ProcessorKind::Siglip => (
                ResizeTo::Exact {
                    height: 224,
                    width: 224,
                },
                None,
            ),
            ProcessorKind::Clip | ProcessorKind::Llava => (
                ResizeTo::ShortestEdge {
                    shortest: 224,
                    longest: None,
                },
                Some((224, 224)),
            ),
        };
        let mut extra = Map::new();
        extra.insert("image_processor_type".into(), kind.class_name().into());
        Self {
            kind,
            do_convert_rgb: true,
            do_pad: false,
            do_resize: true,
            size,
            resample: Resample::Bicubic,
            do_center_crop: kind != ProcessorKind::Siglip,
            crop_size: crop,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: mean,
            image_std: std,
            extra,
        }
    }

    /// The processor transformers pairs with a freshly created tower of `cfg`: SigLIP resizes
    /// to `image_size`², CLIP resizes the shortest edge to `image_size` and center-crops.
    pub fn for_tower(cfg: &VisionConfig) -> Self {
        let s = cfg.image_size;
        match cfg.kind {
            VisionKind::Siglip => Self {
                size: ResizeTo::Exact {
                    height: s,
                    width: s,
                },
                ..Self::defaults(ProcessorKind::Siglip)
            },
            VisionKind::Clip => Self {
                size: ResizeTo::ShortestEdge {
                    shortest: s,
                    longest: None,
                },
                crop_size: Some((s, s)),
                ..Self::defaults(ProcessorKind::Clip)
            },
        }
    }

    /// `(height, width)` of the arrays [`ImageProcessor::preprocess`] returns for an input of
    /// `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (mut h, mut w) = (height, width);
        if self.do_pad && self.kind == ProcessorKind::Llava {
            let side = h.max(w);
            (h, w) = (side, side);
        }
        if self.do_resize {
            (h, w) = self.size.output_size(h, w);
        }
        match (self.do_center_crop, self.crop_size) {
            (true, Some(crop)) => crop,
            _ => (h, w),
        }
    }

    /// Preprocesses one decoded image into a `[3, H, W]` array.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Array3<f32>> {
        let mut rgb = if self.do_convert_rgb {
            to_rgb8(img)
        } else {
            match img {
                DynamicImage::ImageRgb8(buf) => Rgb8 {
                    width: buf.width() as usize,
                    height: buf.height() as usize,
                    data: buf.as_raw().clone(),
                },
                other => bail!(
                    "image is {:?}, not 8-bit RGB, and the processor's `do_convert_rgb` is false",
                    other.color()
                ),
            }
        };
        if rgb.width == 0 || rgb.height == 0 {
            bail!("image is empty ({}×{})", rgb.width, rgb.height);
        }
        if self.do_pad && self.kind == ProcessorKind::Llava {
            rgb = pad_to_square(&rgb, self.pad_color());
        }
        if self.do_resize {
            let (h, w) = self.size.output_size(rgb.height, rgb.width);
            // A shortest-edge resize of a very long, thin image could ask for gigabytes.
            if h.max(w) > MAX_IMAGE_SIDE {
                bail!(
                    "resizing the {}×{} image gives {w}×{h}, beyond the {MAX_IMAGE_SIDE} pixels \
                     an image side may have",
                    rgb.width,
                    rgb.height
                );
            }
            if (h, w) != (rgb.height, rgb.width) {
                rgb = resize(&rgb, w, h, self.resample)?;
            }
        }
        if let (true, Some((h, w))) = (self.do_center_crop, self.crop_size) {
            rgb = center_crop(&rgb, h, w);
        }
        Ok(self.to_normalized_array(&rgb))
    }

    /// Loads and preprocesses an image file; errors name the file.
    pub fn preprocess_file(&self, path: &Path) -> Result<Array3<f32>> {
        let img = load_image(path)?;
        self.preprocess(&img)
            .with_context(|| format!("preprocessing image {}", path.display()))
    }

    /// LLaVA's padding colour: the mean scaled to 0–255 and truncated.
    fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    fn to_normalized_array(&self, rgb: &Rgb8) -> Array3<f32> {
        let (h, w) = (rgb.height, rgb.width);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        Array3::from_shape_fn((3, h, w), |(c, y, x)| {
            let v = rgb.data[(y * w + x) * 3 + c];
            let mut v = if self.do_rescale {
                (v as f64 * self.rescale_factor) as f32
            } else {
                v as f32
            };
            if self.do_normalize {
                v = (v - mean[c]) / std[c];
            }
            v
        })
    }
}

/// Stacks preprocessed images into a `[n, 3, H, W]` f32 tensor.
pub fn to_tensor(images: &[Array3<f32>], device: &Device) -> Result<Tensor> {
    let first = images.first().context("no images to stack")?;
    let shape = first.shape().to_vec();
    let mut data = Vec::with_capacity(images.len() * first.len());
    for (i, img) in images.iter().enumerate() {
        if img.shape() != shape.as_slice() {
            bail!(
                "image {i} has shape {:?}, image 0 has {:?}: a batch needs one size",
                img.shape(),
                shape
            );
        }
        // `iter` walks in logical (row-major) order whatever the memory layout.
        data.extend(img.iter().copied());
    }
    let t = Tensor::from_vec(data, (images.len(), shape[0], shape[1], shape[2]), device)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_truncate_like_transformers() {
        let s = ResizeTo::ShortestEdge {
            shortest: 40,
            longest: None,
        };
        // 61 high × 97 wide: width = int(40·97/61) = int(63.6) = 63.
        assert_eq!(s.output_size(61, 97), (40, 63));
        assert_eq!(s.output_size(97, 61), (63, 40));
        let capped = ResizeTo::ShortestEdge {
            shortest: 40,
            longest: Some(50),
        };
        // 97/61·40 > 50 → raw = 50·61/97 = 31.44 → short side round(31.44) = 31, long int(31.44·97/61) = 50.
        assert_eq!(capped.output_size(61, 97), (31, 50));
    }

    #[test]
    fn center_crop_pads_small_images_with_zeros() {
        let mut img = Rgb8::filled(3, 2, [9, 9, 9]);
        img.data[0] = 1;
        let out = center_crop(&img, 4, 2);
        // Height 2 → 4: pad ⌈2/2⌉ = 1 row on top; width 3 → 2: start at ⌊1/2⌋ = 0.
        assert_eq!((out.width, out.height), (2, 4));
        assert_eq!(out.pixel(0, 0), [0, 0, 0]);
        assert_eq!(out.pixel(0, 1), [1, 9, 9]);
        assert_eq!(out.pixel(1, 2), [9, 9, 9]);
        assert_eq!(out.pixel(1, 3), [0, 0, 0]);
    }

    #[test]
    fn stacking_checks_shapes() {
        let a = Array3::<f32>::from_shape_fn((3, 2, 2), |(c, y, x)| (c * 4 + y * 2 + x) as f32);
        let t = to_tensor(&[a.clone(), a.clone()], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2, 2]);
        assert_eq!(
            t.get(1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            a.iter().copied().collect::<Vec<_>>()
        );
        let b = Array3::<f32>::zeros((3, 2, 3));
        let err = to_tensor(&[a, b], &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("image 1 has shape [3, 2, 3]"), "{err}");
    }
}
