//! Typed settings resolved from a preset document for one stage and one model role.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use super::preset::{merge, Document};
pub use super::stage::Stage;
pub use super::tables::{LoraSettings, RewardKind, RolloutSettings};
use crate::distill::DistillLossConfig;
use crate::objective::TermSpec;
use crate::runtime::DeviceSpec;
use crate::train::ScheduleConfig;

/// Which model of a preset a stage trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Teacher,
    Student,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Teacher => "teacher",
            Role::Student => "student",
        }
    }
}

/// How a model is first built (stage 1), when no `--init` checkpoint is given.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Vision checkpoint: hub id or directory (SigLIP/CLIP).
    pub vision: Option<String>,
    /// Causal-LM checkpoint: hub id or directory (Qwen2/Llama family).
    pub llm: Option<String>,
    /// A fresh vision tower (Hugging Face `SiglipVisionConfig` / `CLIPVisionConfig` keys).
    pub vision_config: Option<Table>,
    /// A fresh language model (Hugging Face `Qwen2Config` / `LlamaConfig` keys);
    /// `vocab_size` defaults to the tokenizer's size.
    pub text_config: Option<Table>,
    #[serde(default = "default_projector")]
    pub projector: String,
    #[serde(default = "default_feature_layer")]
    pub feature_layer: Value,
    #[serde(default = "default_strategy")]
    pub select_strategy: String,
    #[serde(default = "default_image_token")]
    pub image_token: String,
    /// Seed of the fresh parameters.
    #[serde(default)]
    pub seed: u64,
    /// Per-channel normalisation of a fresh model's image processor (the tower's defaults
    /// when absent). A tower trained from scratch has no statistics of its own; the synthetic
    /// presets use their data's, so the background does not dominate every patch.
    pub image_mean: Option<[f64; 3]>,
    pub image_std: Option<[f64; 3]>,
}

impl Default for ModelSpec {
    fn default() -> Self {
        toml::from_str("").expect("every model setting has a default")
    }
}

fn default_projector() -> String {
    "mlp2x_gelu".into()
}
fn default_feature_layer() -> Value {
    Value::Integer(-2)
}
fn default_strategy() -> String {
    "default".into()
}
fn default_image_token() -> String {
    "<image>".into()
}

impl ModelSpec {
    /// How LLaVA takes features from the tower (`feature_layer`, `select_strategy`).
    pub fn feature_select(&self) -> Result<mmkd_vision::FeatureSelect> {
        mmkd_vision::FeatureSelect::from_llava_config(&serde_json::json!({
            "vision_feature_layer": self.feature_layer,
            "vision_feature_select_strategy": self.select_strategy,
        }))
    }

    /// The architecture of a fresh tower (`vision_config`), if the spec has one.
    pub fn fresh_vision_config(&self) -> Result<Option<mmkd_vision::VisionConfig>> {
        self.vision_config
            .as_ref()
            .map(|table| {
                mmkd_vision::VisionConfig::from_json_value(&serde_json::to_value(table)?)
                    .context("the preset's vision_config")
            })
            .transpose()
    }
}

/// Data settings shared by the stages.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSettings {
    /// Template of the chat stages (SFT, DFT); pre-training stages use `plain`.
    #[serde(default = "default_chat_template")]
    pub chat_template: String,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Caption data of the pre-training stages (LLaVA JSON/JSONL), when not given by `--data`.
    pub pretrain_data: Option<PathBuf>,
    /// Instruction data of the chat stages.
    pub instruct_data: Option<PathBuf>,
    /// Image root, when not given by `--images`.
    pub images: Option<PathBuf>,
    /// Tokenizer for freshly built models (`tokenizer.json`).
    pub tokenizer: Option<PathBuf>,
    /// Held-out data (LLaVA JSON/JSONL, images under the same root) whose loss the validation
    /// pass measures (`train.validate_every`).
    pub val_data: Option<PathBuf>,
    /// VQA questions (`mmkd eval vqa` format) the validation pass answers, with their
    /// reference answers.
    pub val_questions: Option<PathBuf>,
    pub val_answers: Option<PathBuf>,
}

fn default_chat_template() -> String {
    "phi".into()
}
fn default_max_length() -> usize {
    2048
}

impl Default for DataSettings {
    fn default() -> Self {
        toml::from_str("").expect("all data settings have defaults")
    }
}

