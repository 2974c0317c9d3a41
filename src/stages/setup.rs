//! What a stage run sets up before its first step: the teacher cache's manifest, the resume
//! point and the digest that guards it, the student, the teacher plan, the trainable modules and
//! their optimizer groups.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use mmkd_nn::{ParamBuilder, ParamStore, WeightSource};

use super::init::{from_checkpoint_with, from_spec};
use super::StageRun;
use crate::checkpoint::LoadedModel;
use crate::config::{Module, StageSettings};
use crate::models::llava::{Trainable, PROJECTOR_PREFIX, VISION_PREFIX};
use crate::models::text_config::TextConfig;
use crate::objective::{LmShape, Objective, PARAMS_PREFIX};
use crate::teacher::OnlineTeacher;
use crate::teacher_cache::Manifest;
use crate::train::state::{digest, OBJECTIVE_FILE};
use crate::train::ParamGroupConfig;

/// How a stage gets its teacher, decided before the data is read.
#[allow(clippy::large_enum_variant)]
pub(super) enum TeacherPlan {
    None,
    Online(OnlineTeacher),
    Cached(PathBuf, Manifest),
}

/// Where the objective's own parameters (see `objective::Term::bind`) come from: the
/// checkpoint a run resumes from, or a fresh start from the run's seed.
pub(super) fn objective_params(
    store: &ParamStore,
    resume_from: Option<&Path>,
    seed: u64,
    device: &Device,
) -> Result<ParamBuilder> {
    let source = match resume_from.map(|dir| dir.join(OBJECTIVE_FILE)) {
        Some(file) if file.exists() => WeightSource::from_file(&file, device)
            .with_context(|| format!("reading the objective's parameters {}", file.display()))?,
        _ => WeightSource::empty(),
    };
    Ok(ParamBuilder::new(store, Arc::new(source), seed, device).pp(PARAMS_PREFIX))
}

/// The depth and width the objective's terms see of a language model.
pub(super) fn lm_shape(config: &TextConfig) -> LmShape {
    LmShape {
        layers: config.num_hidden_layers,
        width: config.hidden_size,
    }
}

/// The modules whose own weights train (those with LoRA adapters train through them instead).
pub(super) fn trainable_modules(settings: &StageSettings) -> Trainable {
    let modules = settings.train.modules(settings.stage);
    super::lora::fully_trained(
        settings,
        Trainable {
            vision: modules.contains(&Module::Vision),
            projector: modules.contains(&Module::Projector),
            llm: modules.contains(&Module::Llm),
        },
    )
}

/// The projector's parameter group, and the vision tower's when it trains.
pub(super) fn optimizer_groups(
    settings: &StageSettings,
    vars: &[(String, Var)],
) -> Vec<ParamGroupConfig> {
    let group = |name: &str, prefix: &str, lr_scale: f64| ParamGroupConfig {
        name: name.into(),
        prefixes: vec![format!("{prefix}.")],
        lr_scale,
        weight_decay: settings.train.weight_decay,
    };
    let mut groups = vec![group(
        "projector",
        PROJECTOR_PREFIX,
        settings.train.projector_lr_scale,
    )];
    if vars
        .iter()
        .any(|(name, _)| name.starts_with(&format!("{VISION_PREFIX}.")))
    {
        groups.push(group(
            "vision",
            VISION_PREFIX,
            settings.train.vision_lr_scale,
        ));
    }
    groups
}

/// Settings that change no trained number, left out of the resume digest: a run may resume
/// with other values (and checkpoints of builds that lacked them still resume).
const UNDIGESTED: &[(&str, &str)] = &[
    ("train", "parallel_micro_batches"),
    ("train", "loss_chunk_rows"),
    ("train", "device"),
    ("train", "validate_every"),
    ("train", "validate_questions"),
    ("train", "max_loss_spike"),
    ("train", "max_grad_norm_spike"),
    ("data", "val_data"),
    ("data", "val_questions"),
    ("data", "val_answers"),
];

/// The digest a checkpoint records so that a resume with other settings is refused. The
/// [`UNDIGESTED`] settings are left out, and so is an objective that is the stage's built-in
/// one (checkpoints of builds before objectives resume). `grad_accum` is the job's micro-batches
/// per step (ranks × grad_accum): a checkpoint of N ranks resumes on M with the same global
/// batch.
pub(super) fn settings_digest(run: &StageRun, cache: Option<&Manifest>, ranks: usize) -> String {
    let settings = &run.settings;
    let mut digested = settings.as_json();
    if let Some(train) = digested.get_mut("train").and_then(|t| t.as_object_mut()) {
        train.insert(
            "grad_accum".into(),
            (settings.train.grad_accum * ranks).into(),
        );
    }
    for (section, key) in UNDIGESTED {
        if let Some(table) = digested.get_mut(*section).and_then(|t| t.as_object_mut()) {
            table.remove(*key);
        }
    }
    if settings.objective == settings.stage.builtin_objective(&settings.distill) {
        if let Some(all) = digested.as_object_mut() {
            all.remove("objective");
        }
    }
    digest(&serde_json::json!({
        "settings": digested, "data": run.data, "images": run.images, "init": run.init,
        "teacher": run.teacher,
        "teacher_cache": cache.map(Manifest::identity_digest),
    }))
}

