//! Low-rank adapters (LoRA, Hu et al. 2021): a frozen linear layer W gains a trainable
//! branch, y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with A `[r, in]`, B `[out, r]` and s = α/r (rsLoRA,
//! Kalajdzievski 2023: s = α/√r). B starts at zero, so an adapted model starts as its base.
//! The branch is two thin matmuls; W + s·BA is never materialised while training.

use std::cell::Cell;
use std::collections::BTreeSet;

use candle_core::{Result as CResult, Tensor};

use crate::SeededRng;

/// Which linear layers get adapters and how they are scaled.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPlan {
    pub targets: LoraTargets,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// Adapters are trainable `Var`s (training) or constants (a loaded adapter for inference).
    pub trainable: bool,
    /// Adapter weights must come from the weight source (a loaded adapter) instead of being
    /// initialised (a new one).
    pub require_weights: bool,
}

/// The layers a plan adapts, by their full parameter prefix (e.g.
/// `model.language_model.layers.0.self_attn.q_proj`).
#[derive(Clone, Debug, PartialEq)]
pub enum LoraTargets {
    /// Layers under one of `modules` (prefixes) whose last name is in `names`; the name
    /// `all-linear` takes every linear layer there except the LM head.
    Rule {
        modules: Vec<String>,
        names: Vec<String>,
    },
    /// Exactly these layers (an adapter read from disk).
    Exact(BTreeSet<String>),
}

/// The PEFT shorthand for every linear layer but the output head.
pub const ALL_LINEAR: &str = "all-linear";

impl LoraPlan {
    /// Whether the linear layer at `prefix` is adapted.
    pub fn applies_to(&self, prefix: &str) -> bool {
        match &self.targets {
            LoraTargets::Exact(set) => set.contains(prefix),
            LoraTargets::Rule { modules, names } => {
                let in_module = modules.iter().any(|m| {
                    prefix
                        .strip_prefix(m.as_str())
                        .is_some_and(|r| r.starts_with('.'))
                });
                let last = prefix.rsplit('.').next().unwrap_or(prefix);
                in_module
                    && names
                        .iter()
                        .any(|n| n == last || (n == ALL_LINEAR && last != "lm_head"))
            }
        }
    }

    /// s = α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.rank as f64;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

thread_local! {
    /// The dropout seed of the forward pass running on this thread, when it trains.
    static DROPOUT_SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `forward` with LoRA dropout on: each adapted layer drops inputs by a mask drawn from
/// `seed` and its own name, so a training step's masks depend on the step and its samples
/// only — not on threads or timing — and a resumed run draws the same ones. Outside this call
/// (evaluation, generation, a teacher) adapters see their whole input.
pub fn with_dropout<T>(seed: u64, forward: impl FnOnce() -> T) -> T {
    let previous = DROPOUT_SEED.with(|s| s.replace(Some(seed)));
    let out = forward();
    DROPOUT_SEED.with(|s| s.set(previous));
    out
}

/// The adapter of one linear layer.
#[derive(Clone, Debug)]
pub struct LoraBranch {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scale: f64,
    /// Dropout probability on the input (only inside [`with_dropout`]).
    pub dropout: f64,
    /// The layer's name, which seeds its dropout masks.
    pub name: String,
}

impl LoraBranch {
    /// s·(x Aᵀ) Bᵀ, in `x`'s dtype. The scale is applied to the rank-r intermediate, so no
    /// extra `[tokens, out]` tensor is kept for the backward pass.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let cast = |t: &Tensor| {
            if t.dtype() == x.dtype() {
                Ok(t.clone())
            } else {
                t.to_dtype(x.dtype())
            }
        };
        let seed = DROPOUT_SEED.with(Cell::get).filter(|_| self.dropout > 0.0);
        let x = match seed {
            Some(seed) => self.drop(x, seed)?,
            None => x.clone(),
        };
        let down = crate::fused::linear(&x, &cast(&self.a)?, None)?.affine(self.scale, 0.0)?;
        crate::fused::linear(&down, &cast(&self.b)?, None)
    }

