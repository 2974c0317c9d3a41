//! What a model was trained with, saved next to its weights (`mmkd_training.json`): the
//! conversation template (whole, so a template file travels with the model) and the maximum
//! sequence length. `eval`, `score` and `generate` use the template unless told otherwise, and
//! say so when told otherwise; a stage that continues the model warns when its own template
//! differs.

use std::path::Path;

use anyhow::{Context, Result};
use mmkd_datasets::Template;
use serde::{Deserialize, Serialize};

pub const TRAINING_FILE: &str = "mmkd_training.json";

/// The record of the stage that wrote a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// The stage (`pretrain`, `sft`, `dpt`, `dft`).
    pub stage: String,
    /// Whether the stage trained on conversations (a chat template) or captions (`plain`).
    pub chat: bool,
    /// The template as the stage named it (a built-in name or a file path).
    pub template_name: String,
    pub template: Template,
    pub max_length: usize,
}

impl TrainingRecord {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TRAINING_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The record in `dir`, `None` for a checkpoint without one (not written by an mmkd stage).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(TRAINING_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{}: not an mmkd training record", path.display()))
    }
}

/// The template a command uses with a model: `requested` when given (with a warning on stderr
/// when the model was trained with another), else the model's own, else `fallback`.
pub fn template_for(
    record: Option<&TrainingRecord>,
    model_dir: &Path,
    requested: Option<&str>,
    fallback: &str,
) -> Result<Template> {
    match (requested, record) {
        (Some(name), record) => {
            let template = Template::by_name_or_path(name)?;
            if let Some(r) = record.filter(|r| r.template != template) {
                eprintln!(
                    "warning: --template {name} differs from the template the model was trained \
                     with ({}, recorded in {}); its answers may suffer",
                    r.template_name,
                    model_dir.join(TRAINING_FILE).display()
                );
            }
            Ok(template)
        }
        (None, Some(r)) => Ok(r.template.clone()),
        (None, None) => Template::by_name_or_path(fallback),
    }
}
