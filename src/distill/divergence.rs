//! Token-level divergences between the teacher's and the student's next-token distributions.
//!
//! Conventions (every formula below is per row, over the vocabulary):
//! - p = softmax(teacher_logits / T) (the target, never differentiated),
//!   q = softmax(student_logits / T) (the distribution being trained).
//! - KL(a‖b) = Σ a·(log a − log b).
//! - The optional T² factor (Hinton) is not applied here; see
//!   [`DistillLossConfig::t2_scaling`](crate::distill::DistillLossConfig).
//!
//! In a TOML preset a divergence is either a bare name, which takes the default parameter
//! (`divergence = "forward_kl"`, `divergence = "jsd"` → β = 0.5, `"skew_forward_kl"` → α = 0.1),
//! or a table (`divergence = { kind = "jsd", beta = 0.9 }`,
//! `divergence = { kind = "skew_reverse_kl", alpha = 0.2 }`, `divergence = { kind = "dbild",
//! max_k = 32 }`). On the command line the same is written `jsd:0.9`, `dbild:32` (see
//! [`Divergence::from_str`](std::str::FromStr)).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::dbild::{dbild_rows, DEFAULT_DBILD_MAX_K};
use super::logprob::{compute_dtype, kl_rows, log_mixture, log_softmax};

/// Default β of the generalized JSD when only its name is given.
pub const DEFAULT_JSD_BETA: f64 = 0.5;
/// Default α of the skew KL divergences (DistiLLM's value).
pub const DEFAULT_SKEW_ALPHA: f64 = 0.1;

/// A divergence D(p, q) between teacher p and student q.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DivergenceSpec", into = "DivergenceSpec")]
pub enum Divergence {
    /// KL(p‖q): mode-covering, LLaVA-KD's choice.
    #[default]
    ForwardKl,
    /// KL(q‖p): mode-seeking (MiniLLM).
    ReverseKl,
    /// Generalized Jensen–Shannon divergence (GKD), with the mixture m = β·p + (1−β)·q:
    /// JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m), β ∈ [0, 1].
    ///
    /// As in TRL, the end points are defined by their normalised limits: β = 0 is forward
    /// KL(p‖q) (= lim JSD_β/β) and β = 1 is reverse KL(q‖p) (= lim JSD_β/(1−β)); the plain
    /// formula would give 0 there. β = 0.5 is the ordinary JSD.
    GeneralizedJsd { beta: f64 },
    /// Total variation distance ½·Σ|p − q|, bounded in [0, 1].
    TotalVariation,
    /// Skew KL (DistiLLM): KL(p ‖ α·p + (1−α)·q), α ∈ [0, 1); α = 0 is forward KL.
    SkewForwardKl { alpha: f64 },
    /// Skew reverse KL (DistiLLM): KL(q ‖ α·q + (1−α)·p), α ∈ [0, 1); α = 0 is reverse KL.
    SkewReverseKl { alpha: f64 },
    /// Switch-KD's dynamic bi-directional logits difference: reverse KL between the softmaxed
    /// pairwise logit differences of the teacher's and of the student's knee-chosen top-k
    /// (k ≤ `max_k`), see [`super::dbild`]. It reads the teacher at the student's top ids, so
    /// it needs the teacher's full logits (an online teacher).
    Dbild { max_k: usize },
}

