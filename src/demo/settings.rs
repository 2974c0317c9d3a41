//! The `[demo]` table of a preset: data sizes and each stage's epochs.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Document;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub image_size: u32,
    #[serde(default)]
    pub data_seed: u64,
    pub vocab_size: usize,
    pub teacher_pt_epochs: usize,
    pub teacher_sft_epochs: usize,
    pub student_pt_epochs: usize,
    pub student_sft_epochs: usize,
    pub student_dft_epochs: usize,
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_caption_tokens")]
    pub caption_max_new_tokens: usize,
    /// Test images shown with each model's answers in the report.
    #[serde(default = "default_examples")]
    pub examples: usize,
    /// The split the models are evaluated on: `test` for the reported figures, `val` while
    /// tuning a preset (so the test split is never looked at before the end).
    #[serde(default)]
    pub eval_split: EvalSplit,
    /// Epochs of vision pre-training (`mmkd tower` with the preset's `[tower]`) before the
    /// teacher; 0: the models share a random frozen tower.
    #[serde(default)]
    pub tower_epochs: usize,
    /// The recipe of the data-distillation rows (`--methods data`, `--self-improve`): a
    /// built-in name or a recipe file.
    #[serde(default = "default_data_recipe")]
    pub data_recipe: String,
}

fn default_data_recipe() -> String {
    "shapes-vqa".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    Val,
    #[default]
    Test,
}

impl EvalSplit {
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Val => "val",
            EvalSplit::Test => "test",
        }
    }
}

fn default_eval_batch() -> usize {
    32
}
fn default_max_new_tokens() -> usize {
    8
}
fn default_caption_tokens() -> usize {
    32
}
fn default_examples() -> usize {
    4
}

impl DemoSettings {
    pub fn from_document(doc: &Document) -> Result<Self> {
        let table = doc.table.get("demo").with_context(|| {
            format!(
                "{} has no [demo] table: it is not a demo preset",
                doc.origin[0]
            )
        })?;
        table
            .clone()
            .try_into()
            .with_context(|| format!("{}: in [demo]", doc.origin[0]))
    }
}
