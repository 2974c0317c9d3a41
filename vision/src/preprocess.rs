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
    fn from_class_name(name: &str) -> Option<Self> {
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

    fn to_json(self) -> Value {
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

/// Keys parsed into typed fields.
const KNOWN_KEYS: [&str; 13] = [
    "do_convert_rgb",
    "do_pad",
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "default_to_square",
];

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

    /// Parses a `preprocessor_config.json` object. `image_processor_type` (or the legacy
    /// `feature_extractor_type`) picks the class defaults; `null` values mean "class default"
    /// as in transformers.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .context("image processor config must be a JSON object")?;
        let type_key = ["image_processor_type", "feature_extractor_type"]
            .into_iter()
            .find(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
            .context("image processor config: missing key `image_processor_type`")?;
        let class = obj[type_key].as_str().with_context(|| {
            format!(
                "image processor config: `{type_key}` must be a string, found {}",
                obj[type_key]
            )
        })?;
        let kind = ProcessorKind::from_class_name(class).with_context(|| {
            format!("image processor config: unsupported `{type_key}` `{class}` (supported: SiglipImageProcessor, CLIPImageProcessor, LlavaImageProcessor)")
        })?;
        let d = Self::defaults(kind);
        let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let flag = |k: &str, default: bool| -> Result<bool> {
            match present(k) {
                None => Ok(default),
                Some(v) => v.as_bool().with_context(|| {
                    format!("image processor config: `{k}` must be true or false, found {v}")
                }),
            }
        };
        let default_to_square = flag("default_to_square", false)?;
        let size = match present("size") {
            None => d.size,
            Some(v) => parse_size(v, default_to_square)?,
        };
        let crop_size = match present("crop_size") {
            None => d.crop_size,
            Some(v) => match parse_size(v, true)? {
                ResizeTo::Exact { height, width } => Some((height, width)),
                ResizeTo::ShortestEdge { .. } => bail!(
                    "image processor config: `crop_size` must have `height` and `width`, found {v}"
                ),
            },
        };
        let resample = match present("resample") {
            None => d.resample,
            Some(v) => {
                let code = v.as_u64().with_context(|| {
                    format!("image processor config: `resample` must be a PIL filter number 0–5, found {v}")
                })?;
                Resample::from_pil(code).context("image processor config: `resample`")?
            }
        };
        let rescale_factor = match present("rescale_factor") {
            None => d.rescale_factor,
            Some(v) => v.as_f64().with_context(|| {
                format!("image processor config: `rescale_factor` must be a number, found {v}")
            })?,
        };
        let mut extra: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // `default_to_square` only matters for an integer `size`, which is written back as a
        // dict; keep it so the saved config stays as it was read.
        if let Some(v) = obj.get("default_to_square") {
            extra.insert("default_to_square".into(), v.clone());
        }
        let p = Self {
            kind,
            do_convert_rgb: flag("do_convert_rgb", d.do_convert_rgb)?,
            do_pad: flag("do_pad", d.do_pad)?,
            do_resize: flag("do_resize", d.do_resize)?,
            size,
            resample,
            do_center_crop: flag("do_center_crop", d.do_center_crop)?,
            crop_size,
            do_rescale: flag("do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: flag("do_normalize", d.do_normalize)?,
            image_mean: match present("image_mean") {
                None => d.image_mean,
                Some(v) => parse_triplet(v, "image_mean")?,
            },
            image_std: match present("image_std") {
                None => d.image_std,
                Some(v) => parse_triplet(v, "image_std")?,
            },
            extra,
        };
        p.validate()?;
        Ok(p)
    }

    /// Reads a `preprocessor_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read image processor config {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json_value(&value).with_context(|| format!("in {}", path.display()))
    }

    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(PREPROCESSOR_CONFIG))
    }

    fn validate(&self) -> Result<()> {
        if self.do_center_crop && self.crop_size.is_none() {
            bail!("image processor config: `do_center_crop` is true but `crop_size` is not set");
        }
        if let Some(i) = self.image_std.iter().position(|s| *s == 0.0) {
            bail!("image processor config: `image_std[{i}]` is 0");
        }
        let zero = match self.size {
            ResizeTo::Exact { height, width } => height == 0 || width == 0,
            ResizeTo::ShortestEdge { shortest, longest } => shortest == 0 || longest == Some(0),
        };
        if zero || self.crop_size.is_some_and(|(h, w)| h == 0 || w == 0) {
            bail!("image processor config: `size` and `crop_size` must be positive");
        }
        Ok(())
    }

    /// The config as a `preprocessor_config.json` object.
    pub fn to_json(&self) -> Value {
        let mut obj = self.extra.clone();
        if !obj.contains_key("image_processor_type") && !obj.contains_key("feature_extractor_type")
        {
            obj.insert("image_processor_type".into(), self.kind.class_name().into());
        }
        let mut put = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        put("do_convert_rgb", self.do_convert_rgb.into());
        if self.kind == ProcessorKind::Llava || self.do_pad {
            put("do_pad", self.do_pad.into());
        }
        put("do_resize", self.do_resize.into());
        put("size", self.size.to_json());
        put("resample", self.resample.pil_code().into());
        // SigLIP's class leaves `do_center_crop` unset; keep it that way when there is no crop.
        if self.do_center_crop || self.crop_size.is_some() {
            put("do_center_crop", self.do_center_crop.into());
        }
        if let Some((h, w)) = self.crop_size {
            put(
                "crop_size",
                ResizeTo::Exact {
                    height: h,
                    width: w,
                }
                .to_json(),
            );
        }
        put("do_rescale", self.do_rescale.into());
        put("rescale_factor", self.rescale_factor.into());
        put("do_normalize", self.do_normalize.into());
        put("image_mean", self.image_mean.to_vec().into());
        put("image_std", self.image_std.to_vec().into());
        Value::Object(obj)
    }

    /// Writes `dir/preprocessor_config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
        let path = dir.join(PREPROCESSOR_CONFIG);
        let text = serde_json::to_string_pretty(&self.to_json())?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
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