/// Optimisation settings of one stage.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub lr: f64,
    /// Learning-rate multiplier of the projector when the LLM trains too.
    #[serde(default = "one")]
    pub projector_lr_scale: f64,
    /// Learning-rate multiplier of the vision tower when `trainable` includes it (a tower
    /// usually fine-tunes at a fraction of the rate of the modules above it).
    #[serde(default = "one")]
    pub vision_lr_scale: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default = "one_usize")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule is laid out for them).
    pub max_steps: Option<usize>,
    /// Samples per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (global batch = batch_size × grad_accum).
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Micro-batches of a step run side by side (forward and backward at once, on the same
    /// thread pool): a scheduling choice that changes no number, worth it on CPUs whose cores
    /// one micro-batch's serial element-wise passes leave idle. Costs that many micro-batches'
    /// activations in memory.
    #[serde(default = "one_usize")]
    pub parallel_micro_batches: usize,
    /// Rows of logits the loss computes at once from the final hidden states and the LM head,
    /// so no `[tokens × vocab]` logits tensor of the batch exists (0: all at once). Absent:
    /// 1024 on CUDA, all at once on the CPU. Changes no number beyond summation order.
    #[serde(default)]
    pub loss_chunk_rows: Option<usize>,
    /// Global-norm clipping (0 disables).
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints kept.
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    #[serde(default)]
    pub seed: u64,
    /// Template override for this stage.
    pub template: Option<String>,
    /// Dtype of frozen modules: f32, bf16 or f16.
    #[serde(default = "default_frozen_dtype")]
    pub frozen_dtype: String,
    /// Where the models run: `cpu`, `cuda` or `cuda:N` (`--device`).
    #[serde(default)]
    pub device: DeviceSpec,
    /// A validation pass every N optimizer steps and after the last (0: none): the objective
    /// on `data.val_data`, and VQA accuracy on `data.val_questions` when given. Written to
    /// `validation.jsonl`; it changes no trained number.
    #[serde(default)]
    pub validate_every: usize,
    /// Questions the validation pass answers (the first N of `data.val_questions`).
    #[serde(default = "default_validate_questions")]
    pub validate_questions: usize,
    /// Keep image and text-only samples apart and group by length.
    #[serde(default = "yes")]
    pub group_by_modality_length: bool,
    /// Cut both vocabularies to this size when teacher and student differ only by padding.
    pub truncate_vocab: Option<usize>,
    /// Knowledge augmentation of a Mixture-of-Experts teacher ("Every Expert Matters"): its
    /// output averaged over this many routings of each batch — the router's top-k and N − 1
    /// with the last expert drawn by router probability. 1: the router's own routing.
    #[serde(default = "one_usize")]
    pub teacher_routings: usize,
    /// Modules this stage trains; the paper's choice when absent (projector in PT/DPT,
    /// projector + LLM in SFT/DFT). Models trained from scratch may need more, e.g. the
    /// synthetic presets train the LLM in pre-training too (a random LLM cannot be steered by
    /// a projector alone).
    pub trainable: Option<Vec<Module>>,
    /// Stop a step whose loss exceeds this many times the median of the last 20 steps
    /// (before its update; off when absent).
    pub max_loss_spike: Option<f64>,
    /// Likewise for the gradient norm (before clipping).
    pub max_grad_norm_spike: Option<f64>,
    /// Train low-rank adapters instead of the weights of `lora.modules` (their bases frozen);
    /// the other modules of `trainable` train fully. The stage writes a PEFT adapter.
    pub lora: Option<LoraSettings>,
    /// Train on answers the student samples itself (on-policy distillation); `mmkd gkd` has
    /// it by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSettings>,
}

/// A trainable part of a LLaVA model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Module {
    Vision,
    Projector,
    Llm,
}

/// The loss chunk on CUDA when `train.loss_chunk_rows` is absent: 1024 rows of a 152k
/// vocabulary are 0.6 GB of f32 logits.
pub const CUDA_LOSS_CHUNK_ROWS: usize = 1024;

/// The rows of logits the loss computes at once on `device` (`None`: all at once) for a
/// `train.loss_chunk_rows` of `setting`.
pub fn loss_chunk_rows_on(setting: Option<usize>, device: &candle_core::Device) -> Option<usize> {
    match setting {
        Some(0) => None,
        Some(n) => Some(n),
        None if device.is_cuda() => Some(CUDA_LOSS_CHUNK_ROWS),
        None => None,
    }
}

