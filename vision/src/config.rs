//! Vision tower configuration as written by Hugging Face transformers: a `SiglipVisionConfig`
//! (`siglip_vision_model`), a `CLIPVisionConfig` (`clip_vision_model`), the `vision_config`
//! inside a full SigLIP/CLIP config, or the `vision_config` inside a LLaVA `config.json`.
//!
//! Keys this crate does not model are kept in `extra` so that [`VisionConfig::to_json`] writes
//! back everything that was read.

use std::path::Path;

use anyhow::{bail, Context, Result};
use mmkd_nn::Activation;
use serde_json::{Map, Value};

/// Which vision transformer family a config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionKind {
    /// SigLIP: no class token, post-layernorm on the last hidden state.
    Siglip,
    /// CLIP: class token, pre-layernorm before the encoder.
    Clip,
}

impl VisionKind {
    /// The `model_type` transformers writes for a standalone vision config of this kind.
    pub fn model_type(self) -> &'static str {
        match self {
            VisionKind::Siglip => "siglip_vision_model",
            VisionKind::Clip => "clip_vision_model",
        }
    }

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "siglip_vision_model" => Some(VisionKind::Siglip),
            "clip_vision_model" => Some(VisionKind::Clip),
            _ => None,
        }
    }
}

/// Architecture of a SigLIP or CLIP vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub kind: VisionKind,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// Keys not modelled above (`attention_dropout`, `projection_dim`, `vision_use_head`, ...),
    /// written back unchanged by [`VisionConfig::to_json`].
    pub extra: Map<String, Value>,
}

/// Keys parsed into typed fields (everything else goes to `extra`).
const KNOWN_KEYS: [&str; 10] = [
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "layer_norm_eps",
    "hidden_act",
];

impl VisionConfig {
    /// transformers' defaults for a config of `kind` (google/siglip-base-patch16-224 and
    /// openai/clip-vit-base-patch32 shapes respectively).
    pub fn defaults(kind: VisionKind) -> Self {
        match kind {
            VisionKind::Siglip => Self {
                kind,
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                image_size: 224,
                patch_size: 16,
                num_channels: 3,
                layer_norm_eps: 1e-6,
                hidden_act: Activation::GeluPytorchTanh,
                extra: Map::new(),
            },
            VisionKind::Clip => Self {
                kind,
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                image_size: 224,
                patch_size: 32,
                num_channels: 3,
                layer_norm_eps: 1e-5,
                hidden_act: Activation::QuickGelu,
                extra: Map::new(),
            },
        }
    }

