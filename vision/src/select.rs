//! LLaVA's choice of which vision hidden states become image features
//! (`vision_feature_layer`, `vision_feature_select_strategy`).
//!
//! As in transformers' `LlavaModel.get_image_features`: each listed hidden state is taken,
//! the strategy is applied to it (`default` drops the first token whatever the tower — for
//! SigLIP that is a real patch), and the results are concatenated along the feature dimension.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::Value;

use crate::config::VisionConfig;
use crate::tower::{VisionOutput, VisionTower};

/// Index (Python-style, negative counts from the end) into the `num_hidden_layers + 1` hidden
/// states, or a list of them whose features are concatenated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureLayers {
    Single(i64),
    Concat(Vec<i64>),
}

/// `vision_feature_select_strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the first token of every selected hidden state.
    Default,
    /// Keep every token.
    Full,
}

impl SelectStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            SelectStrategy::Default => "default",
            SelectStrategy::Full => "full",
        }
    }
}

/// How image features are taken from a vision tower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureSelect {
    pub layers: FeatureLayers,
    pub strategy: SelectStrategy,
}

impl Default for FeatureSelect {
    /// transformers' `LlavaConfig` defaults: layer -2, strategy `default`.
    fn default() -> Self {
        Self {
            layers: FeatureLayers::Single(-2),
            strategy: SelectStrategy::Default,
        }
    }
}

impl FeatureSelect {
    /// Reads `vision_feature_layer` (int or list of ints) and `vision_feature_select_strategy`
    /// from a LLaVA `config.json`; absent keys take transformers' defaults.
    pub fn from_llava_config(llava: &Value) -> Result<Self> {
        let d = Self::default();
        let layers = match llava.get("vision_feature_layer") {
            None => d.layers,
            Some(v) => parse_layers(v)?,
        };
        let strategy = match llava.get("vision_feature_select_strategy") {
            None => d.strategy,
            Some(Value::String(s)) if s == "default" => SelectStrategy::Default,
            Some(Value::String(s)) if s == "full" => SelectStrategy::Full,
            Some(v) => bail!(
                "LLaVA config: `vision_feature_select_strategy` must be \"default\" or \"full\", found {v}"
            ),
        };
        Ok(Self { layers, strategy })
    }