impl TrainSettings {
    /// `train.loss_chunk_rows` on `device` (see [`loss_chunk_rows_on`]).
    pub fn loss_chunk_rows_on(&self, device: &candle_core::Device) -> Option<usize> {
        loss_chunk_rows_on(self.loss_chunk_rows, device)
    }

    /// The modules stage `stage` trains.
    pub fn modules(&self, stage: Stage) -> Vec<Module> {
        match &self.trainable {
            Some(modules) => modules.clone(),
            None if stage.trains_llm() => vec![Module::Projector, Module::Llm],
            None => vec![Module::Projector],
        }
    }
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn default_batch() -> usize {
    8
}
fn default_keep() -> usize {
    2
}
fn default_validate_questions() -> usize {
    200
}
fn default_frozen_dtype() -> String {
    "f32".into()
}
fn yes() -> bool {
    true
}

/// Everything one stage of one model needs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StageSettings {
    pub stage: Stage,
    pub role: Role,
    pub model: ModelSpec,
    pub data: DataSettings,
    pub train: TrainSettings,
    pub distill: DistillLossConfig,
    /// The stage's objective: `[[stages.<stage>.objective]]`, or the built-in one (`ce`;
    /// distilling stages add MDist and RDist with the `[distill]` weights).
    pub objective: Vec<TermSpec>,
    /// Where each key's value came from (`--set`, a preset table, a default); see
    /// [`super::keys::provenance`]. Not part of the settings themselves.
    #[serde(skip)]
    pub sources: BTreeMap<String, String>,
}

