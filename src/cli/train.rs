//! `mmkd pretrain | sft | dpt | dft`: run one training stage from a preset.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::settings::expand_override;
use crate::config::{load_document, Role, Stage, StageSettings};
use crate::runtime::DeviceSpec;
use crate::stages::{run_stage, StageRun};

#[derive(Debug, Args)]
pub struct StageArgs {
    /// Preset name (shapes-tiny, shapes-small, llava-kd-qwen1.5-0.5b, llava-kd-qwen2.5-0.5b) or TOML file.
    #[arg(long, default_value = "shapes-small")]
    pub config: String,
    /// Override a preset value: `key.path=value`; a key without a dot applies to this stage
    /// (`--set lr=1e-4` = `--set stages.<stage>.lr=1e-4`). A `--set` beats every preset layer,
    /// the role tables (`[teacher.stages.<stage>]`) included. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Which model of the preset to build when starting fresh.
    #[arg(long, value_enum, default_value = "student")]
    pub role: Role,
    /// Start from this checkpoint (the previous stage's output).
    #[arg(long)]
    pub init: Option<String>,
    /// Take the vision tower from this checkpoint (a SigLIP/CLIP directory such as `mmkd
    /// tower`'s output, a LLaVA checkpoint, or a hub id) instead of the preset's; with --llm
    /// the model is composed from both checkpoints.
    #[arg(long)]
    pub vision: Option<String>,
    /// Compose the model from this LLM checkpoint (with --vision).
    #[arg(long, requires = "vision")]
    pub llm: Option<String>,
    /// Teacher checkpoint (dpt, dft).
    #[arg(long, conflicts_with = "teacher_cache")]
    pub teacher: Option<String>,
    /// Distil from an offline teacher cache (`mmkd teacher-cache`) instead of a teacher
    /// checkpoint: the teacher is neither loaded nor run (dpt, dft).
    #[arg(long)]
    pub teacher_cache: Option<PathBuf>,
    /// LLaVA JSON/JSONL data (default: the preset's data file for this stage).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image root the data's image paths are relative to (default: the preset's `data.images`).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Tokenizer (tokenizer.json) of a freshly built model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output directory: the trained model, metrics.jsonl, loss.png, summary.json, checkpoints/.
    #[arg(long)]
    pub out: PathBuf,
    /// Stop after N optimizer steps; the learning-rate schedule is laid out for N
    /// (`train.max_steps`; default: the preset's `epochs` over the data).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Write a resumable checkpoint to OUT/checkpoints every N optimizer steps
    /// (`train.save_every`; default 0: only the final model).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Train again into an --out that holds a finished stage or an earlier run's checkpoints,
    /// replacing them.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Seed of this stage's data order (`train.seed`; default 0). A fresh model's initial
    /// weights have their own seed, --init-seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seed of a freshly built model's weights (`models.<role>.seed`); no effect with --init.
    #[arg(long)]
    pub init_seed: Option<u64>,
    /// Held-out data (LLaVA JSON/JSONL, images under --images) for the validation pass: its
    /// objective value goes to validation.jsonl (`data.val_data`).
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Held-out VQA questions (`mmkd eval vqa` format) the validation pass answers
    /// (`data.val_questions`; with --val-answers).
    #[arg(long, requires = "val_answers")]
    pub val_questions: Option<PathBuf>,
    /// Reference answers of --val-questions (`data.val_answers`).
    #[arg(long, requires = "val_questions")]
    pub val_answers: Option<PathBuf>,
    /// Run the validation pass every N optimizer steps and after the last
    /// (`train.validate_every`; 0: never).
    #[arg(long)]
    pub validate_every: Option<usize>,
    /// Where the models run: cpu, cuda or cuda:N (default: the preset's `train.device`, cpu).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Print the summary as one JSON line at the end.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Resolves the preset for a stage with the command's overrides applied.
impl StageArgs {
    /// The arguments of a command that only resolves a stage's settings from a preset and
    /// `--set`s (`teacher-cache`, `distill-data --keep-logprobs`): no model, no data.
    pub fn preset_only(
        config: &str,
        set: &[String],
        out: &std::path::Path,
        device: Option<crate::runtime::DeviceSpec>,
    ) -> Self {
        StageArgs {
            config: config.to_string(),
            set: set.to_vec(),
            role: Role::Student,
            init: None,
            vision: None,
            llm: None,
            teacher: None,
            teacher_cache: None,
            data: None,
            images: None,
            tokenizer: None,
            out: out.to_path_buf(),
            max_steps: None,
            save_every: None,
            resume: false,
            force: false,
            seed: None,
            init_seed: None,
            val_data: None,
            val_questions: None,
            val_answers: None,
            validate_every: None,
            device,
            json: false,
            quiet: true,
        }
    }
}

pub fn resolve_settings(args: &StageArgs, stage: Stage) -> Result<StageSettings> {
    let mut doc = load_document(&args.config)?;
    let mut sets: Vec<String> = args.set.iter().map(|s| expand_override(s, stage)).collect();
    if let Some(n) = args.max_steps {
        sets.push(format!("stages.{}.max_steps={n}", stage.name()));
    }
    if let Some(n) = args.save_every {
        sets.push(format!("stages.{}.save_every={n}", stage.name()));
    }
    if let Some(seed) = args.seed {
        sets.push(format!("stages.{}.seed={seed}", stage.name()));
    }
    if let Some(seed) = args.init_seed {
        sets.push(format!("models.{}.seed={seed}", args.role.name()));
    }
    for (key, path) in [
        ("val_data", &args.val_data),
        ("val_questions", &args.val_questions),
        ("val_answers", &args.val_answers),
    ] {
        if let Some(path) = path {
            let path = path.to_str().context("non-UTF-8 path")?;
            sets.push(format!("data.{key}={}", toml::Value::from(path)));
        }
    }
    if let Some(n) = args.validate_every {
        sets.push(format!("stages.{}.validate_every={n}", stage.name()));
    }
    if let Some(device) = args.device {
        sets.push(format!("stages.{}.device=\"{device}\"", stage.name()));
    }
    for set in &sets {
        doc.set(set)?;
    }
    let mut settings = StageSettings::resolve(&doc, stage, args.role)?;
    match (&args.vision, &args.llm) {
        (Some(vision), Some(llm)) => {
            settings.model.vision = Some(vision.clone());
            settings.model.llm = Some(llm.clone());
            settings.model.vision_config = None;
            settings.model.text_config = None;
        }
        // The preset's `vision_config`, if any, stays as the check of the tower's architecture.
        (Some(vision), None) => settings.model.vision = Some(vision.clone()),
        _ => {}
    }
    Ok(settings)
}

/// The data file and image root of a stage: the command's, else the preset's.
pub fn data_and_images(
    data: Option<&PathBuf>,
    images: Option<&PathBuf>,
    settings: &StageSettings,
) -> Result<(PathBuf, PathBuf)> {
    let stage = settings.stage;
    let data = data
        .cloned()
        .or_else(|| settings.default_data())
        .with_context(|| format!("no data for `{}`: pass --data FILE", stage.name()))?;
    let images = images
        .cloned()
        .or_else(|| settings.data.images.clone())
        .with_context(|| "no image root: pass --images DIR".to_string())?;
    Ok((data, images))
}

pub fn run(args: StageArgs, stage: Stage) -> Result<()> {
    let settings = resolve_settings(&args, stage)?;
    let leader = crate::runtime::world::world().is_leader();
    if !args.quiet && leader {
        eprint!("{}", settings.describe_sources());
    }
    let (data, images) = data_and_images(args.data.as_ref(), args.images.as_ref(), &settings)?;
    let run = StageRun {
        settings,
        init: args.init.clone(),
        teacher: args.teacher.clone(),
        teacher_cache: args.teacher_cache.clone(),
        data,
        images,
        out: args.out.clone(),
        tokenizer: args.tokenizer.clone(),
        resume: args.resume,
        force: args.force,
        progress: !args.quiet,
    };
    let summary = run_stage(&run)?;
    if !leader {
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} steps, {} samples, loss {:.4} → {:.4}, {:.1} samples/s, {:.1}s; model in {}",
            stage.name(),
            summary.steps,
            summary.samples_seen,
            summary.first_loss,
            summary.final_loss,
            summary.samples_per_s,
            summary.wall_seconds,
            args.out.display()
        );
        if let Some(r) = &summary.rollouts {
            println!(
                "rollouts: {} micro-batches answered by the student, {} by the teacher; {} \
                 answers, {} tokens, {} cut at rollout.max_new_tokens, {} equal to the data's \
                 (where scored; a sample logged in {})",
                r.student_micro_batches,
                r.teacher_micro_batches,
                r.answers,
                r.tokens,
                r.capped,
                r.matches,
                args.out
                    .join(crate::stages::rollout::ROLLOUTS_FILE)
                    .display()
            );
        }
    }
    Ok(())
}
