//! `preprocessor_config.json`: an [`ImageProcessor`] read from and written as transformers'
//! image-processor config, with the class defaults for absent or `null` keys.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::preprocess::{
    ImageProcessor, ProcessorKind, ResizeTo, MAX_IMAGE_SIDE, PREPROCESSOR_CONFIG,
};
use crate::resample::Resample;

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
        let largest = match self.size {
            ResizeTo::Exact { height, width } => height.max(width),
            ResizeTo::ShortestEdge { shortest, longest } => shortest.max(longest.unwrap_or(0)),
        }
        .max(self.crop_size.map_or(0, |(h, w)| h.max(w)));
        if largest > MAX_IMAGE_SIDE {
            bail!(
                "image processor config: `size`/`crop_size` of {largest} pixels is beyond the \
                 {MAX_IMAGE_SIDE} an image side may have"
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
