//! AdamW with decoupled weight decay and named parameter groups, with PyTorch's exact update
//! (`torch.optim.AdamW`, non-amsgrad) and a state that can be saved and resumed.
//!
//! Per parameter with a gradient g, at its own step count t (as in PyTorch, a parameter that
//! gets no gradient in a step is left alone and its count does not advance):
//! ```text
//! p ← p·(1 − lr·wd)
//! m ← β1·m + (1−β1)·g            v ← β2·v + (1−β2)·g²
//! p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)
//! ```
//! with lr = the scheduled learning rate × the group's `lr_scale`. Moments are f32.
//!
//! Groups are chosen by name prefix (the first group in config order with a matching prefix;
//! parameters matching none form the `default` group). Inside every group, parameters exempt
//! from decay get weight decay 0 (see [`is_decay_exempt`]).

use anyhow::{ensure, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use kernel::{fused_update, tensor_update, UpdateCoefs};

mod kernel;
mod state;

/// Name of the group of parameters that match no configured group.
pub const DEFAULT_GROUP: &str = "default";

/// Optimizer settings, as written in a training preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Weight decay of the `default` group (LLaVA-KD / TinyLLaVA train with 0).
    pub weight_decay: f64,
    /// Give biases, norm weights and embeddings no weight decay (see [`is_decay_exempt`]).
    pub exempt_norms_biases_embeddings: bool,
    pub groups: Vec<ParamGroupConfig>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            exempt_norms_biases_embeddings: true,
            groups: Vec::new(),
        }
    }
}

/// A named set of parameters (by name prefix) with its own learning-rate scale and decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamGroupConfig {
    pub name: String,
    /// e.g. `["model.multi_modal_projector."]`.
    pub prefixes: Vec<String>,
    #[serde(default = "one")]
    pub lr_scale: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

fn one() -> f64 {
    1.0
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&self.beta1),
            "AdamW `beta1` must be in [0, 1), got {}",
            self.beta1
        );
        ensure!(
            (0.0..1.0).contains(&self.beta2),
            "AdamW `beta2` must be in [0, 1), got {}",
            self.beta2
        );
        ensure!(
            self.eps > 0.0,
            "AdamW `eps` must be positive, got {}",
            self.eps
        );
        ensure!(
            self.weight_decay >= 0.0,
            "AdamW `weight_decay` must be ≥ 0, got {}",
            self.weight_decay
        );
        let mut seen = Vec::new();
        for g in &self.groups {
            ensure!(
                g.name != DEFAULT_GROUP && !seen.contains(&g.name.as_str()),
                "parameter group name `{}` is used twice (`{DEFAULT_GROUP}` is reserved)",
                g.name
            );
            seen.push(&g.name);
            ensure!(
                !g.prefixes.is_empty(),
                "parameter group `{}` lists no prefix",
                g.name
            );
            ensure!(
                g.lr_scale >= 0.0 && g.weight_decay >= 0.0,
                "parameter group `{}`: `lr_scale` and `weight_decay` must be ≥ 0",
                g.name
            );
        }
        Ok(())
    }
}

/// Whether a parameter is exempt from weight decay by default: tensors of rank ≤ 1 (biases,
/// norm weights, scalars) and embedding tables (a name segment containing `embed`, e.g.
/// `embed_tokens`, `position_embedding`, `patch_embedding`).
pub fn is_decay_exempt(name: &str, shape: &[usize]) -> bool {
    shape.len() <= 1 || name.split('.').any(|segment| segment.contains("embed"))
}

/// What one group holds, for logging.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSummary {
    pub name: String,
    pub lr_scale: f64,
    pub weight_decay: f64,
    pub tensors: usize,
    pub decayed_tensors: usize,
    pub elements: usize,
}

/// The outcome of one [`AdamW::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepStats {
    /// Parameters updated.
    pub updated: usize,
    /// Parameters without a gradient in this step (left untouched, as PyTorch does), e.g. the
    /// projector in a text-only batch.
    pub without_grad: usize,
}

struct ParamState {
    name: String,
    var: Var,
    lr_scale: f64,
    weight_decay: f64,
    /// First and second moments, created at the parameter's first gradient.
    moments: Option<(Tensor, Tensor)>,
    step: u64,
}

pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<GroupSummary>,
    params: Vec<ParamState>,
}