/// The teacher cache's manifest when the run reads one; a cache given to an objective that
/// reads no teacher is refused.
pub(super) fn open_cache_manifest(
    run: &StageRun,
    objective: &Objective,
) -> Result<Option<Manifest>> {
    match (&run.teacher_cache, objective.teacher_term()) {
        (Some(dir), Some(_)) => Ok(Some(Manifest::read(dir)?)),
        (Some(_), None) => bail!(
            "--teacher-cache: the objective of `{}` ({}) reads no teacher; it is for objectives \
             with a distillation term (dpt, dft)",
            run.settings.stage.name(),
            objective.names().join(", ")
        ),
        (None, _) => Ok(None),
    }
}

/// The model the stage trains: the resumed checkpoint, `--init`, or (pre-training) the
/// preset's model built fresh or composed.
pub(super) fn load_student(
    run: &StageRun,
    resume: Option<&Path>,
    trainable: Trainable,
    frozen_dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let settings = &run.settings;
    let lora = super::lora::plan(settings);
    if lora.is_some() {
        super::lora::adapter_base(run)?;
    }
    let student = match (resume, &run.init) {
        (Some(ckpt), _) => from_checkpoint_with(
            ckpt.to_str().context("non-UTF-8 path")?,
            trainable,
            frozen_dtype,
            device,
            lora,
        )?,
        (None, Some(init)) => from_checkpoint_with(init, trainable, frozen_dtype, device, lora)?,
        (None, None) if settings.stage.is_pretraining() => {
            let tokenizer = run
                .tokenizer
                .clone()
                .or_else(|| settings.data.tokenizer.clone());
            from_spec(
                &settings.model,
                tokenizer.as_deref(),
                trainable,
                frozen_dtype,
                device,
            )?
        }
        (None, None) => bail!(
            "`{}` continues a trained model: pass --init DIR (the previous stage's output)",
            settings.stage.name()
        ),
    };
    if let Some(lora) = &settings.train.lora {
        super::lora::check_targets(&student.model, lora)?;
    }
    Ok(student)
}

/// Where the teacher side comes from, as the objective asks: none, an online teacher (loaded
/// and checked against the student now), or a cache (opened once the data is read).
pub(super) fn plan_teacher(
    run: &StageRun,
    objective: &Objective,
    student: &LoadedModel,
    cache: Option<Manifest>,
) -> Result<TeacherPlan> {
    let stage = run.settings.stage.name();
    Ok(match (objective.teacher_term(), &run.teacher, cache) {
        (None, Some(_), _) => bail!(
            "--teacher: the objective of `{stage}` ({}) reads no teacher; leave --teacher out, or \
             add a distillation term to `stages.{stage}.objective`",
            objective.names().join(", "),
        ),
        (None, None, _) => TeacherPlan::None,
        (Some(_), Some(_), Some(_)) => {
            bail!("--teacher and --teacher-cache are mutually exclusive: give one")
        }
        (Some(_), Some(spec), None) => TeacherPlan::Online(
            OnlineTeacher::load(spec, &run.settings)?.for_student(student, objective)?,
        ),
        (Some(_), None, Some(manifest)) => {
            let dir = run.teacher_cache.clone().context("no --teacher-cache")?;
            TeacherPlan::Cached(dir, manifest)
        }
        (Some(term), None, None) => bail!(
            "`{stage}` distils from a teacher (objective term `{term}`): pass --teacher DIR, or \
             --teacher-cache CACHE (written by `mmkd teacher-cache`)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset::{apply_override, load_document};
    use crate::config::{Role, Stage};

    fn run_with(sets: &[&str]) -> StageRun {
        let mut doc = load_document("shapes-tiny").unwrap();
        for set in sets {
            apply_override(&mut doc.table, set).unwrap();
        }
        StageRun {
            settings: StageSettings::resolve(&doc, Stage::Dft, Role::Student).unwrap(),
            init: Some("init".into()),
            teacher: Some("teacher".into()),
            teacher_cache: None,
            data: "data.json".into(),
            images: "images".into(),
            out: "out".into(),
            tokenizer: None,
            resume: false,
            force: false,
            progress: false,
        }
    }

    #[test]
    fn the_resume_digest_follows_what_changes_numbers_only() {
        let base = settings_digest(&run_with(&[]), None, 1);
        // Scheduling, the device and the validation pass change no trained number.
        for sets in [
            &["train.parallel_micro_batches=2"][..],
            &["train.validate_every=5", "data.val_data=\"val.json\""],
            &["train.validate_questions=10"],
            &["train.device=\"cuda:1\""],
        ] {
            assert_eq!(settings_digest(&run_with(sets), None, 1), base, "{sets:?}");
        }
        // Spelling out the built-in objective is the built-in objective.
        let spelled = "stages.dft.objective=[{ term = \"ce\" }, { term = \"mdist.response\" }, \
                       { term = \"mdist.visual\" }, { term = \"rdist\", weight = 0.5 }]";
        assert_eq!(settings_digest(&run_with(&[spelled]), None, 1), base);
        for set in [
            "stages.dft.lr=0.5",
            "distill.gamma_rel=0.25",
            "stages.dft.objective=[{ term = \"ce\" }]",
        ] {
            assert_ne!(settings_digest(&run_with(&[set]), None, 1), base, "{set}");
        }
        // Two ranks of grad_accum 1 make the step of one process with grad_accum 2.
        let accum = |n: usize| format!("stages.dft.grad_accum={n}");
        assert_eq!(
            settings_digest(&run_with(&[&accum(1)]), None, 2),
            settings_digest(&run_with(&[&accum(2)]), None, 1)
        );
        assert_ne!(
            settings_digest(&run_with(&[&accum(1)]), None, 2),
            settings_digest(&run_with(&[&accum(1)]), None, 1)
        );
    }
}