impl StageSettings {
    /// Resolves `doc` for `stage` and `role`: the stage's paper defaults, then `[train]`, then
    /// `[stages.<stage>]`, then `[<role>.train]` / `[<role>.stages.<stage>]`, then the `--set`
    /// overrides of `train.*` and `stages.<stage>.*` ([`Document::set`]), which always win.
    pub fn resolve(doc: &Document, stage: Stage, role: Role) -> Result<Self> {
        let known = [
            "description",
            "models",
            "data",
            "train",
            "stages",
            "distill",
            "demo",
            "tower",
            "teacher",
            "student",
        ];
        for key in doc.table.keys() {
            if !known.contains(&key.as_str()) {
                bail!(
                    "{}: unknown key `{key}` (known: {})",
                    doc.origin[0],
                    known.join(", ")
                );
            }
        }
        let section = |name: &str| -> Result<Table> {
            match doc.table.get(name) {
                None => Ok(Table::new()),
                Some(Value::Table(t)) => Ok(t.clone()),
                Some(other) => bail!("{}: `{name}` must be a table, found {other}", doc.origin[0]),
            }
        };
        let sub = |t: &Table, name: &str| -> Table {
            match t.get(name) {
                Some(Value::Table(t)) => t.clone(),
                _ => Table::new(),
            }
        };
        let stages = section("stages")?;
        for key in stages.keys() {
            if !Stage::ALL.iter().any(|s| s.name() == key) {
                bail!(
                    "{}: unknown stage `stages.{key}` ({})",
                    doc.origin[0],
                    Stage::ALL.map(Stage::name).join(", ")
                );
            }
        }
        let role_table = section(role.name())?;
        let mut train = stage.defaults();
        merge(&mut train, section("train")?);
        merge(&mut train, sub(&stages, stage.name()));
        merge(&mut train, sub(&role_table, "train"));
        merge(&mut train, sub(&sub(&role_table, "stages"), stage.name()));
        // `--set` beats every layer above: its train and stage keys are applied once more.
        let stage_prefix = format!("stages.{}.", stage.name());
        for assignment in &doc.overrides {
            let Some((path, value)) = assignment.split_once('=') else {
                continue;
            };
            let path = path.trim();
            if let Some(key) = path
                .strip_prefix("train.")
                .or_else(|| path.strip_prefix(stage_prefix.as_str()))
            {
                super::preset::apply_override(&mut train, &format!("{key}={value}"))?;
            }
        }
        let objective = train
            .remove("objective")
            .map(|terms| -> Result<Vec<TermSpec>> {
                terms.try_into().with_context(|| {
                    format!(
                        "{}: in `stages.{}.objective` (a list of tables: term = \"...\", weight = ...)",
                        doc.origin[0],
                        stage.name()
                    )
                })
            })
            .transpose()?;
        let train: TrainSettings = Value::Table(train).try_into().with_context(|| {
            format!(
                "{}: in the `train` settings of stage {}",
                doc.origin[0],
                stage.name()
            )
        })?;

        let models = section("models")?;
        let model: ModelSpec = match models.get(role.name()) {
            Some(v) => v
                .clone()
                .try_into()
                .with_context(|| format!("{}: in `models.{}`", doc.origin[0], role.name()))?,
            None => ModelSpec::default(),
        };
        let data: DataSettings = Value::Table(section("data")?)
            .try_into()
            .with_context(|| format!("{}: in `data`", doc.origin[0]))?;
        let distill: DistillLossConfig = Value::Table(section("distill")?)
            .try_into()
            .with_context(|| format!("{}: in `distill`", doc.origin[0]))?;
        distill.validate()?;
        let objective = objective.unwrap_or_else(|| stage.builtin_objective(&distill));
        let settings = Self {
            stage,
            role,
            model,
            data,
            train,
            distill,
            objective,
            // `[tower]` belongs to `mmkd tower`, not to the LLaVA stages.
            sources: super::keys::provenance(doc, stage, role)
                .into_iter()
                .filter(|(key, _)| !key.starts_with("tower."))
                .collect(),
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<()> {
        let t = &self.train;
        anyhow::ensure!(t.batch_size > 0, "train.batch_size must be at least 1");
        anyhow::ensure!(t.grad_accum > 0, "train.grad_accum must be at least 1");
        anyhow::ensure!(
            t.parallel_micro_batches > 0,
            "train.parallel_micro_batches must be at least 1"
        );
        anyhow::ensure!(t.lr.is_finite() && t.lr >= 0.0, "train.lr must be ≥ 0");
        anyhow::ensure!(
            t.teacher_routings >= 1,
            "train.teacher_routings must be at least 1 (1: the teacher's own routing)"
        );
        crate::runtime::parse_dtype(&t.frozen_dtype)
            .context("train.frozen_dtype must be f32, bf16 or f16")?;
        crate::objective::Objective::new(&self.objective, &self.distill)
            .with_context(|| format!("the objective of stage {}", self.stage.name()))?;
        if t.validate_every > 0 {
            anyhow::ensure!(
                self.data.val_data.is_some() || self.data.val_questions.is_some(),
                "train.validate_every = {} but there is nothing to validate on: set data.val_data \
                 (--val-data) and/or data.val_questions (--val-questions)",
                t.validate_every
            );
        }
        anyhow::ensure!(
            self.data.val_questions.is_some() == self.data.val_answers.is_some(),
            "data.val_questions and data.val_answers go together (--val-questions, --val-answers)"
        );
        if let Some(lora) = &t.lora {
            anyhow::ensure!(lora.rank >= 1, "train.lora.rank must be at least 1");
            anyhow::ensure!(
                lora.alpha.is_finite() && lora.alpha > 0.0,
                "train.lora.alpha must be a positive number, got {}",
                lora.alpha
            );
            anyhow::ensure!(
                !lora.targets.is_empty(),
                "train.lora.targets is empty: name the layers to adapt"
            );
            anyhow::ensure!(
                !lora.modules.is_empty(),
                "train.lora.modules is empty: name the modules to adapt"
            );
            anyhow::ensure!(
                (0.0..1.0).contains(&lora.dropout),
                "train.lora.dropout must be in [0, 1), got {}",
                lora.dropout
            );
        }
        if let Some(rollout) = &t.rollout {
            rollout.validate()?;
        }
        if let Some(modules) = &t.trainable {
            anyhow::ensure!(
                !modules.is_empty(),
                "train.trainable is empty: a stage must train something (vision, projector, llm)"
            );
        }
        Ok(())
    }

    /// The conversation template of this stage.
    pub fn template(&self) -> String {
        match &self.train.template {
            Some(t) => t.clone(),
            None if self.stage.is_pretraining() => "plain".into(),
            None => self.data.chat_template.clone(),
        }
    }

    /// The data file of this stage from the preset (`--data` wins).
    pub fn default_data(&self) -> Option<PathBuf> {
        if self.stage.is_pretraining() {
            self.data.pretrain_data.clone()
        } else {
            self.data.instruct_data.clone()
        }
    }

    pub fn as_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The settings not left at their defaults, with where each came from.
    pub fn describe_sources(&self) -> String {
        super::keys::describe_sources(self.stage.name(), &self.as_json(), &self.sources)
    }
}

/// A stage-specific shorthand: `--set lr=1e-4` means `stages.<stage>.lr` when the key has no
/// dot, and `--set rollout.lambda=1` means `stages.<stage>.rollout.lambda`.
pub fn expand_override(assignment: &str, stage: Stage) -> String {
    // A stage's own tables: `--set rollout.lambda=1` = `--set stages.<stage>.rollout.lambda=1`.
    const STAGE_TABLES: [&str; 3] = ["rollout", "lora", "schedule"];
    expand_override_into(
        assignment,
        &format!("stages.{}", stage.name()),
        &STAGE_TABLES,
    )
}

/// `--set key=value` with a key without a dot, or in one of `nested` (tables of `table`), as a
/// key of `table`; other assignments as given.
pub fn expand_override_into(assignment: &str, table: &str, nested: &[&str]) -> String {
    match assignment.split_once('=') {
        Some((key, _))
            if !key.trim().is_empty()
                && (!key.contains('.')
                    || nested.contains(&key.trim().split('.').next().unwrap_or(""))) =>
        {
            format!("{table}.{}", assignment.trim_start())
        }
        _ => assignment.to_string(),
    }
}

/// Settings of several stages at once (the demo resolves them all up front to fail early).
pub type StagePlan = BTreeMap<(Role, Stage), StageSettings>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset::{apply_override, load_document};

    #[test]
    fn stage_defaults_then_sections_then_overrides() {
        let mut doc = load_document("shapes-tiny").unwrap();
        let pt = StageSettings::resolve(&doc, Stage::Pretrain, Role::Student).unwrap();
        assert_eq!(pt.template(), "plain");
        apply_override(&mut doc.table, &expand_override("lr=0.5", Stage::Sft)).unwrap();
        let sft = StageSettings::resolve(&doc, Stage::Sft, Role::Student).unwrap();
        assert_eq!(sft.train.lr, 0.5);
        assert_ne!(sft.template(), "plain");
    }

    #[test]
    fn a_set_beats_every_preset_layer_role_tables_included() {
        // shapes-small's [teacher.stages.sft] sets the teacher's SFT lr above `stages.sft`.
        let plain = load_document("shapes-small").unwrap();
        let preset = StageSettings::resolve(&plain, Stage::Sft, Role::Teacher).unwrap();
        for set in ["lr=0.125", "stages.sft.lr=0.125", "train.lr=0.125"] {
            let mut doc = load_document("shapes-small").unwrap();
            doc.set(&expand_override(set, Stage::Sft)).unwrap();
            let teacher = StageSettings::resolve(&doc, Stage::Sft, Role::Teacher).unwrap();
            assert_ne!(preset.train.lr, 0.125);
            assert_eq!(teacher.train.lr, 0.125, "{set}");
            let student = StageSettings::resolve(&doc, Stage::Sft, Role::Student).unwrap();
            assert_eq!(student.train.lr, 0.125, "{set}");
        }
        // A stage's --set leaves the other stages alone.
        let mut doc = load_document("shapes-small").unwrap();
        doc.set(&expand_override("lr=0.125", Stage::Sft)).unwrap();
        let dft = StageSettings::resolve(&doc, Stage::Dft, Role::Student).unwrap();
        assert_ne!(dft.train.lr, 0.125);
    }

    #[test]
    fn unknown_keys_are_named() {
        let mut doc = load_document("shapes-tiny").unwrap();
        apply_override(&mut doc.table, "train.learning_rate=1").unwrap();
        let err = format!(
            "{:#}",
            StageSettings::resolve(&doc, Stage::Sft, Role::Student).unwrap_err()
        );
        assert!(err.contains("learning_rate"), "{err}");
        let mut doc = load_document("shapes-tiny").unwrap();
        apply_override(&mut doc.table, "distill.gama_rel=1").unwrap();
        let err = format!(
            "{:#}",
            StageSettings::resolve(&doc, Stage::Dft, Role::Student).unwrap_err()
        );
        assert!(err.contains("gama_rel"), "{err}");
        let mut doc = load_document("shapes-tiny").unwrap();
        apply_override(&mut doc.table, "stages.sftt.lr=1").unwrap();
        let err = format!(
            "{:#}",
            StageSettings::resolve(&doc, Stage::Sft, Role::Student).unwrap_err()
        );
        assert!(err.contains("sftt"), "{err}");
    }
}