impl Divergence {
    /// Checks the parameter ranges (β ∈ [0, 1], α ∈ [0, 1)).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Divergence::GeneralizedJsd { beta } => {
                ensure!((0.0..=1.0).contains(&beta), "jsd: `beta` must be in [0, 1], got {beta}")
            }
            Divergence::SkewForwardKl { alpha } | Divergence::SkewReverseKl { alpha } => ensure!(
                (0.0..1.0).contains(&alpha),
                "{}: `alpha` must be in [0, 1) (alpha = 1 makes the divergence identically 0), got {alpha}",
                self.name()
            ),
            Divergence::Dbild { max_k } => {
                ensure!(max_k >= 3, "dbild: `max_k` must be at least 3, got {max_k}")
            }
            Divergence::ForwardKl | Divergence::ReverseKl | Divergence::TotalVariation => {}
        }
        Ok(())
    }

    /// The canonical name used in presets and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Divergence::ForwardKl => "forward_kl",
            Divergence::ReverseKl => "reverse_kl",
            Divergence::GeneralizedJsd { .. } => "jsd",
            Divergence::TotalVariation => "total_variation",
            Divergence::SkewForwardKl { .. } => "skew_forward_kl",
            Divergence::SkewReverseKl { .. } => "skew_reverse_kl",
            Divergence::Dbild { .. } => "dbild",
        }
    }

    /// Whether the divergence reads the teacher beyond its top-k (a cache cannot serve it).
    pub fn needs_full_teacher(&self) -> bool {
        matches!(self, Divergence::Dbild { .. })
    }

    /// The divergence of every row: `student_logits` and `teacher_logits` are `[N, V]`, the
    /// result is `[N]` in f32 (f64 when the student logits are f64). The teacher logits are
    /// detached, so gradients reach the student only. Rows are divided by `temperature`
    /// before the softmax.
    pub fn per_token(
        &self,
        student_logits: &Tensor,
        teacher_logits: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        self.validate()?;
        ensure!(
            temperature.is_finite() && temperature > 0.0,
            "distillation temperature must be a positive number, got {temperature}"
        );
        ensure!(
            student_logits.rank() == 2 && student_logits.dims() == teacher_logits.dims(),
            "{}: student logits {:?} and teacher logits {:?} must both be [rows, vocab]",
            self.name(),
            student_logits.dims(),
            teacher_logits.dims()
        );
        self.rows(student_logits, teacher_logits, temperature)
            .with_context(|| format!("computing the {} divergence", self.name()))
    }

    fn rows(
        &self,
        student_logits: &Tensor,
        teacher_logits: &Tensor,
        temperature: f64,
    ) -> candle_core::Result<Tensor> {
        let dtype = compute_dtype(student_logits);
        let scale = 1.0 / temperature;
        // At T = 1 the scaling is the identity: skip the two copies it would make.
        let scaled = |x: Tensor| {
            if scale == 1.0 {
                Ok(x)
            } else {
                x.affine(scale, 0.0)
            }
        };
        let s = scaled(student_logits.to_dtype(dtype)?)?;
        let t = scaled(teacher_logits.detach().to_dtype(dtype)?)?;
        let divergence = self.without_degenerate_mixture();
        if divergence == Divergence::ForwardKl {
            // One fused pass per row, with the exact gradient q − p (see mmkd_nn::fused).
            return mmkd_nn::fused::forward_kl_rows(&s, &t);
        }
        if let Divergence::Dbild { max_k } = divergence {
            return dbild_rows(&s, &t, max_k).map_err(candle_core::Error::wrap);
        }
        let log_q = log_softmax(&s)?;
        let log_p = log_softmax(&t)?;
        match divergence {
            Divergence::ForwardKl => kl_rows(&log_p.exp()?, &log_p, &log_q),
            Divergence::ReverseKl => kl_rows(&log_q.exp()?, &log_q, &log_p),
            Divergence::GeneralizedJsd { beta } => {
                let log_m = log_mixture(&log_p, beta, &log_q, 1.0 - beta)?;
                let to_teacher = kl_rows(&log_p.exp()?, &log_p, &log_m)?;
                let to_student = kl_rows(&log_q.exp()?, &log_q, &log_m)?;
                to_teacher
                    .affine(beta, 0.0)?
                    .add(&to_student.affine(1.0 - beta, 0.0)?)
            }
            Divergence::TotalVariation => log_p
                .exp()?
                .sub(&log_q.exp()?)?
                .abs()?
                .sum(D::Minus1)?
                .affine(0.5, 0.0),
            Divergence::SkewForwardKl { alpha } => {
                let log_m = log_mixture(&log_p, alpha, &log_q, 1.0 - alpha)?;
                kl_rows(&log_p.exp()?, &log_p, &log_m)
            }
            Divergence::SkewReverseKl { alpha } => {
                let log_m = log_mixture(&log_q, alpha, &log_p, 1.0 - alpha)?;
                kl_rows(&log_q.exp()?, &log_q, &log_m)
            }
            Divergence::Dbild { .. } => unreachable!("computed above"),
        }
    }

    /// The same divergence with end points whose mixture weight is 0 written as the plain KL
    /// they equal (by definition for JSD, exactly for skew KL), so log-mixtures never see
    /// log 0.
    fn without_degenerate_mixture(&self) -> Divergence {
        match *self {
            Divergence::GeneralizedJsd { beta: 0.0 } => Divergence::ForwardKl,
            Divergence::GeneralizedJsd { beta: 1.0 } => Divergence::ReverseKl,
            Divergence::SkewForwardKl { alpha: 0.0 } => Divergence::ForwardKl,
            Divergence::SkewReverseKl { alpha: 0.0 } => Divergence::ReverseKl,
            other => other,
        }
    }

    fn parameter(&self) -> Option<(&'static str, f64)> {
        match *self {
            Divergence::GeneralizedJsd { beta } => Some(("beta", beta)),
            Divergence::SkewForwardKl { alpha } | Divergence::SkewReverseKl { alpha } => {
                Some(("alpha", alpha))
            }
            Divergence::Dbild { max_k } => Some(("max_k", max_k as f64)),
            _ => None,
        }
    }

    /// Builds a divergence from its name (aliases accepted) and optional parameter.
    fn from_parts(
        kind: &str,
        beta: Option<f64>,
        alpha: Option<f64>,
        max_k: Option<usize>,
    ) -> Result<Self> {
        let no_param = |d: Divergence| -> Result<Divergence> {
            ensure!(
                beta.is_none() && alpha.is_none() && max_k.is_none(),
                "divergence `{kind}` takes no `beta`, `alpha` or `max_k`"
            );
            Ok(d)
        };
        ensure!(
            max_k.is_none() || kind == "dbild",
            "divergence `{kind}` takes no `max_k` (only dbild does)"
        );
        let divergence = match kind {
            "forward_kl" | "kl" => no_param(Divergence::ForwardKl)?,
            "reverse_kl" => no_param(Divergence::ReverseKl)?,
            "total_variation" | "tvd" => no_param(Divergence::TotalVariation)?,
            "jsd" | "generalized_jsd" => {
                ensure!(
                    alpha.is_none(),
                    "divergence `jsd` takes `beta`, not `alpha`"
                );
                Divergence::GeneralizedJsd {
                    beta: beta.unwrap_or(DEFAULT_JSD_BETA),
                }
            }
            "skew_forward_kl" | "skew_kl" | "skew_reverse_kl" => {
                ensure!(
                    beta.is_none(),
                    "divergence `{kind}` takes `alpha`, not `beta`"
                );
                let alpha = alpha.unwrap_or(DEFAULT_SKEW_ALPHA);
                if kind == "skew_reverse_kl" {
                    Divergence::SkewReverseKl { alpha }
                } else {
                    Divergence::SkewForwardKl { alpha }
                }
            }
            "dbild" => {
                ensure!(
                    beta.is_none() && alpha.is_none(),
                    "divergence `dbild` takes `max_k`, not `beta` or `alpha`"
                );
                Divergence::Dbild {
                    max_k: max_k.unwrap_or(DEFAULT_DBILD_MAX_K),
                }
            }
            other => bail!(
                "unknown divergence `{other}`; expected one of forward_kl, reverse_kl, jsd, \
                 total_variation, skew_forward_kl, skew_reverse_kl, dbild"
            ),
        };
        divergence.validate()?;
        Ok(divergence)
    }
}

