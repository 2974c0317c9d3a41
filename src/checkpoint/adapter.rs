//! LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`, whose
//! tensors are named `base_model.model.<transformers module path>.lora_A.weight` /
//! `lora_B.weight`, plus the full weights of the modules trained alongside
//! (`modules_to_save`). PEFT's `PeftModel.from_pretrained` loads what [`write_adapter`] writes,
//! and [`read_adapter`] reads what PEFT writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use mmkd_nn::{LoraPlan, LoraTargets, WeightSource};
use serde::{Deserialize, Serialize};

use super::layout;
use crate::models::llava::VISION_PREFIX;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

/// Whether `dir` holds an adapter rather than a full checkpoint.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).exists() && !dir.join("config.json").exists()
}

/// The fields of `adapter_config.json` mmkd reads and writes (PEFT's `LoraConfig`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_bias() -> String {
    "none".into()
}

/// A transformers module path → mmkd's parameter prefix (mmkd keeps the vision tower's
/// `vision_model.` level; the other names are the same).
fn module_path(internal: &str) -> String {
    let tower = format!("{VISION_PREFIX}.vision_model.");
    match internal.strip_prefix(&tower) {
        Some(rest) => format!("{VISION_PREFIX}.{rest}"),
        None => internal.to_string(),
    }
}

/// The name PEFT gives mmkd's parameter `internal` in an adapter file.
pub fn peft_key(internal: &str) -> String {
    format!("{PEFT_PREFIX}{}", module_path(internal))
}

/// mmkd's name for an adapter file's tensor (any of the LLaVA key layouts after PEFT's prefix).
pub fn internal_key(peft: &str) -> Option<String> {
    let rest = peft.strip_prefix(PEFT_PREFIX)?;
    layout::llava_key(rest)
}

/// An adapter read from disk.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// The base model (directory or hub id) as the adapter names it, resolved.
    pub base: String,
    /// The adapted layers (mmkd prefixes), their scale, and every tensor of the file under
    /// mmkd's names (adapters and fully trained modules).
    pub plan: LoraPlan,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads an adapter directory; refuses what mmkd cannot apply exactly (DoRA, per-layer ranks
/// or alphas, fan-in-fan-out layouts), naming the file and key.
pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    let path = dir.join(ADAPTER_CONFIG);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: AdapterConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a PEFT adapter config", path.display()))?;
    let file = path.display();
    ensure!(
        config.peft_type == "LORA",
        "{file}: peft_type `{}` is not LORA, the only adapter kind mmkd applies",
        config.peft_type
    );
    ensure!(
        !config.use_dora,
        "{file}: DoRA adapters (use_dora) are not supported"
    );
    ensure!(
        config.rank_pattern.is_empty() && config.alpha_pattern.is_empty(),
        "{file}: per-layer ranks or alphas (rank_pattern / alpha_pattern) are not supported"
    );
    ensure!(
        !config.fan_in_fan_out,
        "{file}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported"
    );
    ensure!(config.r > 0, "{file}: r must be at least 1");
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let source = WeightSource::from_file(&weights_path, &Device::Cpu)
        .with_context(|| format!("reading the adapter weights {}", weights_path.display()))?;
    let mut tensors = BTreeMap::new();
    for name in source.names() {
        let internal = internal_key(name).with_context(|| {
            format!(
                "{}: tensor `{name}` is not under `{PEFT_PREFIX}`",
                weights_path.display()
            )
        })?;
        tensors.insert(internal, source.get(name).expect("listed").clone());
    }
    let mut targets = BTreeSet::new();
    for (name, a) in &tensors {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = tensors
            .get(&format!("{prefix}.lora_B.weight"))
            .with_context(|| {
                format!(
                    "{}: `{prefix}` has lora_A but no lora_B",
                    weights_path.display()
                )
            })?;
        ensure!(
            a.dims().first() == Some(&config.r) && b.dims().get(1) == Some(&config.r),
            "{}: the adapter of `{prefix}` has rank {:?}/{:?}, the config says r = {}",
            weights_path.display(),
            a.dims(),
            b.dims(),
            config.r
        );
        targets.insert(prefix.to_string());
    }
    ensure!(
        !targets.is_empty(),
        "{}: no lora_A/lora_B tensors",
        weights_path.display()
    );
    let base = resolve_base(dir, config.base_model_name_or_path.as_deref())?;
    Ok(Adapter {
        dir: dir.to_path_buf(),
        plan: LoraPlan {
            targets: LoraTargets::Exact(targets),
            rank: config.r,
            alpha: config.lora_alpha,
            rslora: config.use_rslora,
            dropout: config.lora_dropout,
            trainable: false,
            require_weights: true,
        },
        config,
        base,
        tensors,
    })
}

/// The base model an adapter names: an absolute path, a path relative to the working
/// directory or to the adapter, or a hub id.
fn resolve_base(adapter: &Path, named: Option<&str>) -> Result<String> {
    let Some(named) = named.filter(|n| !n.is_empty()) else {
        bail!(
            "{}: base_model_name_or_path is not set: mmkd cannot tell which model the adapter is for",
            adapter.join(ADAPTER_CONFIG).display()
        );
    };
    let path = Path::new(named);
    if path.is_absolute() || path.is_dir() {
        return Ok(named.to_string());
    }
    let beside = adapter.join(path);
    if beside.is_dir() {
        return Ok(beside.display().to_string());
    }
    Ok(named.to_string())
}