    /// Parses a vision config object. Accepted `model_type`s: `siglip_vision_model`,
    /// `clip_vision_model`, `siglip`/`clip` (full dual-encoder configs: their `vision_config`
    /// is used) and `llava` (see [`VisionConfig::from_llava_config`]). Keys absent from the
    /// object take transformers' defaults; `model_type` is required.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .context("vision config must be a JSON object")?;
        let model_type = match obj.get("model_type") {
            None => bail!(
                "vision config: missing key `model_type` (expected `siglip_vision_model` or `clip_vision_model`)"
            ),
            Some(v) => v
                .as_str()
                .with_context(|| format!("vision config: `model_type` must be a string, found {v}"))?,
        };
        match model_type {
            "llava" => Self::from_llava_config(value),
            "siglip" | "clip" => {
                let kind = if model_type == "siglip" {
                    VisionKind::Siglip
                } else {
                    VisionKind::Clip
                };
                let vision = obj.get("vision_config").with_context(|| {
                    format!("`{model_type}` config: missing key `vision_config`")
                })?;
                Self::parse_with_default_kind(vision, kind)
                    .with_context(|| format!("in `vision_config` of the `{model_type}` config"))
            }
            other => match VisionKind::from_model_type(other) {
                Some(kind) => Self::parse_with_default_kind(value, kind),
                None => bail!(
                    "vision config: unsupported `model_type` `{other}` (expected `siglip_vision_model`, `clip_vision_model`, `siglip`, `clip` or `llava`)"
                ),
            },
        }
    }

    /// The vision tower of a LLaVA `config.json`. As in transformers, a `vision_config`
    /// without `model_type` is a CLIP vision config.
    pub fn from_llava_config(llava: &Value) -> Result<Self> {
        let vision = llava
            .get("vision_config")
            .context("LLaVA config: missing key `vision_config`")?;
        Self::parse_with_default_kind(vision, VisionKind::Clip)
            .context("in `vision_config` of the LLaVA config")
    }

    /// Reads a `config.json` of any kind accepted by [`VisionConfig::from_json_value`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read vision config {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json_value(&value).with_context(|| format!("in {}", path.display()))
    }

    fn parse_with_default_kind(value: &Value, default_kind: VisionKind) -> Result<Self> {
        let obj = value
            .as_object()
            .context("vision config must be a JSON object")?;
        let kind = match obj.get("model_type") {
            None => default_kind,
            Some(v) => {
                let s = v.as_str().with_context(|| {
                    format!("vision config: `model_type` must be a string, found {v}")
                })?;
                VisionKind::from_model_type(s).with_context(|| {
                    format!("vision config: unsupported `model_type` `{s}` (expected `siglip_vision_model` or `clip_vision_model`)")
                })?
            }
        };
        let d = Self::defaults(kind);
        let hidden_act = match obj.get("hidden_act") {
            None => d.hidden_act,
            Some(v) => serde_json::from_value::<Activation>(v.clone()).map_err(|_| {
                anyhow::anyhow!(
                    "vision config: unsupported `hidden_act` {v} (expected one of \"gelu\", \"gelu_pytorch_tanh\", \"gelu_new\", \"quick_gelu\", \"silu\", \"relu\")"
                )
            })?,
        };
        let extra: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let cfg = Self {
            kind,
            hidden_size: positive(obj, "hidden_size", d.hidden_size)?,
            intermediate_size: positive(obj, "intermediate_size", d.intermediate_size)?,
            num_hidden_layers: positive(obj, "num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: positive(obj, "num_attention_heads", d.num_attention_heads)?,
            image_size: positive(obj, "image_size", d.image_size)?,
            patch_size: positive(obj, "patch_size", d.patch_size)?,
            num_channels: positive(obj, "num_channels", d.num_channels)?,
            layer_norm_eps: float(obj, "layer_norm_eps", d.layer_norm_eps)?,
            hidden_act,
            extra,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between fields that the tower relies on.
    pub fn validate(&self) -> Result<()> {
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "vision config: `hidden_size` ({}) is not a multiple of `num_attention_heads` ({})",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.image_size < self.patch_size {
            bail!(
                "vision config: `image_size` ({}) is smaller than `patch_size` ({})",
                self.image_size,
                self.patch_size
            );
        }
        // Bounds far beyond any released tower: a corrupt config must not make the model
        // builder's arithmetic overflow or its allocations explode.
        for (key, value, max) in [
            (
                "image_size",
                self.image_size,
                crate::preprocess::MAX_IMAGE_SIDE,
            ),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_channels", self.num_channels, 16),
        ] {
            if value > max {
                bail!(
                    "vision config: `{key}` = {value} is beyond any vision tower (at most {max})"
                );
            }
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            bail!(
                "vision config: `layer_norm_eps` must be positive, found {}",
                self.layer_norm_eps
            );
        }
        Ok(())
    }

    /// The config as transformers writes it (standalone vision config, `extra` keys included).
    pub fn to_json(&self) -> Value {
        let mut obj = self.extra.clone();
        let act = serde_json::to_value(self.hidden_act).unwrap_or(Value::Null);
        let entries = [
            ("model_type", Value::from(self.kind.model_type())),
            ("hidden_size", Value::from(self.hidden_size)),
            ("intermediate_size", Value::from(self.intermediate_size)),
            ("num_hidden_layers", Value::from(self.num_hidden_layers)),
            ("num_attention_heads", Value::from(self.num_attention_heads)),
            ("image_size", Value::from(self.image_size)),
            ("patch_size", Value::from(self.patch_size)),
            ("num_channels", Value::from(self.num_channels)),
            ("layer_norm_eps", Value::from(self.layer_norm_eps)),
            ("hidden_act", act),
        ];
        for (k, v) in entries {
            obj.insert(k.to_string(), v);
        }
        Value::Object(obj)
    }

    /// Patches per side (`image_size / patch_size`, rounded down as the strided conv does).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of patch tokens per image.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Tokens the encoder sees per image: patches, plus the class token for CLIP.
    pub fn num_positions(&self) -> usize {
        match self.kind {
            VisionKind::Siglip => self.num_patches(),
            VisionKind::Clip => self.num_patches() + 1,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

fn positive(obj: &Map<String, Value>, key: &str, default: usize) -> Result<usize> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(n as usize),
            _ => bail!("vision config: `{key}` must be a positive integer, found {v}"),
        },
    }
}

fn float(obj: &Map<String, Value>, key: &str, default: f64) -> Result<f64> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .with_context(|| format!("vision config: `{key}` must be a number, found {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_follow_the_model_type() {
        let s =
            VisionConfig::from_json_value(&json!({"model_type": "siglip_vision_model"})).unwrap();
        assert_eq!(s, VisionConfig::defaults(VisionKind::Siglip));
        let c = VisionConfig::from_json_value(&json!({"model_type": "clip_vision_model"})).unwrap();
        assert_eq!(
            (c.patch_size, c.hidden_act, c.layer_norm_eps),
            (32, Activation::QuickGelu, 1e-5)
        );
        assert_eq!(c.num_positions(), 50);
    }

    #[test]
    fn llava_vision_config_without_model_type_is_clip() {
        let llava = json!({"model_type": "llava", "vision_config": {"hidden_size": 64, "num_attention_heads": 4}});
        let c = VisionConfig::from_json_value(&llava).unwrap();
        assert_eq!((c.kind, c.hidden_size), (VisionKind::Clip, 64));
        let full = json!({"model_type": "siglip", "vision_config": {"hidden_size": 64, "num_attention_heads": 4}});
        let s = VisionConfig::from_json_value(&full).unwrap();
        assert_eq!(
            (s.kind, s.hidden_size, s.patch_size),
            (VisionKind::Siglip, 64, 16)
        );
        let err = format!(
            "{:#}",
            VisionConfig::from_json_value(&json!({"model_type": "llava"})).unwrap_err()
        );
        assert!(err.contains("`vision_config`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = format!(
            "{:#}",
            VisionConfig::from_json_value(
                &json!({"model_type": "clip_vision_model", "patch_size": "8"})
            )
            .unwrap_err()
        );
        assert!(
            err.contains("`patch_size`") && err.contains("\"8\""),
            "{err}"
        );
        let err = format!(
            "{:#}",
            VisionConfig::from_json_value(&json!({"model_type": "clip_vision_model", "hidden_size": 30, "num_attention_heads": 4}))
                .unwrap_err()
        );
        assert!(
            err.contains("`hidden_size` (30)") && err.contains("`num_attention_heads` (4)"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            VisionConfig::from_json_value(&json!({"model_type": "vit"})).unwrap_err()
        );
        assert!(err.contains("unsupported `model_type` `vit`"), "{err}");
    }
}
