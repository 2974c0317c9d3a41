//! `mmkd distill-data`: a teacher (local, or behind the chat-completions API) writes a
//! LLaVA-format dataset from a folder of unlabeled images and a recipe.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::Value;

use super::train::{resolve_settings, StageArgs};
use crate::checkpoint::LoadedModel;
use crate::config::Stage;
use crate::datagen::client::ApiSettings;
use crate::datagen::job::CACHE_DIR;
use crate::datagen::logprobs::{ApiCache, RowBuilder, TokenMap};
use crate::datagen::{describe, run as run_job, DataTeacher, JobRequest, Recipe, SpanCheck};
use crate::models::llava::{BuildOptions, Trainable};
use crate::prompt::PromptLayout;
use crate::teacher_cache::TeacherIdentity;

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
    /// Also store the teacher's top-K log-probabilities in the teacher-cache format
    /// (OUT/teacher-cache, for `dft --teacher-cache`): a local teacher's at every position DFT
    /// distils; a server's `top_logprobs` (K ≤ 20) at the answer tokens, one question a record,
    /// in --student's tokenization.
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
        (None, Some(url)) => DataTeacher::api(ApiSettings {
            url: url.clone(),
            model: args.model.clone(),
            api_key: api_key(&args.api_key_env)?,
            concurrency: args.concurrency,
            retries: args.retries,
            timeout: seconds(args.timeout, "--timeout")?,
            backoff: seconds(args.backoff, "--backoff")?,
        })?,
        (None, None) => bail!("pass --teacher MODEL or --teacher-url URL"),
    };
    let student = match &args.student {
        Some(s) => Some(load_student(s, args.device)?),
        None => None,
    };
    let span_check = span_check(&args, &teacher, student.as_ref())?;
    let cache_settings = match args.keep_logprobs {
        Some(_) => Some(resolve_settings(
            &StageArgs::preset_only(&args.config, &args.set, &args.out, Some(args.device)),
            Stage::Dft,
        )?),
        None => None,
    };
    // A server's top_logprobs, in the student's tokenization of the DFT they are for.
    let api_parts = match (&args.teacher_url, args.keep_logprobs, &cache_settings) {
        (Some(url), Some(k), Some(settings)) => {
            Some(api_cache_parts(&args, url, k, settings, student.as_ref())?)
        }
        _ => None,
    };
    let api_cache = match (&api_parts, &cache_settings, &student) {
        (Some((tokenization, map, teacher)), Some(settings), Some(student)) => Some(ApiCache {
            rows: RowBuilder {
                tokenization,
                map,
                k: args.keep_logprobs.unwrap_or(1),
                vocab: student.model.config.text_config.vocab_size,
            },
            settings,
            student,
            teacher: teacher.clone(),
        }),
        _ => None,
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
        api_cache: api_cache.as_ref(),
        after_data: Some(&keep_cache),
        allow_empty: false,
        progress: !args.quiet,
    })?;
    super::print_report(args.json, &summary, || describe(&summary))
}

/// What a server's kept log-probabilities need: the DFT's tokenization of the student, its
/// token map, and the teacher's identity.
fn api_cache_parts(
    args: &DistillDataArgs,
    url: &str,
    k: usize,
    settings: &crate::config::StageSettings,
    student: Option<&LoadedModel>,
) -> Result<(SpanCheck, TokenMap, TeacherIdentity)> {
    let student = student.with_context(|| {
        "--keep-logprobs with --teacher-url needs --student MODEL: the server's tokens are kept \
         as the student's token ids"
    })?;
    ensure!(
        (1..=crate::serve::api::TOP_LOGPROBS_LIMIT).contains(&k),
        "--keep-logprobs {k}: a server reports 1 to {} alternatives a token",
        crate::serve::api::TOP_LOGPROBS_LIMIT
    );
    ensure!(
        settings.distill.temperature == 1.0,
        "--keep-logprobs with --teacher-url: a server reports log-probabilities at temperature 1, \
         the DFT of --config {} reads the teacher at {}: set distill.temperature=1",
        args.config,
        settings.distill.temperature
    );
    let template = mmkd_datasets::Template::by_name_or_path(&settings.template())?;
    let tokenization = SpanCheck::new(student, template, settings.data.max_length);
    let vocab = student.model.config.text_config.vocab_size;
    let map = TokenMap::new(vocab, |id| student.decode(&[id]).ok());
    let teacher = TeacherIdentity {
        path: url.to_string(),
        digest: format!("api model {}", args.model),
    };
    Ok((tokenization, map, teacher))
}

fn load_student(spec: &str, device: crate::runtime::DeviceSpec) -> Result<LoadedModel> {
    let mut options = BuildOptions::new(Trainable::NONE, 0);
    options.device = device.open()?;
    LoadedModel::load(spec, &options).with_context(|| format!("--student {spec}"))
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
fn span_check(
    args: &DistillDataArgs,
    teacher: &DataTeacher,
    student: Option<&LoadedModel>,
) -> Result<Option<SpanCheck>> {
    if let Some(bundle) = student {
        let template =
            PromptLayout::choose(bundle, args.template.as_deref())?.with_context(|| {
                format!(
                    "--student {} has no chat template: pass --template NAME",
                    args.student.as_deref().unwrap_or("")
                )
            })?;
        return Ok(Some(SpanCheck::new(bundle, template, args.max_length)));
    }
    Ok(teacher
        .local_model()
        .map(|(model, template)| SpanCheck::new(model, template.clone(), args.max_length)))
}
