//! The LLaVA multimodal projector: `linear` or `mlp{N}x_gelu`, with LLaVA's weight names
//! (`multi_modal_projector.linear_1`, `linear_2`, …).

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use mmkd_nn::{Activation, Linear, ParamBuilder};
use serde::{Deserialize, Serialize};

/// Projector architecture, in LLaVA's `mm_projector_type` spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorKind {
    /// One linear map (LLaVA-1.0). transformers' Llava class cannot load it (it always builds two layers).
    Linear,
    /// `depth` linear layers with the activation between them (`mlp2x_gelu` = LLaVA-1.5).
    Mlp { depth: usize },
}

impl ProjectorKind {
    pub fn parse(name: &str) -> Result<Self> {
        if name == "linear" {
            return Ok(Self::Linear);
        }
        let depth = name
            .strip_prefix("mlp")
            .and_then(|rest| rest.strip_suffix("x_gelu"))
            .and_then(|d| d.parse::<usize>().ok())
            .with_context(|| {
                format!("unknown projector type `{name}` (expected `linear` or `mlp{{N}}x_gelu`)")
            })?;
        if depth == 0 {
            bail!("projector type `{name}` has no layers");
        }
        Ok(Self::Mlp { depth })
    }

    pub fn name(&self) -> String {
        match self {
            Self::Linear => "linear".into(),
            Self::Mlp { depth } => format!("mlp{depth}x_gelu"),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Self::Linear => 1,
            Self::Mlp { depth } => *depth,
        }
    }
}

impl Serialize for ProjectorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for ProjectorKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::parse(&name).map_err(serde::de::Error::custom)
    }
}

pub struct Projector {
    layers: Vec<Linear>,
    act: Activation,
}

impl Projector {
    pub fn new(
        pb: &ParamBuilder,
        kind: ProjectorKind,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        act: Activation,
    ) -> Result<Self> {
        let layers = (0..kind.depth())
            .map(|i| {
                let input = if i == 0 { in_dim } else { out_dim };
                // Kaiming-uniform-like scale keeps fresh projector outputs near unit size.
                let std = (1.0 / input as f32).sqrt();
                Ok(Linear::new(
                    &pb.pp(format!("linear_{}", i + 1)),
                    input,
                    out_dim,
                    bias,
                    std,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, act })
    }

    /// `[n, tokens, in_dim]` → `[n, tokens, out_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                h = self.act.forward(&h)?;
            }
            h = layer.forward(&h)?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llava_names() {
        assert_eq!(
            ProjectorKind::parse("linear").unwrap(),
            ProjectorKind::Linear
        );
        assert_eq!(
            ProjectorKind::parse("mlp2x_gelu").unwrap(),
            ProjectorKind::Mlp { depth: 2 }
        );
        let err = ProjectorKind::parse("qformer").unwrap_err().to_string();
        assert!(err.contains("qformer"), "{err}");
    }
}
