//! A term as a preset writes it (`[[stages.<stage>.objective]]`), and the built-in stages'
//! objectives.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::terms::TermKind;
use crate::distill::align::Alignment;
use crate::distill::{DistillLossConfig, Divergence};

/// One `[[stages.<stage>.objective]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermSpec {
    /// The registered term (`ce`, `mdist.response`, `mdist.visual`, `rdist`).
    pub term: String,
    /// Its weight in the objective (0 turns it off).
    #[serde(default = "one")]
    pub weight: f64,
    /// The name it is logged under in metrics.jsonl, summary.json and loss.png (default: the
    /// term's own, e.g. `l_res` for `mdist.response`). Needed when a term appears twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Divergence of a distribution term (default: `[distill] divergence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence: Option<Divergence>,
    /// Softmax temperature of a distribution term (default: `[distill] temperature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Multiply a distribution term by T² (default: `[distill] t2_scaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t2_scaling: Option<bool>,
    /// `hidden`: the student → teacher layer pairs, `[[student, teacher], ...]` (0 = the input
    /// embeddings, i = after decoder layer i); default: student layer i to teacher layer
    /// round(i·L_t/L_s) for every student layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<[usize; 2]>>,
    /// `hidden`: how a pair of hidden states is compared (default `mse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance: Option<HiddenDistance>,
    /// `hidden`: the positions compared (default `response`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<TermPositions>,
    /// `hidden`: weight the layer pairs by their current losses instead of equally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<bool>,
    /// `uld`: how the two distributions are matched (default `sorted`, ULD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_match: Option<VocabMatch>,
    /// `uld`: how two tokenizations of a response are paired (default `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment: Option<Alignment>,
    /// `gkd`: β of the generalized JSD (0: forward KL, 1: reverse KL; default 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// `minillm.long`: the PPO clip range ε of the importance ratio (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f64>,
}

/// How a cross-tokenizer term matches the teacher's distribution with the student's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocabMatch {
    /// ULD: both distributions sorted, compared rank by rank (no vocabulary mapping).
    #[default]
    Sorted,
    /// The term's divergence over the token strings both vocabularies hold.
    Exact,
}

/// How a term compares two hidden states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenDistance {
    /// Mean squared difference over the rows and the width.
    #[default]
    Mse,
    /// 1 − cosine similarity per row, averaged.
    Cosine,
}

/// The positions a term reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TermPositions {
    /// The positions that predict a response token.
    #[default]
    Response,
    /// The image-token positions.
    Visual,
    /// Both.
    Both,
}

/// A term's resolved settings: its divergence settings over the `[distill]` defaults, and its
/// own entry for the options only it reads.
#[derive(Clone, Debug)]
pub struct TermConfig {
    pub loss: DistillLossConfig,
    pub spec: TermSpec,
}

fn one() -> f64 {
    1.0
}

impl TermSpec {
    pub fn new(term: &str, weight: f64) -> Self {
        Self {
            term: term.into(),
            weight,
            name: None,
            divergence: None,
            temperature: None,
            t2_scaling: None,
            layers: None,
            distance: None,
            positions: None,
            dynamic: None,
            vocab_match: None,
            alignment: None,
            beta: None,
            clip: None,
        }
    }

    /// The objective of a built-in stage: cross-entropy alone, or (distilling) LLaVA-KD's
    /// L_ce + α·L_res + β·L_vis + γ·L_rel with the `[distill]` weights.
    pub fn builtin(distills: bool, distill: &DistillLossConfig) -> Vec<TermSpec> {
        let mut terms = vec![TermSpec::new("ce", 1.0)];
        if distills {
            terms.extend([
                TermSpec::new("mdist.response", distill.alpha_res),
                TermSpec::new("mdist.visual", distill.beta_vis),
                TermSpec::new("rdist", distill.gamma_rel),
            ]);
        }
        terms
    }

    /// The settings of this term: its divergence options over `defaults`, and its own; options
    /// the term does not take are errors naming the ones it does.
    pub(super) fn resolve(
        &self,
        kind: &TermKind,
        defaults: &DistillLossConfig,
    ) -> Result<TermConfig> {
        let mut takes = vec!["term", "weight", "name"];
        if kind.divergence_options {
            takes.extend(["divergence", "temperature", "t2_scaling"]);
        }
        takes.extend(kind.options);
        for (option, set) in [
            ("divergence", self.divergence.is_some()),
            ("temperature", self.temperature.is_some()),
            ("t2_scaling", self.t2_scaling.is_some()),
            ("layers", self.layers.is_some()),
            ("distance", self.distance.is_some()),
            ("positions", self.positions.is_some()),
            ("dynamic", self.dynamic.is_some()),
            ("vocab_match", self.vocab_match.is_some()),
            ("alignment", self.alignment.is_some()),
            ("beta", self.beta.is_some()),
            ("clip", self.clip.is_some()),
        ] {
            if set && !takes.contains(&option) {
                bail!(
                    "objective term `{}` takes no `{option}` (its options: {})",
                    self.term,
                    takes.join(", ")
                );
            }
        }
        let loss = DistillLossConfig {
            divergence: self.divergence.unwrap_or(defaults.divergence),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            t2_scaling: self.t2_scaling.unwrap_or(defaults.t2_scaling),
            ..defaults.clone()
        };
        loss.validate()?;
        Ok(TermConfig {
            loss,
            spec: self.clone(),
        })
    }
}
