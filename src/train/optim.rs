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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

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

/// The f32 elements of a contiguous CPU tensor's storage, without copying them.
fn f32_elements<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => mmkd_nn::fused::data::<f32>(cpu, layout, "AdamW"),
        _ => candle_core::bail!("AdamW: expected a CPU tensor"),
    }
}

/// The scalars of one parameter's update.
struct UpdateCoefs {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// The parameter's step count, this update included.
    t: i32,
}

impl UpdateCoefs {
    fn step_size(&self) -> f64 {
        self.lr / (1.0 - self.beta1.powi(self.t))
    }

    fn bias_correction2_sqrt(&self) -> f64 {
        (1.0 - self.beta2.powi(self.t)).sqrt()
    }
}

/// The update from tensor ops (any dtype and device); returns (param, m, v).
fn tensor_update(
    param: &Tensor,
    grad: &Tensor,
    moments: Option<&(Tensor, Tensor)>,
    c: &UpdateCoefs,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (m, v) = match moments {
        Some(mv) => mv.clone(),
        None => (grad.zeros_like()?, grad.zeros_like()?),
    };
    let mut param = param.clone();
    if c.weight_decay != 0.0 {
        param = param.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
    }
    // m.lerp(g, 1−β1) and v·β2 + (1−β2)·g², as PyTorch writes them.
    let m = m.add(&grad.sub(&m)?.affine(1.0 - c.beta1, 0.0)?)?;
    let v = v
        .affine(c.beta2, 0.0)?
        .add(&grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let denom = v.sqrt()?.affine(1.0 / c.bias_correction2_sqrt(), c.eps)?;
    let param = param.sub(&m.div(&denom)?.affine(c.step_size(), 0.0)?)?;
    Ok((param, m, v))
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor's own storage, mutably, through
/// candle's in-place op hook: every tensor sharing that storage (the `Var`) sees the result.
fn with_f32_mut(
    tensor: &Tensor,
    f: impl FnOnce(&mut [f32]) -> candle_core::Result<()> + Send,
) -> candle_core::Result<()> {
    struct InPlace<F>(std::sync::Mutex<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> candle_core::Result<()> + Send> candle_core::InplaceOp1
        for InPlace<F>
    {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            let f = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("AdamW: poisoned lock".into()))?
                .take()
                .ok_or_else(|| candle_core::Error::Msg("AdamW: in-place op ran twice".into()))?;
            let candle_core::CpuStorage::F32(all) = storage else {
                candle_core::bail!("AdamW: expected f32 storage")
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("AdamW: the in-place update needs contiguous tensors")
            };
            f(&mut all[start..end])
        }
    }
    tensor.inplace_op1(&InPlace(std::sync::Mutex::new(Some(f))))
}

/// The same update for f32 parameters on the CPU, written in place into the parameter's and the
/// moments' own storage in one pass over each element, spread over rayon's pool. The tensor
/// form makes a dozen single-threaded passes and allocations per parameter, and writing fresh
/// buffers then copying them into the `Var` cost a tenth of a small model's step in allocation,
/// page faults and copies. Same operations in the same order (f32, the scalars rounded to f32
/// as candle's `affine` does), so both give the same numbers.
fn fused_update(
    param: &Tensor,
    grads: &[Tensor],
    grad_scale: f64,
    (m, v): &(Tensor, Tensor),
    c: &UpdateCoefs,
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    let decay = (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32);
    let (one_minus_b1, b2, one_minus_b2) = (
        (1.0 - c.beta1) as f32,
        c.beta2 as f32,
        (1.0 - c.beta2) as f32,
    );
    let (inv_bc2, eps, step, grad_scale) = (
        (1.0 / c.bias_correction2_sqrt()) as f32,
        c.eps as f32,
        c.step_size() as f32,
        grad_scale as f32,
    );
    let grads = grads
        .iter()
        .map(Tensor::contiguous)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards = grads
        .iter()
        .map(Tensor::storage_and_layout)
        .collect::<Vec<_>>();
    let g = guards
        .iter()
        .map(|(storage, layout)| f32_elements(storage, layout))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let n = param.elem_count();
    if let Some(bad) = g.iter().find(|g| g.len() != n) {
        candle_core::bail!(
            "AdamW: a gradient has {} elements, the parameter {n}",
            bad.len()
        );
    }
    with_f32_mut(param, |p| {
        with_f32_mut(m, |m| {
            with_f32_mut(v, |v| {
                const CHUNK: usize = 1 << 14;
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(chunk, ((p, m), v))| {
                        let span = chunk * CHUNK..chunk * CHUNK + p.len();
                        // The micro-batches' mean gradient, summed and scaled as
                        // GradAccumulator does, gathered first (only when there are several)
                        // so the update below is one loop over equal-length slices (it
                        // vectorises).
                        let mean: std::borrow::Cow<[f32]> = if g.len() == 1 {
                            std::borrow::Cow::Borrowed(&g[0][span])
                        } else {
                            let mut sum = g[0][span.clone()].to_vec();
                            for other in &g[1..] {
                                for (x, &y) in sum.iter_mut().zip(&other[span.clone()]) {
                                    *x += y;
                                }
                            }
                            for x in &mut sum {
                                *x *= grad_scale;
                            }
                            std::borrow::Cow::Owned(sum)
                        };
                        let decay = decay.unwrap_or(1.0);
                        for (((pi, mi), vi), &gi) in p
                            .iter_mut()
                            .zip(m.iter_mut())
                            .zip(v.iter_mut())
                            .zip(mean.iter())
                        {
                            let m_new = *mi + (gi - *mi) * one_minus_b1;
                            let v_new = *vi * b2 + (gi * gi) * one_minus_b2;
                            let denom = v_new.sqrt() * inv_bc2 + eps;
                            *pi = *pi * decay - (m_new / denom) * step;
                            *mi = m_new;
                            *vi = v_new;
                        }
                    });
                Ok(())
            })
        })
    })
}

pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<GroupSummary>,
    params: Vec<ParamState>,
}

const META_KIND: &str = "mmkd.optimizer";
const META_STEPS: &str = "mmkd.steps";
const KIND: &str = "adamw";

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

    /// Writes the moments (`{name}.exp_avg`, `{name}.exp_avg_sq`) and every parameter's step
    /// count (metadata `mmkd.steps`, JSON) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut steps = BTreeMap::new();
        for p in &self.params {
            steps.insert(p.name.clone(), p.step);
            if let Some((m, v)) = &p.moments {
                tensors.push((format!("{}.exp_avg", p.name), m.to_device(&Device::Cpu)?));
                tensors.push((format!("{}.exp_avg_sq", p.name), v.to_device(&Device::Cpu)?));
            }
        }
        let metadata = HashMap::from([
            (META_KIND.to_string(), KIND.to_string()),
            (META_STEPS.to_string(), serde_json::to_string(&steps)?),
        ]);
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
            .with_context(|| format!("writing optimizer state {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving optimizer state to {}", path.display()))?;
        Ok(())
    }

    /// Restores a state written by [`AdamW::save`]. The file must hold exactly this optimizer's
    /// parameters with matching shapes; nothing changes when it does not.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let state = read_state(path)?;
        let ours: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        let missing: Vec<&str> = ours
            .iter()
            .copied()
            .filter(|n| !state.steps.contains_key(*n))
            .collect();
        let extra: Vec<&String> = state
            .steps
            .keys()
            .filter(|n| ours.binary_search(&n.as_str()).is_err())
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            bail!(
                "optimizer state {} does not belong to these trainable parameters: {} missing from the file{}, \
                 {} in the file but not trainable here{} (a checkpoint of another stage or model?)",
                path.display(),
                missing.len(),
                first_few(&missing),
                extra.len(),
                first_few(&extra)
            );
        }
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let step = state.steps[&p.name];
            let moments = match (
                state.tensors.get(&format!("{}.exp_avg", p.name)),
                state.tensors.get(&format!("{}.exp_avg_sq", p.name)),
            ) {
                (Some(m), Some(v)) => {
                    for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        ensure!(
                            t.dims() == p.var.dims(),
                            "optimizer state {}: `{}.{what}` has shape {:?}, the parameter has {:?}",
                            path.display(),
                            p.name,
                            t.dims(),
                            p.var.dims()
                        );
                    }
                    let device = p.var.device();
                    Some((
                        m.to_dtype(DType::F32)?.to_device(device)?,
                        v.to_dtype(DType::F32)?.to_device(device)?,
                    ))
                }
                (None, None) if step == 0 => None,
                _ => bail!(
                    "optimizer state {}: `{}` has step count {step} but not both moments",
                    path.display(),
                    p.name
                ),
            };
            restored.push((moments, step));
        }
        for (p, (moments, step)) in self.params.iter_mut().zip(restored) {
            p.moments = moments;
            p.step = step;
        }
        Ok(())
    }
}

struct SavedState {
    steps: BTreeMap<String, u64>,
    tensors: HashMap<String, Tensor>,
}

fn read_state(path: &Path) -> Result<SavedState> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading optimizer state {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    ensure!(
        meta.get(META_KIND).map(String::as_str) == Some(KIND),
        "{} is not an mmkd AdamW state (metadata `{META_KIND}` is {:?})",
        path.display(),
        meta.get(META_KIND)
    );
    let steps_json = meta
        .get(META_STEPS)
        .with_context(|| format!("{}: metadata `{META_STEPS}` is missing", path.display()))?;
    let steps: BTreeMap<String, u64> = serde_json::from_str(steps_json).with_context(|| {
        format!(
            "{}: metadata `{META_STEPS}` is not a name → step map",
            path.display()
        )
    })?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("reading tensors of {}", path.display()))?;
    Ok(SavedState { steps, tensors })
}

fn first_few<T: AsRef<str>>(names: &[T]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = names.iter().take(3).map(|n| n.as_ref()).collect();
    let more = if names.len() > 3 { ", …" } else { "" };
    format!(" ({}{more})", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

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
