//! `mmkd distill-data`: a teacher (local, or behind the chat-completions API) writes a
//! LLaVA-format dataset from a folder of unlabeled images and a recipe.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use super::train::{resolve_settings, StageArgs};
use crate::config::{Role, Stage};
use crate::datagen::client::ApiSettings;
use crate::datagen::job::CACHE_DIR;
use crate::datagen::{describe, run as run_job, DataTeacher, JobRequest, Recipe, SpanCheck};
use crate::models::llava::{BuildOptions, Trainable};
use crate::prompt::PromptLayout;

#[derive(Debug, Args)]
pub struct DistillDataArgs {
    /// Local teacher checkpoint (directory or hub id).
    #[arg(
        long,
        required_unless_present = "teacher_url",
        conflicts_with = "teacher_url"
    )]
    pub teacher: Option<String>,
    /// Base URL of an OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp,
    /// a hosted API, `mmkd serve`), e.g. http://127.0.0.1:8000/v1.
    #[arg(long)]
    pub teacher_url: Option<String>,
    /// The `model` field of the requests (the name the server lists in /v1/models).
    #[arg(long, default_value = "teacher", requires = "teacher_url")]
    pub model: String,
    /// Environment variable holding the API key (sent as a bearer token when set).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Requests in flight at once (API teachers).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Retries of a request refused with 429/5xx, timed out or answered with malformed JSON.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Seconds a request may take.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Seconds before the first retry (doubled each time, at most 30).
    #[arg(long, default_value_t = 1.0)]
    pub backoff: f64,
    /// Recipe: a built-in name (shapes-vqa, shapes-caption) or a TOML file.
    #[arg(long)]
    pub recipe: String,
    /// Folder of images (searched recursively); data.json's image paths are relative to it.
    #[arg(long)]
    pub images: PathBuf,
    /// Output directory: data.json and manifest.json (resumed when it holds this job's
    /// unfinished run).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N images (in path order).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Images per saved chunk (the unit a killed run resumes after).
    #[arg(long, default_value_t = 16)]
    pub chunk_images: usize,
    /// Prompts per generation batch (local teachers).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The chat template the teacher is prompted in (local teachers; default: its own).
    #[arg(long)]
    pub template: Option<String>,
    /// The model whose tokenizer and template the supervised-span check uses (default: a
    /// local teacher; an API teacher without it skips the check).
    #[arg(long)]
    pub student: Option<String>,
    /// Longest tokenized sample kept (the span check's max_length).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Also store the teacher's top-K log-probabilities at every position DFT distils, in the
    /// teacher-cache format (OUT/teacher-cache, for `dft --teacher-cache`); local teachers.
    #[arg(long, value_name = "K")]
    pub keep_logprobs: Option<usize>,
    /// Preset (or TOML) of the DFT the kept log-probabilities are for (template, max_length,
    /// temperature), as for `mmkd teacher-cache --config`.
    #[arg(long, default_value = "shapes-small")]
    pub config: String,
    /// Override a preset value of that DFT (`--set distill.temperature=2`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where a local teacher runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::runtime::DeviceSpec,
    /// Print the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: DistillDataArgs) -> Result<()> {
    let recipe = Recipe::load(&args.recipe)?;
    let teacher = match (&args.teacher, &args.teacher_url) {
        (Some(t), _) => {
            DataTeacher::local(t, args.template.as_deref(), args.batch_size, args.device)?
        }
        (None, Some(url)) => {
            if args.keep_logprobs.is_some() {
                bail!(
                    "--keep-logprobs needs a local --teacher: a chat-completions server reports no \
                     distribution at the image tokens, which the teacher-cache format holds"
                );
            }
            DataTeacher::api(ApiSettings {
                url: url.clone(),
                model: args.model.clone(),
                api_key: api_key(&args.api_key_env)?,
                concurrency: args.concurrency,
                retries: args.retries,
                timeout: seconds(args.timeout, "--timeout")?,
                backoff: seconds(args.backoff, "--backoff")?,
            })?
        }
        (None, None) => bail!("pass --teacher MODEL or --teacher-url URL"),
    };
    let span_check = span_check(&args, &teacher)?;
    let cache_settings = match args.keep_logprobs {
        Some(_) => Some(resolve_settings(&cache_stage_args(&args), Stage::Dft)?),
        None => None,
    };
    let keep_cache = |data: &std::path::Path| -> Result<Value> {
        let (Some(k), Some(settings), Some(t)) = (
            args.keep_logprobs,
            cache_settings.clone(),
            args.teacher.clone(),
        ) else {
            return Ok(Value::Null);
        };
        let summary = crate::teacher::build_cache(&crate::teacher::BuildRequest {
            teacher: t,
            data: data.to_path_buf(),
            images: args.images.clone(),
            out: args.out.join(CACHE_DIR),
            settings,
            top_k: k,
            batch_size: args.batch_size,
            shard_size: 1024,
            progress: !args.quiet,
        })
        .context("writing the teacher's log-probabilities (--keep-logprobs)")?;
        Ok(
            serde_json::json!({"dir": CACHE_DIR, "top_k": k, "samples": summary.samples,
                              "bytes": summary.bytes}),
        )
    };
    let summary = run_job(&JobRequest {
        teacher: &teacher,
        recipe: &recipe,
        images: args.images.clone(),
        out: args.out.clone(),
        limit: args.limit,
        chunk_images: args.chunk_images,
        span_check: span_check.as_ref(),
        logprobs: recipe.filters.min_mean_logprob.is_some(),
        after_data: Some(&keep_cache),
        allow_empty: false,
        progress: !args.quiet,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", describe(&summary));
    }
    Ok(())
}

fn seconds(v: f64, flag: &str) -> Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v >= 0.0,
        "{flag} must be a number of seconds ≥ 0, got {v}"
    );
    Ok(Duration::from_secs_f64(v))
}

/// The key in `var`; a variable named by hand that is unset is an error, the default one may
/// be absent (local servers take no key).
fn api_key(var: &str) -> Result<Option<String>> {
    match std::env::var(var) {
        Ok(k) if !k.trim().is_empty() => Ok(Some(k.trim().to_string())),
        _ if var == "OPENAI_API_KEY" => Ok(None),
        _ => bail!("--api-key-env {var}: the environment variable {var} is not set"),
    }
}

/// The span check's model: --student, else a local teacher.
fn span_check(args: &DistillDataArgs, teacher: &DataTeacher) -> Result<Option<SpanCheck>> {
    if let Some(student) = &args.student {
        let mut options = BuildOptions::new(Trainable::NONE, 0);
        options.device = args.device.open()?;
        let bundle = crate::checkpoint::LoadedModel::load(student, &options)
            .with_context(|| format!("--student {student}"))?;
        let template =
            PromptLayout::choose(&bundle, args.template.as_deref())?.with_context(|| {
                format!("--student {student} has no chat template: pass --template NAME")
            })?;
        return Ok(Some(SpanCheck::new(&bundle, template, args.max_length)));
    }
    Ok(teacher
        .local_model()
        .map(|(model, template)| SpanCheck::new(model, template.clone(), args.max_length)))
}

fn cache_stage_args(args: &DistillDataArgs) -> StageArgs {
    StageArgs {
        config: args.config.clone(),
        set: args.set.clone(),
        role: Role::Student,
        init: None,
        vision: None,
        llm: None,
        teacher: None,
        teacher_cache: None,
        data: None,
        images: None,
        tokenizer: None,
        out: args.out.clone(),
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
        device: Some(args.device),
        json: false,
        quiet: true,
    }
}