impl AdamW {
    /// `vars` as returned by `ParamStore::trainable_vars()` (names unique, f32). Every
    /// configured group must match at least one parameter (a typo in a prefix is an error,
    /// not a silently untrained group).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut groups: Vec<GroupSummary> = cfg
            .groups
            .iter()
            .map(|g| GroupSummary {
                name: g.name.clone(),
                lr_scale: g.lr_scale,
                weight_decay: g.weight_decay,
                tensors: 0,
                decayed_tensors: 0,
                elements: 0,
            })
            .collect();
        groups.push(GroupSummary {
            name: DEFAULT_GROUP.to_string(),
            lr_scale: 1.0,
            weight_decay: cfg.weight_decay,
            tensors: 0,
            decayed_tensors: 0,
            elements: 0,
        });
        let mut params = Vec::with_capacity(vars.len());
        let mut names = std::collections::HashSet::new();
        for (name, var) in vars {
            ensure!(
                names.insert(name.clone()),
                "parameter `{name}` is given to the optimizer twice"
            );
            ensure!(
                var.dtype() == DType::F32,
                "parameter `{name}` is {:?}; the optimizer updates f32 master weights only",
                var.dtype()
            );
            let group = cfg
                .groups
                .iter()
                .position(|g| g.prefixes.iter().any(|p| name.starts_with(p.as_str())))
                .unwrap_or(cfg.groups.len());
            let summary = &mut groups[group];
            let exempt = cfg.exempt_norms_biases_embeddings && is_decay_exempt(&name, var.dims());
            let weight_decay = if exempt { 0.0 } else { summary.weight_decay };
            summary.tensors += 1;
            summary.decayed_tensors += usize::from(weight_decay > 0.0);
            summary.elements += var.elem_count();
            params.push(ParamState {
                lr_scale: summary.lr_scale,
                weight_decay,
                name,
                var,
                moments: None,
                step: 0,
            });
        }
        for (group, summary) in cfg.groups.iter().zip(&groups) {
            ensure!(
                summary.tensors > 0,
                "parameter group `{}` (prefixes {:?}) matches no trainable parameter",
                group.name,
                group.prefixes
            );
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            cfg,
            groups,
            params,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Configured groups followed by `default` (possibly empty).
    pub fn groups(&self) -> &[GroupSummary] {
        &self.groups
    }

    /// The largest per-parameter step count (the number of steps taken, for parameters that
    /// got a gradient every step).
    pub fn steps_taken(&self) -> u64 {
        self.params.iter().map(|p| p.step).max().unwrap_or(0)
    }

    /// The parameters' names with their weight decay and learning-rate scale.
    pub fn param_settings(&self) -> Vec<(String, f64, f64)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.lr_scale, p.weight_decay))
            .collect()
    }

    /// One update with base learning rate `lr` (each group scales it by its `lr_scale`).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        self.step_mean(&[grads], lr)
    }

    /// One update from the mean of several micro-batches' gradients (as
    /// [`GradAccumulator`](super::grads::GradAccumulator) forms it), without materialising
    /// the mean first. A parameter counts as having a gradient when every store holds one.
    pub fn step_mean(&mut self, grads: &[&GradStore], lr: f64) -> Result<StepStats> {
        ensure!(
            !grads.is_empty(),
            "an update needs at least one set of gradients"
        );
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "learning rate must be ≥ 0, got {lr}"
        );
        let (beta1, beta2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        let grad_scale = 1.0 / grads.len() as f64;
        let mut stats = StepStats {
            updated: 0,
            without_grad: 0,
        };
        for p in &mut self.params {
            let Some(param_grads) = grads
                .iter()
                .map(|store| store.get(p.var.as_tensor()).cloned())
                .collect::<Option<Vec<Tensor>>>()
            else {
                stats.without_grad += 1;
                continue;
            };
            let coefs = UpdateCoefs {
                lr: lr * p.lr_scale,
                weight_decay: p.weight_decay,
                beta1,
                beta2,
                eps,
                t: (p.step + 1) as i32,
            };
            let param = p.var.as_tensor();
            let update = |moments: &mut Option<(Tensor, Tensor)>| -> candle_core::Result<()> {
                let param_grads = param_grads
                    .iter()
                    .map(|g| g.detach().to_dtype(DType::F32))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                if param.dtype() == DType::F32 && param.device().is_cpu() && param.is_contiguous() {
                    let moments = match moments {
                        Some(mv) => mv,
                        None => moments.insert((param.zeros_like()?, param.zeros_like()?)),
                    };
                    fused_update(param, &param_grads, grad_scale, moments, &coefs)
                } else {
                    let mut grad = param_grads[0].clone();
                    for other in &param_grads[1..] {
                        grad = grad.add(other)?;
                    }
                    if param_grads.len() > 1 {
                        grad = grad.affine(grad_scale, 0.0)?;
                    }
                    let (updated, m, v) =
                        tensor_update(&param.detach(), &grad, moments.as_ref(), &coefs)?;
                    p.var.set(&updated)?;
                    *moments = Some((m, v));
                    Ok(())
                }
            };
            update(&mut p.moments).with_context(|| format!("AdamW update of `{}`", p.name))?;
            p.step += 1;
            stats.updated += 1;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn var(dims: &[usize], value: f32) -> Var {
        Var::from_tensor(&Tensor::full(value, dims, &Device::Cpu).unwrap()).unwrap()
    }

    fn vars() -> Vec<(String, Var)> {
        vec![
            (
                "model.multi_modal_projector.linear_1.bias".into(),
                var(&[3], 1.0),
            ),
            (
                "model.multi_modal_projector.linear_1.weight".into(),
                var(&[3, 2], 1.0),
            ),
            (
                "model.language_model.embed_tokens.weight".into(),
                var(&[4, 2], 1.0),
            ),
            ("model.language_model.norm.weight".into(), var(&[2], 1.0)),
            (
                "model.language_model.layers.0.mlp.up_proj.weight".into(),
                var(&[2, 2], 1.0),
            ),
            ("lm_head.weight".into(), var(&[4, 2], 1.0)),
        ]
    }

    fn two_groups() -> AdamWConfig {
        toml::from_str(
            r#"
            weight_decay = 0.05
            [[groups]]
            name = "projector"
            prefixes = ["model.multi_modal_projector."]
            weight_decay = 0.1
            [[groups]]
            name = "llm"
            prefixes = ["model.language_model."]
            lr_scale = 0.5
            weight_decay = 0.01
            "#,
        )
        .unwrap()
    }

    #[test]
    fn groups_and_decay_exemptions() {
        let opt = AdamW::new(vars(), two_groups()).unwrap();
        let settings = opt.param_settings();
        let get = |n: &str| {
            settings
                .iter()
                .find(|s| s.0 == n)
                .map(|s| (s.1, s.2))
                .unwrap()
        };
        assert_eq!(
            get("model.multi_modal_projector.linear_1.weight"),
            (1.0, 0.1)
        );
        assert_eq!(get("model.multi_modal_projector.linear_1.bias"), (1.0, 0.0));
        assert_eq!(
            get("model.language_model.layers.0.mlp.up_proj.weight"),
            (0.5, 0.01)
        );
        assert_eq!(get("model.language_model.norm.weight"), (0.5, 0.0));
        assert_eq!(get("model.language_model.embed_tokens.weight"), (0.5, 0.0));
        assert_eq!(get("lm_head.weight"), (1.0, 0.05));
        let summary: Vec<(String, usize, usize, usize)> = opt
            .groups()
            .iter()
            .map(|g| (g.name.clone(), g.tensors, g.decayed_tensors, g.elements))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("projector".into(), 2, 1, 9),
                ("llm".into(), 3, 1, 14),
                ("default".into(), 1, 1, 8)
            ]
        );
    }

    #[test]
    fn config_errors() {
        let mut cfg = two_groups();
        cfg.groups[1].prefixes = vec!["model.languag_model.".into()];
        cfg.groups[0].prefixes.push("x".into());
        let err = AdamW::new(vars(), cfg).err().unwrap().to_string();
        assert_eq!(
            err,
            "parameter group `llm` (prefixes [\"model.languag_model.\"]) matches no trainable parameter"
        );
        let mut cfg = two_groups();
        cfg.groups[1].name = "projector".into();
        let err = AdamW::new(vars(), cfg).err().unwrap().to_string();
        assert!(err.contains("`projector` is used twice"), "{err}");
        let err = toml::from_str::<AdamWConfig>("lr = 1.0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `lr`"), "{err}");
        let mut v = vars();
        v.push(v[0].clone());
        let err = AdamW::new(v, AdamWConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("given to the optimizer twice"), "{err}");
    }

    #[test]
    fn fused_cpu_update_equals_the_tensor_form() {
        let dev = Device::Cpu;
        let n = 40_000; // more than one parallel chunk
        let mut param = Tensor::randn(0f32, 1.0, (n / 100, 100), &dev).unwrap();
        let fused_p = param.copy().unwrap();
        let var = Var::from_tensor(&fused_p).unwrap();
        let alias = var.as_tensor().clone();
        let fused_mv = (fused_p.zeros_like().unwrap(), fused_p.zeros_like().unwrap());
        let mut tensor_mv = None;
        for t in 1..=3 {
            let grad = Tensor::randn(0f32, 0.1, (n / 100, 100), &dev).unwrap();
            let c = UpdateCoefs {
                lr: 1e-2,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                t,
            };
            let (p, m, v) = tensor_update(&param, &grad, tensor_mv.as_ref(), &c).unwrap();
            fused_update(
                var.as_tensor(),
                std::slice::from_ref(&grad),
                1.0,
                &fused_mv,
                &c,
            )
            .unwrap();
            let (fm, fv) = &fused_mv;
            for (name, a, b) in [("param", &p, var.as_tensor()), ("m", &m, fm), ("v", &v, fv)] {
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(diff <= 1e-6, "step {t} {name}: max |diff| {diff}");
            }
            (param, tensor_mv) = (p, Some((m, v)));
        }
        // In place: every tensor sharing the Var's storage sees the update.
        let diff = (&param - &alias).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() <= 1e-6);
    }

    #[test]
    fn the_mean_of_micro_batch_gradients_is_taken_as_accumulation_takes_it() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (300, 100), &dev).unwrap();
        let targets: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn(0f32, 1.0, (300, 100), &dev).unwrap())
            .collect();
        let run = |together: bool| -> Tensor {
            let x = Var::from_tensor(&init).unwrap();
            let vars = vec![("x".to_string(), x.clone())];
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
            for _ in 0..2 {
                let stores: Vec<GradStore> = targets
                    .iter()
                    .map(|t| {
                        (x.as_tensor() * t)
                            .unwrap()
                            .sqr()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                    })
                    .map(|loss| loss.backward().unwrap())
                    .collect();
                if together {
                    let refs: Vec<&GradStore> = stores.iter().collect();
                    opt.step_mean(&refs, 1e-2).unwrap();
                } else {
                    let mut sum = crate::train::grads::GradAccumulator::new(&vars);
                    for store in &stores {
                        sum.add(store).unwrap();
                    }
                    opt.step(&sum.mean().unwrap(), 1e-2).unwrap();
                }
            }
            x.as_tensor().clone()
        };
        let diff = (run(true) - run(false)).unwrap().abs().unwrap();
        let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-6, "max |diff| {diff}");
    }

    #[test]
    fn first_step_moves_each_weight_by_lr() {
        // With zero decay, Adam's first step is −lr·sign(g) (up to ε).
        let x = var(&[3], 0.0);
        let mut opt = AdamW::new(vec![("w".into(), x.clone())], AdamWConfig::default()).unwrap();
        let target = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let loss = x
            .as_tensor()
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let stats = opt.step(&loss.backward().unwrap(), 0.01).unwrap();
        assert_eq!(
            stats,
            StepStats {
                updated: 1,
                without_grad: 0
            }
        );
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip([0.01f32, -0.01, 0.01]) {
            assert!((g - w).abs() < 1e-7, "{got:?}");
        }
    }

    #[test]
    fn load_rejects_foreign_states() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let a = var(&[2], 1.0);
        let mut opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
        let grads = a
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, 0.1).unwrap();
        opt.save(&path).unwrap();

        let mut other =
            AdamW::new(vec![("b".into(), var(&[2], 1.0))], AdamWConfig::default()).unwrap();
        let err = other.load(&path).unwrap_err().to_string();
        assert!(
            err.contains("does not belong to these trainable parameters: 1 missing from the file (b), 1 in the file but not trainable here (a)"),
            "{err}"
        );
        let mut wider =
            AdamW::new(vec![("a".into(), var(&[3], 1.0))], AdamWConfig::default()).unwrap();
        let err = wider.load(&path).unwrap_err().to_string();
        assert!(
            err.contains("`a.exp_avg` has shape [2], the parameter has [3]"),
            "{err}"
        );
        assert_eq!(wider.steps_taken(), 0);

        let not_state = dir.path().join("weights.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), t)]), &not_state).unwrap();
        let err = opt.load(&not_state).unwrap_err().to_string();
        assert!(err.contains("is not an mmkd AdamW state"), "{err}");
        std::fs::write(&not_state, b"garbage").unwrap();
        let err = opt.load(&not_state).unwrap_err().to_string();
        assert!(err.contains("is not a safetensors file"), "{err}");
    }
}
