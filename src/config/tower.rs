//! The `[tower]` table of a preset: how `mmkd tower` (and the demo) pre-train a vision encoder
//! before any LLaVA stage.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Document;

/// What the tower learns from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TowerObjective {
    /// The shapes world's ground truth: per patch token, linear heads classify the shape,
    /// colour and size in the patch's grid cell (`scenes.jsonl`).
    Labels,
    /// SigLIP's sigmoid image–text loss against a small text encoder trained alongside, on
    /// the captions of LLaVA pre-training data: any image–text data.
    Contrastive,
}

impl TowerObjective {
    pub fn name(self) -> &'static str {
        match self {
            TowerObjective::Labels => "labels",
            TowerObjective::Contrastive => "contrastive",
        }
    }
}

/// The small text encoder of the contrastive objective (thrown away after training): a
/// Qwen2-style decoder whose last caption token, projected, is the caption's embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextEncoderSettings {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Width of the shared image–text embedding space.
    pub embed_dim: usize,
    /// Caption tokens kept (longer captions are cut and counted).
    pub max_length: usize,
}

impl Default for TextEncoderSettings {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            embed_dim: 64,
            max_length: 64,
        }
    }
}

/// `[tower]`: the vision pre-training stage. The tower's architecture and image processor are
/// the preset's `models.<role>` (role `teacher` unless `--role` says otherwise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TowerSettings {
    pub objective: TowerObjective,
    /// Passes over the data (ignored when `max_steps` is set).
    pub epochs: usize,
    pub max_steps: Option<usize>,
    /// AdamW's learning rate, constant.
    pub lr: f64,
    pub batch_size: usize,
    /// RMS per element of the selected features after the final rescaling (see `mmkd tower`).
    pub feature_rms: f64,
    /// Seed of the data order (`--seed`); the tower's initial weights: `models.<role>.seed`.
    pub seed: u64,
    /// Resumable checkpoint every N steps (0: none).
    pub save_every: usize,
    pub keep_last: usize,
    /// SigLIP's initial logit scale t′ (the scale is exp t′; the paper: log 10).
    pub init_logit_scale: f64,
    /// SigLIP's initial logit bias b (the paper: −10).
    pub init_logit_bias: f64,
    pub text: TextEncoderSettings,
}

impl Default for TowerSettings {
    fn default() -> Self {
        Self {
            objective: TowerObjective::Contrastive,
            epochs: 1,
            max_steps: None,
            lr: 1e-3,
            batch_size: 32,
            feature_rms: 1.0,
            seed: 0,
            save_every: 0,
            keep_last: 2,
            init_logit_scale: 10f64.ln(),
            init_logit_bias: -10.0,
            text: TextEncoderSettings::default(),
        }
    }
}

impl TowerSettings {
    /// The preset's `[tower]` table (defaults where it has none).
    pub fn resolve(doc: &Document) -> Result<Self> {
        let origin = doc.origin.first().cloned().unwrap_or_default();
        let settings: TowerSettings = match doc.table.get("tower") {
            Some(table) => table
                .clone()
                .try_into()
                .with_context(|| format!("{origin}: in [tower]"))?,
            None => TowerSettings::default(),
        };
        settings
            .check()
            .with_context(|| format!("{origin}: in [tower]"))?;
        Ok(settings)
    }

    fn check(&self) -> Result<()> {
        anyhow::ensure!(self.batch_size > 0, "batch_size must be ≥ 1");
        anyhow::ensure!(
            self.max_steps.is_some() || self.epochs > 0,
            "epochs must be ≥ 1 (or set max_steps)"
        );
        anyhow::ensure!(
            self.max_steps != Some(0),
            "max_steps must be ≥ 1 when it is set"
        );
        anyhow::ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "lr must be a positive number, got {}",
            self.lr
        );
        anyhow::ensure!(
            self.feature_rms.is_finite() && self.feature_rms > 0.0,
            "feature_rms must be a positive number, got {}",
            self.feature_rms
        );
        anyhow::ensure!(
            self.init_logit_scale.is_finite() && self.init_logit_bias.is_finite(),
            "init_logit_scale and init_logit_bias must be finite"
        );
        let t = &self.text;
        anyhow::ensure!(
            t.hidden_size > 0
                && t.num_attention_heads > 0
                && t.hidden_size.is_multiple_of(t.num_attention_heads),
            "text.hidden_size ({}) must be a positive multiple of text.num_attention_heads ({})",
            t.hidden_size,
            t.num_attention_heads
        );
        anyhow::ensure!(
            t.num_hidden_layers > 0 && t.intermediate_size > 0 && t.embed_dim > 0,
            "text.num_hidden_layers, text.intermediate_size and text.embed_dim must be ≥ 1"
        );
        anyhow::ensure!(t.max_length >= 1, "text.max_length must be ≥ 1");
        Ok(())
    }

    pub fn as_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_document;

    #[test]
    fn defaults_apply_where_the_preset_is_silent_and_bad_values_name_the_table() {
        let mut doc = load_document("shapes-tiny").unwrap();
        doc.set("tower.objective=\"contrastive\"").unwrap();
        doc.set("tower.text.embed_dim=16").unwrap();
        let settings = TowerSettings::resolve(&doc).unwrap();
        assert_eq!(settings.objective, TowerObjective::Contrastive);
        assert_eq!(settings.text.embed_dim, 16);
        assert_eq!(settings.text.max_length, 64);

        doc.set("tower.batch_size=0").unwrap();
        let err = format!("{:#}", TowerSettings::resolve(&doc).unwrap_err());
        assert!(
            err.contains("in [tower]") && err.contains("batch_size"),
            "{err}"
        );

        let mut doc = load_document("shapes-tiny").unwrap();
        doc.set("tower.objective=\"pixels\"").unwrap();
        let err = format!("{:#}", TowerSettings::resolve(&doc).unwrap_err());
        assert!(err.contains("pixels") && err.contains("labels"), "{err}");
    }
}
