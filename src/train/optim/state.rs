//! Saving and restoring AdamW's state (moments and step counts) for resume.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::AdamW;

const META_KIND: &str = "mmkd.optimizer";
const META_STEPS: &str = "mmkd.steps";
const KIND: &str = "adamw";

impl AdamW {
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
