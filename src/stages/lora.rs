//! A stage with `train.lora`: which modules get adapters, which train fully, checking that
//! every named layer exists, and writing the result as a PEFT adapter on the stage's base.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mmkd_nn::{LoraPlan, LoraTargets};

use super::StageRun;
use crate::checkpoint::adapter::{is_adapter, read_adapter, write_adapter, AdapterOutput};
use crate::checkpoint::{write_model_assets, SaveAssets};
use crate::config::{LoraSettings, Module, StageSettings};
use crate::models::llava::{LlavaModel, Trainable, LM_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX};

/// The parameter prefix of a module, and its name as a PEFT `modules_to_save` entry.
fn module_prefix(module: Module) -> (&'static str, &'static str) {
    match module {
        Module::Vision => (VISION_PREFIX, "vision_tower"),
        Module::Projector => (PROJECTOR_PREFIX, "multi_modal_projector"),
        Module::Llm => (LM_PREFIX, "language_model"),
    }
}

/// The stage's adapters, when `train.lora` is set: new ones (or those already in the model
/// it continues, which load into them).
pub fn plan(settings: &StageSettings) -> Option<Arc<LoraPlan>> {
    let lora = settings.train.lora.as_ref()?;
    Some(Arc::new(LoraPlan {
        targets: LoraTargets::Rule {
            modules: lora
                .modules
                .iter()
                .map(|m| module_prefix(*m).0.to_string())
                .collect(),
            names: lora.targets.clone(),
        },
        rank: lora.rank,
        alpha: lora.alpha,
        rslora: lora.rslora,
        dropout: lora.dropout,
        trainable: true,
        require_weights: false,
    }))
}

/// The modules whose own weights train: `train.trainable` less those that get adapters.
pub fn fully_trained(settings: &StageSettings, modules: Trainable) -> Trainable {
    let Some(lora) = &settings.train.lora else {
        return modules;
    };
    Trainable {
        vision: modules.vision && !lora.modules.contains(&Module::Vision),
        projector: modules.projector && !lora.modules.contains(&Module::Projector),
        llm: modules.llm && !lora.modules.contains(&Module::Llm),
    }
}

/// Every name of `train.lora.targets` must adapt at least one layer: a typo would otherwise
/// train nothing.
pub fn check_targets(model: &LlavaModel, lora: &LoraSettings) -> Result<()> {
    let names = model.store.names();
    let adapted: BTreeSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".lora_A.weight"))
        .filter_map(|p| p.rsplit('.').next())
        .collect();
    let prefixes: Vec<&str> = lora.modules.iter().map(|m| module_prefix(*m).0).collect();
    for target in &lora.targets {
        let hit = if target == mmkd_nn::lora::ALL_LINEAR {
            !adapted.is_empty()
        } else {
            adapted.contains(target.as_str())
        };
        if !hit {
            // The linear layers there: 2-D weights other than embeddings.
            let available: BTreeSet<&str> = names
                .iter()
                .filter(|n| prefixes.iter().any(|p| n.starts_with(&format!("{p}."))))
                .filter_map(|n| n.strip_suffix(".weight"))
                .filter(|n| !n.contains("embed") && !n.contains("norm") && !n.contains(".lora_"))
                .filter_map(|p| p.rsplit('.').next())
                .collect();
            bail!(
                "train.lora.targets: `{target}` names no linear layer of {:?} (they have: {})",
                lora.modules,
                available.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}

/// The base model an adapter trained from `--init` applies to: the init itself, or, when it is
/// an adapter (training continued), that adapter's base.
pub fn adapter_base(run: &StageRun) -> Result<String> {
    let Some(init) = &run.init else {
        bail!(
            "train.lora trains adapters on a trained model: pass --init DIR (LoRA on freshly \
             initialised weights has no base to ship the adapter for)"
        );
    };
    if is_adapter(Path::new(init)) {
        return Ok(read_adapter(Path::new(init))?.base);
    }
    Ok(init.clone())
}

/// The final model of a LoRA stage: a PEFT adapter (with the fully trained modules as
/// `modules_to_save`) plus the tokenizer, image processor and training record.
pub fn write_adapter_files(
    model: &LlavaModel,
    dir: &Path,
    assets: SaveAssets<'_>,
    base: &str,
    plan: &LoraPlan,
) -> Result<()> {
    let trained = model.trainable();
    let names = model.store.names();
    let lora_modules: Vec<Module> = [Module::Vision, Module::Projector, Module::Llm]
        .into_iter()
        .filter(|m| {
            let prefix = module_prefix(*m).0;
            names
                .iter()
                .any(|n| n.starts_with(prefix) && n.contains(".lora_"))
        })
        .collect();
    let full: Vec<Module> = [
        (Module::Vision, trained.vision),
        (Module::Projector, trained.projector),
        (Module::Llm, trained.llm),
    ]
    .into_iter()
    .filter(|(m, trains)| *trains && !lora_modules.contains(m))
    .map(|(m, _)| m)
    .collect();
    let mut modules_to_save: Vec<String> = full
        .iter()
        .map(|m| module_prefix(*m).1.to_string())
        .collect();
    let mut prefixes: Vec<String> = full
        .iter()
        .map(|m| format!("{}.", module_prefix(*m).0))
        .collect();
    if full.contains(&Module::Llm) {
        modules_to_save.push("lm_head".into());
        prefixes.push("lm_head.".into());
    }
    write_adapter(
        dir,
        &model.store.tensors(),
        |name| prefixes.iter().any(|p| name.starts_with(p.as_str())),
        &AdapterOutput {
            base,
            plan,
            modules_to_save,
        },
    )
    .context("writing the adapter")?;
    // Everything but config and weights: the adapter's base provides those.
    write_model_assets(model, dir, assets)
}