impl Adapter {
    /// The base weights with this adapter folded in (W + s·B·A for every adapted layer, the
    /// fully trained modules' weights replacing the base's): a plain model's weights.
    pub fn fold_into(&self, base: &mut WeightSource) -> Result<()> {
        let scale = self.plan.scale();
        let LoraTargets::Exact(targets) = &self.plan.targets else {
            unreachable!("a read adapter lists its layers");
        };
        let mut replaced = BTreeMap::new();
        for prefix in targets {
            let name = format!("{prefix}.weight");
            let w = base.get(&name).with_context(|| {
                format!(
                    "the adapter in {} adapts `{prefix}`, which its base {} lacks",
                    self.dir.display(),
                    self.base
                )
            })?;
            let a = &self.tensors[&format!("{prefix}.lora_A.weight")];
            let b = &self.tensors[&format!("{prefix}.lora_B.weight")];
            let delta = b
                .to_dtype(DType::F32)?
                .matmul(&a.to_dtype(DType::F32)?)?
                .affine(scale, 0.0)?;
            ensure!(
                delta.dims() == w.dims(),
                "the adapter of `{prefix}` is {:?}, its base weight {:?}",
                delta.dims(),
                w.dims()
            );
            let folded = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
            replaced.insert(name, folded);
        }
        for (name, t) in &self.tensors {
            if !name.contains(".lora_A.") && !name.contains(".lora_B.") {
                replaced.insert(name.clone(), t.clone());
            }
        }
        base.merge_renamed(
            WeightSource::from_tensors(
                self.dir.join(ADAPTER_WEIGHTS),
                replaced.into_iter().collect(),
            ),
            |n| Some(n.to_string()),
        );
        Ok(())
    }

    /// The base weights with the adapter's tensors added (for training it further).
    pub fn add_to(&self, base: &mut WeightSource) {
        base.merge_renamed(
            WeightSource::from_tensors(
                self.dir.join(ADAPTER_WEIGHTS),
                self.tensors.clone().into_iter().collect(),
            ),
            |n| Some(n.to_string()),
        );
    }
}

/// What a LoRA stage's output records besides the adapter tensors.
pub struct AdapterOutput<'a> {
    /// The base model the adapters apply to (a directory, written absolute, or a hub id).
    pub base: &'a str,
    pub plan: &'a LoraPlan,
    /// Top-level modules trained fully alongside (PEFT's `modules_to_save`), e.g.
    /// `multi_modal_projector`.
    pub modules_to_save: Vec<String>,
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors`: the adapter tensors
/// of `tensors` (mmkd's names) and the tensors of the fully trained modules.
pub fn write_adapter(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    trained_fully: impl Fn(&str) -> bool,
    out: &AdapterOutput<'_>,
) -> Result<()> {
    let mut saved = BTreeMap::new();
    let mut targets = BTreeSet::new();
    for (name, t) in tensors {
        let adapter = name.contains(".lora_A.") || name.contains(".lora_B.");
        if adapter {
            let prefix = name.rsplit_once(".lora_").expect("adapter name").0;
            targets.insert(module_path(prefix));
        }
        if adapter || trained_fully(name) {
            saved.insert(peft_key(name), t.to_dtype(DType::F32)?);
        }
    }
    ensure!(
        !targets.is_empty(),
        "no layer has an adapter: nothing to write"
    );
    let base = match Path::new(out.base) {
        p if p.is_dir() => std::fs::canonicalize(p)
            .with_context(|| format!("resolving {}", p.display()))?
            .display()
            .to_string(),
        _ => out.base.to_string(),
    };
    let config = AdapterConfig {
        peft_type: "LORA".into(),
        base_model_name_or_path: Some(base),
        r: out.plan.rank,
        lora_alpha: out.plan.alpha,
        lora_dropout: out.plan.dropout,
        use_rslora: out.plan.rslora,
        use_dora: false,
        // Exact module paths: PEFT matches a list entry equal to (or a suffix of) a module name.
        target_modules: serde_json::json!(targets),
        modules_to_save: (!out.modules_to_save.is_empty()).then(|| out.modules_to_save.clone()),
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        bias: "none".into(),
        fan_in_fan_out: false,
        task_type: None,
        inference_mode: true,
        other: BTreeMap::from([("init_lora_weights".to_string(), serde_json::json!(true))]),
    };
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    mmkd_nn::weights::save_safetensors(&saved, &dir.join(ADAPTER_WEIGHTS))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_between_mmkd_and_peft_in_every_llava_layout() {
        for (internal, peft) in [
            (
                "model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
            ),
            (
                "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.lora_B.weight",
                "base_model.model.model.vision_tower.encoder.layers.1.mlp.fc1.lora_B.weight",
            ),
            (
                "model.multi_modal_projector.linear_1.weight",
                "base_model.model.model.multi_modal_projector.linear_1.weight",
            ),
            ("lm_head.weight", "base_model.model.lm_head.weight"),
        ] {
            assert_eq!(peft_key(internal), peft);
            assert_eq!(internal_key(peft).as_deref(), Some(internal));
        }
        // transformers 4 module paths (PEFT adapters trained on the Hub's LLaVA models).
        assert_eq!(
            internal_key(
                "base_model.model.language_model.model.layers.3.mlp.up_proj.lora_A.weight"
            )
            .as_deref(),
            Some("model.language_model.layers.3.mlp.up_proj.lora_A.weight")
        );
        assert_eq!(
            internal_key("base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.lora_A.weight")
                .as_deref(),
            Some("model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.lora_A.weight")
        );
        assert_eq!(internal_key("model.layers.0.q_proj.lora_A.weight"), None);
    }
}