    /// The two LLaVA config entries this selection is stored as.
    pub fn to_llava_entries(&self) -> [(&'static str, Value); 2] {
        let layers = match &self.layers {
            FeatureLayers::Single(i) => Value::from(*i),
            FeatureLayers::Concat(v) => Value::from(v.clone()),
        };
        [
            ("vision_feature_layer", layers),
            (
                "vision_feature_select_strategy",
                Value::from(self.strategy.as_str()),
            ),
        ]
    }

    fn layer_list(&self) -> &[i64] {
        match &self.layers {
            FeatureLayers::Single(i) => std::slice::from_ref(i),
            FeatureLayers::Concat(v) => v,
        }
    }

    /// The selected hidden-state positions among `num_hidden_states`, in selection order.
    pub fn resolve(&self, num_hidden_states: usize) -> Result<Vec<usize>> {
        let n = num_hidden_states as i64;
        self.layer_list()
            .iter()
            .map(|&i| {
                let j = if i < 0 { i + n } else { i };
                if (0..n).contains(&j) {
                    Ok(j as usize)
                } else {
                    bail!(
                        "vision_feature_layer {i} is out of range: the vision tower has {num_hidden_states} hidden states (embeddings + {} layers)",
                        num_hidden_states.saturating_sub(1)
                    )
                }
            })
            .collect()
    }

    /// Image features `[n, tokens_per_image, feature_dim]` from a full tower output.
    pub fn select(&self, out: &VisionOutput) -> Result<Tensor> {
        self.select_from(&out.hidden_states, out.hidden_states.len())
    }

    /// Like [`FeatureSelect::select`] but runs only the encoder layers the selection needs.
    pub fn features(&self, tower: &VisionTower, pixel_values: &Tensor) -> Result<Tensor> {
        let total = tower.config().num_hidden_layers + 1;
        let needed = self
            .resolve(total)?
            .into_iter()
            .max()
            .context("vision_feature_layer is an empty list")?;
        let states = tower.hidden_states(pixel_values, needed)?;
        self.select_from(&states, total)
    }

    /// `states` holds the first hidden states of a tower that has `total` of them.
    fn select_from(&self, states: &[Tensor], total: usize) -> Result<Tensor> {
        let picked = self
            .resolve(total)?
            .into_iter()
            .map(|i| {
                let h = states
                    .get(i)
                    .with_context(|| format!("hidden state {i} was not computed"))?;
                Ok(match self.strategy {
                    SelectStrategy::Default => {
                        let t = h.dim(1)?;
                        if t < 2 {
                            bail!("strategy `default` drops the first token, but hidden state {i} has only {t}");
                        }
                        h.narrow(1, 1, t - 1)?
                    }
                    SelectStrategy::Full => h.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        match picked.as_slice() {
            [] => bail!("vision_feature_layer is an empty list"),
            [one] => Ok(one.clone()),
            many => Ok(Tensor::cat(many, candle_core::D::Minus1)?),
        }
    }

    /// Image tokens each image contributes to the language model's sequence.
    pub fn tokens_per_image(&self, cfg: &VisionConfig) -> usize {
        match self.strategy {
            SelectStrategy::Default => cfg.num_positions() - 1,
            SelectStrategy::Full => cfg.num_positions(),
        }
    }

    /// Width of each image feature (the projector's input size).
    pub fn feature_dim(&self, cfg: &VisionConfig) -> usize {
        cfg.hidden_size * self.layer_list().len()
    }
}

fn parse_layers(v: &Value) -> Result<FeatureLayers> {
    let int = |x: &Value| {
        x.as_i64().with_context(|| {
            format!("LLaVA config: `vision_feature_layer` must be an integer or a list of integers, found {v}")
        })
    };
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                bail!("LLaVA config: `vision_feature_layer` is an empty list");
            }
            Ok(FeatureLayers::Concat(
                items.iter().map(int).collect::<Result<_>>()?,
            ))
        }
        other => Ok(FeatureLayers::Single(int(other)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VisionKind;
    use serde_json::json;

    #[test]
    fn parses_llava_entries_and_counts_tokens() {
        let sel = FeatureSelect::from_llava_config(&json!({
            "vision_feature_layer": [-2, 0], "vision_feature_select_strategy": "full"
        }))
        .unwrap();
        assert_eq!(sel.layers, FeatureLayers::Concat(vec![-2, 0]));
        assert_eq!(sel.resolve(3).unwrap(), vec![1, 0]);
        let cfg = VisionConfig::defaults(VisionKind::Siglip);
        assert_eq!(sel.tokens_per_image(&cfg), 196);
        assert_eq!(sel.feature_dim(&cfg), 1536);
        let back = json!({
            sel.to_llava_entries()[0].0: sel.to_llava_entries()[0].1.clone(),
            sel.to_llava_entries()[1].0: sel.to_llava_entries()[1].1.clone(),
        });
        assert_eq!(FeatureSelect::from_llava_config(&back).unwrap(), sel);

        let d = FeatureSelect::from_llava_config(&json!({})).unwrap();
        assert_eq!(d, FeatureSelect::default());
        // Default strategy drops the first token for SigLIP too (196 → 195), CLIP drops CLS.
        assert_eq!(d.tokens_per_image(&cfg), 195);
        assert_eq!(
            d.tokens_per_image(&VisionConfig::defaults(VisionKind::Clip)),
            49
        );
    }

    #[test]
    fn bad_entries_are_errors() {
        let err =
            FeatureSelect::from_llava_config(&json!({"vision_feature_select_strategy": "cls"}))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("vision_feature_select_strategy") && err.contains("cls"),
            "{err}"
        );
        let err = FeatureSelect::from_llava_config(&json!({"vision_feature_layer": [-1, "x"]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vision_feature_layer"), "{err}");
        let sel = FeatureSelect {
            layers: FeatureLayers::Single(-4),
            strategy: SelectStrategy::Full,
        };
        let err = sel.resolve(3).unwrap_err().to_string();
        assert!(
            err.contains("-4 is out of range") && err.contains("3 hidden states"),
            "{err}"
        );
    }
}