/// `size`/`crop_size` from an int, a `[height, width]` list or a dict.
fn parse_size(v: &Value, default_to_square: bool) -> Result<ResizeTo> {
    let dim = |x: &Value, what: &str| -> Result<usize> {
        x.as_u64().map(|n| n as usize).with_context(|| {
            format!("image processor config: `{what}` must be a non-negative integer, found {x}")
        })
    };
    match v {
        Value::Number(_) => {
            let n = dim(v, "size")?;
            Ok(if default_to_square {
                ResizeTo::Exact {
                    height: n,
                    width: n,
                }
            } else {
                ResizeTo::ShortestEdge {
                    shortest: n,
                    longest: None,
                }
            })
        }
        Value::Array(items) if items.len() == 2 => Ok(ResizeTo::Exact {
            height: dim(&items[0], "size[0]")?,
            width: dim(&items[1], "size[1]")?,
        }),
        Value::Object(m) => {
            let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
            keys.sort_unstable();
            match keys.as_slice() {
                ["height", "width"] => Ok(ResizeTo::Exact {
                    height: dim(&m["height"], "height")?,
                    width: dim(&m["width"], "width")?,
                }),
                ["shortest_edge"] => Ok(ResizeTo::ShortestEdge {
                    shortest: dim(&m["shortest_edge"], "shortest_edge")?,
                    longest: None,
                }),
                ["longest_edge", "shortest_edge"] => Ok(ResizeTo::ShortestEdge {
                    shortest: dim(&m["shortest_edge"], "shortest_edge")?,
                    longest: Some(dim(&m["longest_edge"], "longest_edge")?),
                }),
                _ => bail!(
                    "image processor config: size {v} is not supported (use {{\"height\", \"width\"}}, {{\"shortest_edge\"}} or {{\"shortest_edge\", \"longest_edge\"}})"
                ),
            }
        }
        _ => bail!("image processor config: size {v} must be an integer, a [height, width] list or an object"),
    }
}

fn parse_triplet(v: &Value, key: &str) -> Result<[f64; 3]> {
    let num = |x: &Value| {
        x.as_f64().with_context(|| {
            format!("image processor config: `{key}` must hold numbers, found {v}")
        })
    };
    match v {
        Value::Number(_) => {
            let x = num(v)?;
            Ok([x; 3])
        }
        Value::Array(items) if items.len() == 3 => {
            Ok([num(&items[0])?, num(&items[1])?, num(&items[2])?])
        }
        _ => bail!(
            "image processor config: `{key}` must be a number or a list of 3 numbers, found {v}"
        ),
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
    use serde_json::json;

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
    fn config_round_trips_and_legacy_forms_parse() {
        let legacy = json!({"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336, "resample": 3});
        let p = ImageProcessor::from_json_value(&legacy).unwrap();
        assert_eq!(p.kind, ProcessorKind::Clip);
        assert_eq!(
            p.size,
            ResizeTo::ShortestEdge {
                shortest: 336,
                longest: None
            }
        );
        assert_eq!(p.crop_size, Some((336, 336)));
        let back = ImageProcessor::from_json_value(&p.to_json()).unwrap();
        assert_eq!(back, p);

        let err = ImageProcessor::from_json_value(&json!({"size": 3}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`image_processor_type`"), "{err}");
        let err =
            ImageProcessor::from_json_value(&json!({"image_processor_type": "ViTImageProcessor"}))
                .unwrap_err()
                .to_string();
        assert!(err.contains("ViTImageProcessor"), "{err}");
        let err = ImageProcessor::from_json_value(&json!({"image_processor_type": "SiglipImageProcessor", "size": {"max_height": 3, "max_width": 4}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_height"), "{err}");
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