/// `forward_kl`, `reverse_kl`, `total_variation`, `jsd`, `jsd:0.9`, `skew_forward_kl:0.1`, ...
impl FromStr for Divergence {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, param) = match s.split_once(':') {
            Some((kind, p)) => {
                let value: f64 = p
                    .trim()
                    .parse()
                    .with_context(|| format!("divergence `{s}`: `{p}` is not a number"))?;
                (kind.trim(), Some(value))
            }
            None => (s.trim(), None),
        };
        let (beta, alpha, max_k) = match kind {
            "jsd" | "generalized_jsd" => (param, None, None),
            "skew_forward_kl" | "skew_kl" | "skew_reverse_kl" => (None, param, None),
            "dbild" => {
                let max_k = param
                    .map(|k| {
                        ensure!(
                            k.fract() == 0.0 && k >= 0.0,
                            "divergence `{s}`: `max_k` must be a whole number"
                        );
                        Ok(k as usize)
                    })
                    .transpose()?;
                (None, None, max_k)
            }
            _ if param.is_some() => bail!("divergence `{kind}` takes no parameter (got `{s}`)"),
            _ => (None, None, None),
        };
        Self::from_parts(kind, beta, alpha, max_k)
    }
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parameter() {
            Some((_, value)) => write!(f, "{}:{value}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// The serialised form: a bare name or a `{ kind, beta | alpha }` table.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum DivergenceSpec {
    Name(String),
    Table(DivergenceTable),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DivergenceTable {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    beta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_k: Option<usize>,
}

impl TryFrom<DivergenceSpec> for Divergence {
    type Error = String;

    fn try_from(spec: DivergenceSpec) -> std::result::Result<Self, String> {
        let parsed = match &spec {
            DivergenceSpec::Name(name) => Divergence::from_parts(name, None, None, None),
            DivergenceSpec::Table(t) => Divergence::from_parts(&t.kind, t.beta, t.alpha, t.max_k),
        };
        parsed.map_err(|e| format!("{e:#}"))
    }
}

impl From<Divergence> for DivergenceSpec {
    fn from(d: Divergence) -> Self {
        match d.parameter() {
            None => DivergenceSpec::Name(d.name().to_string()),
            Some((key, value)) => DivergenceSpec::Table(DivergenceTable {
                kind: d.name().to_string(),
                beta: (key == "beta").then_some(value),
                alpha: (key == "alpha").then_some(value),
                max_k: (key == "max_k").then_some(value as usize),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use mmkd_nn::grad_check::gradients;

    #[derive(Debug, Deserialize, Serialize)]
    struct Preset {
        divergence: Divergence,
    }

    fn parse(toml_text: &str) -> std::result::Result<Divergence, String> {
        toml::from_str::<Preset>(toml_text)
            .map(|p| p.divergence)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn toml_names_and_tables() {
        assert_eq!(
            parse(r#"divergence = "forward_kl""#).unwrap(),
            Divergence::ForwardKl
        );
        assert_eq!(
            parse(r#"divergence = "tvd""#).unwrap(),
            Divergence::TotalVariation
        );
        assert_eq!(
            parse(r#"divergence = "jsd""#).unwrap(),
            Divergence::GeneralizedJsd { beta: 0.5 }
        );
        assert_eq!(
            parse(r#"divergence = "skew_reverse_kl""#).unwrap(),
            Divergence::SkewReverseKl { alpha: 0.1 }
        );
        assert_eq!(
            parse(r#"divergence = { kind = "jsd", beta = 0.9 }"#).unwrap(),
            Divergence::GeneralizedJsd { beta: 0.9 }
        );
        assert_eq!(
            parse(r#"divergence = { kind = "skew_forward_kl", alpha = 0.2 }"#).unwrap(),
            Divergence::SkewForwardKl { alpha: 0.2 }
        );
        assert_eq!(
            parse(r#"divergence = "dbild""#).unwrap(),
            Divergence::Dbild { max_k: 16 }
        );
        assert_eq!(
            parse(r#"divergence = { kind = "dbild", max_k = 32 }"#).unwrap(),
            Divergence::Dbild { max_k: 32 }
        );
        // Round trip through TOML.
        for d in [
            Divergence::Dbild { max_k: 8 },
            Divergence::ReverseKl,
            Divergence::GeneralizedJsd { beta: 0.25 },
            Divergence::SkewForwardKl { alpha: 0.3 },
        ] {
            let text = toml::to_string(&Preset { divergence: d }).unwrap();
            assert_eq!(parse(&text).unwrap(), d, "{text}");
        }
    }

    #[test]
    fn toml_errors_name_the_problem() {
        let err = parse(r#"divergence = "kl2""#).unwrap_err();
        assert!(err.contains("unknown divergence `kl2`"), "{err}");
        let err = parse(r#"divergence = { kind = "jsd", beta = 1.5 }"#).unwrap_err();
        assert!(err.contains("`beta` must be in [0, 1], got 1.5"), "{err}");
        let err = parse(r#"divergence = { kind = "forward_kl", beta = 0.5 }"#).unwrap_err();
        assert!(err.contains("takes no `beta`, `alpha` or `max_k`"), "{err}");
        let err = parse(r#"divergence = { kind = "jsd", max_k = 4 }"#).unwrap_err();
        assert!(err.contains("takes no `max_k` (only dbild does)"), "{err}");
        let err = parse(r#"divergence = { kind = "dbild", max_k = 2 }"#).unwrap_err();
        assert!(err.contains("`max_k` must be at least 3, got 2"), "{err}");
        let err = parse(r#"divergence = { kind = "skew_forward_kl", alpha = 1.0 }"#).unwrap_err();
        assert!(err.contains("`alpha` must be in [0, 1)"), "{err}");
    }

    #[test]
    fn command_line_form_round_trips() {
        for s in [
            "forward_kl",
            "reverse_kl",
            "total_variation",
            "jsd:0.9",
            "skew_reverse_kl:0.1",
            "dbild:32",
        ] {
            let d: Divergence = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
        }
        assert_eq!(
            "jsd".parse::<Divergence>().unwrap(),
            Divergence::GeneralizedJsd { beta: 0.5 }
        );
        let err = "forward_kl:0.3"
            .parse::<Divergence>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("takes no parameter"), "{err}");
        let err = "jsd:abc".parse::<Divergence>().unwrap_err().to_string();
        assert!(err.contains("`abc` is not a number"), "{err}");
    }

    #[test]
    fn bad_shapes_and_temperatures_are_errors() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        let err = Divergence::ForwardKl
            .per_token(&a, &b, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 5]") && err.contains("[2, 6]"), "{err}");
        let err = Divergence::ForwardKl
            .per_token(&a, &a, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("temperature must be a positive number, got 0"),
            "{err}"
        );
    }

    fn all() -> Vec<Divergence> {
        vec![
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::GeneralizedJsd { beta: 0.0 },
            Divergence::GeneralizedJsd { beta: 0.3 },
            Divergence::GeneralizedJsd { beta: 1.0 },
            Divergence::TotalVariation,
            Divergence::SkewForwardKl { alpha: 0.0 },
            Divergence::SkewForwardKl { alpha: 0.1 },
            Divergence::SkewReverseKl { alpha: 0.1 },
            Divergence::Dbild { max_k: 5 },
        ]
    }

    #[test]
    fn identical_distributions_have_zero_divergence() {
        let x = Tensor::new(
            &[[0.3f32, -2.0, 5.0, 1.0], [9.0, 9.0, -9.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        // A constant shift does not change the distribution.
        let shifted = x.affine(1.0, 3.0).unwrap();
        for d in all() {
            let v = d
                .per_token(&x, &shifted, 1.7)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(v.iter().all(|v| v.abs() < 1e-5), "{d}: {v:?}");
        }
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() {
        let dev = Device::Cpu;
        let student = Tensor::new(
            &[[0.5f64, -1.0, 2.0, 0.1, -0.3], [1.0, 1.5, -0.3, 0.0, 2.2]],
            &dev,
        )
        .unwrap();
        let teacher = Tensor::new(
            &[[1.5f64, 0.0, -1.0, 0.4, 0.3], [-0.5, 2.5, 0.3, 1.0, 0.2]],
            &dev,
        )
        .unwrap();
        // Weight the rows differently so a row mix-up cannot cancel out.
        let w = Tensor::new(&[0.7f64, -1.3], &dev).unwrap();
        for d in all() {
            for temperature in [1.0, 2.5] {
                let f = |s: &Tensor| -> candle_core::Result<Tensor> {
                    d.per_token(s, &teacher, temperature)
                        .map_err(candle_core::Error::wrap)?
                        .mul(&w)?
                        .sum_all()
                };
                let (analytic, numeric) = gradients(f, &student, 1e-6).unwrap();
                for (a, n) in analytic.iter().zip(&numeric) {
                    assert!(
                        (a - n).abs() < 1e-7,
                        "{d} T={temperature}: analytic {a} vs numeric {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn teacher_receives_no_gradient() {
        let dev = Device::Cpu;
        let s = Var::new(&[[0.5f32, -1.0, 2.0]], &dev).unwrap();
        let t = Var::new(&[[1.0f32, 0.0, -1.0]], &dev).unwrap();
        let loss = Divergence::ForwardKl
            .per_token(s.as_tensor(), t.as_tensor(), 1.0)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(s.as_tensor()).is_some());
        assert!(grads.get(t.as_tensor()).is_none());
    }
}