    /// Whether this forward drops inputs (dropout set, inside [`with_dropout`]).
    pub fn drops_now(&self) -> bool {
        self.dropout > 0.0 && DROPOUT_SEED.with(Cell::get).is_some()
    }

    /// Inverted dropout: each input kept with probability 1 − p and scaled by 1/(1 − p).
    fn drop(&self, x: &Tensor, seed: u64) -> CResult<Tensor> {
        let p = self.dropout as f32;
        let keep = 1.0 / (1.0 - p);
        let mut rng = SeededRng::for_name(seed, &self.name);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.uniform() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }

    /// s·B·A `[out, in]`: what folding the adapter into W adds.
    pub fn delta(&self) -> CResult<Tensor> {
        self.b.matmul(&self.a)?.affine(self.scale, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(modules: &[&str], names: &[&str]) -> LoraPlan {
        LoraPlan {
            targets: LoraTargets::Rule {
                modules: modules.iter().map(|s| s.to_string()).collect(),
                names: names.iter().map(|s| s.to_string()).collect(),
            },
            rank: 4,
            alpha: 8.0,
            rslora: false,
            dropout: 0.0,
            trainable: true,
            require_weights: false,
        }
    }

    #[test]
    fn targets_match_by_module_and_layer_name() {
        let plan = rule(&["model.language_model"], &["q_proj", "v_proj"]);
        assert!(plan.applies_to("model.language_model.layers.0.self_attn.q_proj"));
        assert!(!plan.applies_to("model.language_model.layers.0.self_attn.k_proj"));
        assert!(
            !plan.applies_to("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
        );
        assert!(!plan.applies_to("model.language_modelx.q_proj"));
        let all = rule(&["model.language_model", "lm_head"], &[ALL_LINEAR]);
        assert!(all.applies_to("model.language_model.layers.1.mlp.down_proj"));
        assert!(!all.applies_to("lm_head"));
    }

    fn adapted_layer(store: &crate::ParamStore, plan: LoraPlan) -> crate::Linear {
        let pb = crate::ParamBuilder::fresh(store, 3, &candle_core::Device::Cpu)
            .lora(Some(std::sync::Arc::new(plan)));
        crate::Linear::new(&pb.pp("model.language_model").pp("q_proj"), 6, 5, true, 0.5).unwrap()
    }

    fn input() -> Tensor {
        let values: Vec<f32> = (0..2 * 3 * 6)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.0)
            .collect();
        Tensor::from_vec(values, (2, 3, 6), &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn an_adapter_starts_as_its_base_and_adds_s_b_a_once_trained() {
        let store = crate::ParamStore::new();
        let layer = adapted_layer(&store, rule(&["model.language_model"], &["q_proj"]));
        let x = input();
        // B = 0: exactly the base layer.
        let base = crate::Linear::from_weights(layer.weight.clone(), layer.bias.clone());
        assert_eq!(
            crate::fused::testing::max_abs_diff(
                &layer.forward(&x).unwrap(),
                &base.forward(&x).unwrap()
            ),
            0.0
        );
        // Some B: x (W + s·B·A)ᵀ + b.
        let mut trained = layer.clone();
        let branch = trained.lora.as_mut().unwrap();
        branch.b = Tensor::from_vec(
            (0..20).map(|i| i as f32 * 0.05 - 0.4).collect(),
            (5, 4),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let folded = crate::Linear::from_weights(
            (&trained.weight + branch.delta().unwrap()).unwrap(),
            trained.bias.clone(),
        );
        let diff = crate::fused::testing::max_abs_diff(
            &trained.forward(&x).unwrap(),
            &folded.forward(&x).unwrap(),
        );
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn only_the_adapters_are_trained_and_their_gradients_are_right() {
        let store = crate::ParamStore::new();
        let layer = adapted_layer(&store, rule(&["model.language_model"], &["q_proj"]));
        let trainable: Vec<String> = store.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            trainable,
            [
                "model.language_model.q_proj.lora_A.weight",
                "model.language_model.q_proj.lora_B.weight"
            ]
        );
        assert_eq!(store.len(), 4, "weight, bias and the two adapters");
        // With B ≠ 0 both adapters get gradients; they match finite differences.
        let mut layer = layer;
        let branch = layer.lora.as_mut().unwrap();
        let b0: Vec<f64> = (0..20).map(|i| (i as f64 * 0.37).sin()).collect();
        let a0 = branch.a.to_dtype(candle_core::DType::F64).unwrap();
        let b0 = Tensor::from_vec(b0, (5, 4), &candle_core::Device::Cpu).unwrap();
        let x = input().to_dtype(candle_core::DType::F64).unwrap();
        let w = layer.weight.to_dtype(candle_core::DType::F64).unwrap();
        let loss = |a: &Tensor, b: &Tensor| -> CResult<Tensor> {
            let l = crate::Linear {
                weight: w.clone(),
                bias: None,
                lora: Some(LoraBranch {
                    a: a.clone(),
                    b: b.clone(),
                    scale: 2.0,
                    dropout: 0.0,
                    name: "q_proj".into(),
                }),
            };
            l.forward(&x)?.sqr()?.sum_all()
        };
        let (a, b) = (
            candle_core::Var::from_tensor(&a0).unwrap(),
            candle_core::Var::from_tensor(&b0).unwrap(),
        );
        let grads = loss(a.as_tensor(), b.as_tensor())
            .unwrap()
            .backward()
            .unwrap();
        for (var, which) in [(&a, 0), (&b, 1)] {
            let analytic = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let fd = crate::grad_check::finite_difference(
                |t| {
                    let v = if which == 0 {
                        loss(t, &b0)
                    } else {
                        loss(&a0, t)
                    };
                    v?.to_scalar::<f64>()
                },
                var.as_tensor(),
                1e-6,
            )
            .unwrap();
            for (g, f) in analytic.iter().zip(&fd) {
                assert!(
                    (g - f).abs() < 1e-5 * (1.0 + f.abs()),
                    "{which}: {g} vs {f}"
                );
            }
        }
    }

    #[test]
    fn dropout_acts_only_while_training_and_repeats_with_its_seed() {
        let store = crate::ParamStore::new();
        let mut plan = rule(&["model.language_model"], &["q_proj"]);
        plan.dropout = 0.5;
        let mut layer = adapted_layer(&store, plan);
        let branch = layer.lora.as_mut().unwrap();
        branch.b =
            Tensor::ones((5, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let x = input();
        let plain = layer.forward(&x).unwrap();
        let seeded = |seed| with_dropout(seed, || layer.forward(&x).unwrap());
        // Outside a training forward: no dropout.
        let mut without = layer.clone();
        without.lora.as_mut().unwrap().dropout = 0.0;
        assert_eq!(
            crate::fused::testing::max_abs_diff(&plain, &without.forward(&x).unwrap()),
            0.0
        );
        // Inside: a mask that depends on the seed only.
        let (a, a2, b) = (seeded(7), seeded(7), seeded(8));
        assert_eq!(crate::fused::testing::max_abs_diff(&a, &a2), 0.0);
        assert!(crate::fused::testing::max_abs_diff(&a, &b) > 1e-3);
        assert!(crate::fused::testing::max_abs_diff(&a, &plain) > 1e-3);
        // The branch input is x·mask/(1 − p): entries 0 or 2x, about half of them kept.
        let branch = layer.lora.as_ref().unwrap();
        let dropped = with_dropout(7, || branch.drop(&x, 7).unwrap());
        // (x's zero entries give 0/0.)
        let ratio: Vec<f32> = (dropped / &x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ratio: Vec<f32> = ratio.into_iter().filter(|r| !r.is_nan()).collect();
        assert!(
            ratio.iter().all(|r| *r == 0.0 || (*r - 2.0).abs() < 1e-6),
            "{ratio:?}"
        );
        let kept = ratio.iter().filter(|r| **r > 0.0).count() as f64 / ratio.len() as f64;
        assert!((kept - 0.5).abs() < 0.15, "{kept}");
        // The seed is restored after the call (none outside).
        assert_eq!(DROPOUT_SEED.with(Cell::get), None);
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_its_root() {
        let mut plan = rule(&[], &[]);
        assert_eq!(plan.scale(), 2.0);
        plan.rslora = true;
        assert_eq!(plan.scale(), 4.0);
    }
}
