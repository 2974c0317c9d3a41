//! `mmkd data …`: make the synthetic data set, train a tokenizer, check a data file, select
//! from one.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mmkd_datasets::check::{check_dataset, CheckOptions, TokenCheck};
use mmkd_datasets::{
    collect_training_text, generate_synth, image_token_id, load_tokenizer, save_tokenizer,
    train_bpe, ImageCheck, Progress, SynthConfig, Template, TokenizeConfig, Truncation,
};

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Generate the synthetic shapes data set (images, LLaVA JSON, evaluation files).
    Synth(SynthArgs),
    /// Train a byte-level BPE tokenizer on LLaVA data and save it as tokenizer.json.
    Tokenizer(TokenizerArgs),
    /// Check a LLaVA data file: counts, and every problem with its sample id.
    Check(CheckArgs),
    /// Keep the samples a teacher and/or student rank highest (teacher–student divergence,
    /// teacher confidence, student loss): `--budget N|P%` of the data, as a LLaVA JSON file.
    Select(super::data_select::SelectArgs),
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (created; must not already hold a data set).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the scenes, questions and captions (same seed, same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of training images.
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    /// Number of validation images.
    #[arg(long, default_value_t = 200)]
    pub val: usize,
    /// Number of test images.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    /// Image width and height in pixels.
    #[arg(long = "image-size", default_value_t = 64)]
    pub image_size: u32,
}

#[derive(Debug, Args)]
pub struct TokenizerArgs {
    /// A LLaVA JSON/JSONL file, or a directory searched for them.
    #[arg(long)]
    pub data: PathBuf,
    /// Vocabulary size of the trained tokenizer (special tokens included).
    #[arg(long = "vocab-size", default_value_t = 1024)]
    pub vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long, default_value = "tokenizer.json")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImageCheckArg {
    None,
    Exists,
    Header,
    Decode,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TruncationArg {
    Truncate,
    Skip,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The LLaVA JSON or JSONL file.
    #[arg(long)]
    pub data: PathBuf,
    /// Directory the samples' image paths are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// Take the template, tokenizer, visual tokens per image and max length from this
    /// checkpoint (its mmkd_training.json for the template and max length); flags given
    /// as well win.
    #[arg(long, conflicts_with = "config")]
    pub model: Option<String>,
    /// Take the template and max length (and `data.tokenizer`) from this preset's stage
    /// (--stage); flags given as well win.
    #[arg(long)]
    pub config: Option<String>,
    /// The stage of --config whose settings apply.
    #[arg(long, value_enum, default_value = "sft", requires = "config")]
    pub stage: crate::config::Stage,
    /// Template name (plain, vicuna_v1, phi, compact, qwen2_base, chatml, llama3) or TOML file; with
    /// a tokenizer, every sample is tokenized and its labels verified.
    #[arg(long)]
    pub template: Option<String>,
    /// tokenizer.json (or a directory holding one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Positions per image block when counting tokens (default: --model's, or that of
    /// --config's fresh tower, else 1).
    #[arg(long = "tokens-per-image")]
    pub tokens_per_image: Option<usize>,
    /// Longest sample in tokens (default: --model's or --config's, else 2048).
    #[arg(long = "max-length")]
    pub max_length: Option<usize>,
    /// Problems printed in full per kind; the rest are counted.
    #[arg(long, default_value_t = 5)]
    pub show: usize,
    /// What happens to a sample longer than --max-length: truncate it (never inside an image block) or skip it.
    #[arg(long, value_enum, default_value_t = TruncationArg::Truncate)]
    pub truncation: TruncationArg,
    /// How far to check images: decode fully by default.
    #[arg(long = "image-check", value_enum, default_value_t = ImageCheckArg::Decode)]
    pub image_check: ImageCheckArg,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Synth(a) => synth(a),
        DataCommand::Tokenizer(a) => tokenizer(a),
        DataCommand::Check(a) => check(a),
        DataCommand::Select(a) => super::data_select::run(a),
    }
}

/// Progress bars on stderr (hidden when stderr is not a terminal).
struct Bars(Mutex<Option<ProgressBar>>);

impl Bars {
    fn new() -> Self {
        Bars(Mutex::new(None))
    }
}

impl Progress for Bars {
    fn start(&self, stage: &str, total: u64) {
        let bar = ProgressBar::new(total).with_message(stage.to_string());
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(bar);
        }
    }
    fn inc(&self, n: u64) {
        if let Ok(slot) = self.0.lock() {
            if let Some(bar) = slot.as_ref() {
                bar.inc(n);
            }
        }
    }
    fn finish(&self) {
        if let Ok(mut slot) = self.0.lock() {
            if let Some(bar) = slot.take() {
                bar.finish_and_clear();
            }
        }
    }
}

fn synth(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        seed: a.seed,
        train: a.train,
        val: a.val,
        test: a.test,
        image_size: a.image_size,
    };
    let start = std::time::Instant::now();
    let summary = generate_synth(&a.out, &cfg, &Bars::new()).map_err(|e| {
        crate::checkpoint::storage::explain(
            e,
            &a.out,
            || {
                "each file written so far is whole (written beside its name, then renamed), \
                 but the data set is unfinished: it has no manifest.json yet"
                    .into()
            },
            "run the same command again",
        )
    })?;
    let images = summary.train.images + summary.val.images + summary.test.images;
    println!(
        "wrote {images} images and their data to {} in {:.1?}",
        a.out.display(),
        start.elapsed()
    );
    for (name, s) in [
        ("train", &summary.train),
        ("val", &summary.val),
        ("test", &summary.test),
    ] {
        println!(
            "  {name}: {} images, {} pretrain samples, {} instruct samples ({} text-only), {} questions, {} POPE questions",
            s.images, s.pretrain_samples, s.instruct_samples, s.text_only_samples, s.questions, s.pope_questions
        );
    }
    Ok(())
}

fn tokenizer(a: TokenizerArgs) -> Result<()> {
    let (texts, files) = collect_training_text(&a.data)?;
    let tok = train_bpe(&texts, a.vocab_size)?;
    save_tokenizer(&tok, &a.out)?;
    println!(
        "trained a {}-token byte-level BPE tokenizer on {} texts from {} file(s); wrote {}",
        tok.get_vocab_size(true),
        texts.len(),
        files.len(),
        a.out.display()
    );
    Ok(())
}

/// What `data check` takes from --model or --config.
#[derive(Default)]
struct CheckSettings {
    template: Option<Template>,
    tokenizer: Option<PathBuf>,
    tokens_per_image: Option<usize>,
    max_length: Option<usize>,
}

impl CheckSettings {
    fn of(a: &CheckArgs) -> Result<Self> {
        if let Some(model) = &a.model {
            // The config and files only: no weights are read.
            let dir = crate::checkpoint::hub::resolve_model(model)?;
            let config = crate::checkpoint::read_config(&dir)?;
            let record = crate::checkpoint::training::TrainingRecord::read(&dir)?;
            return Ok(Self {
                template: record.as_ref().map(|r| r.template.clone()),
                tokenizer: Some(dir.join("tokenizer.json")),
                tokens_per_image: Some(
                    config
                        .feature_selection()?
                        .tokens_per_image(&config.vision_config),
                ),
                max_length: record.map(|r| r.max_length),
            });
        }
        if let Some(preset) = &a.config {
            let doc = crate::config::load_document(preset)?;
            let settings =
                crate::config::StageSettings::resolve(&doc, a.stage, crate::config::Role::Student)?;
            // A fresh tower's tokens per image follow from its architecture.
            let model = &settings.model;
            let tokens_per_image = model
                .fresh_vision_config()
                .with_context(|| format!("{preset}: the model's vision_config"))?
                .map(|config| {
                    Ok::<_, anyhow::Error>(model.feature_select()?.tokens_per_image(&config))
                })
                .transpose()?;
            return Ok(Self {
                template: Some(Template::by_name_or_path(&settings.template())?),
                tokenizer: settings.data.tokenizer.clone(),
                tokens_per_image,
                max_length: Some(settings.data.max_length),
            });
        }
        Ok(Self::default())
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let image_check = match a.image_check {
        ImageCheckArg::None => ImageCheck::None,
        ImageCheckArg::Exists => ImageCheck::Exists,
        ImageCheckArg::Header => ImageCheck::Header,
        ImageCheckArg::Decode => ImageCheck::Decode,
    };
    let from = CheckSettings::of(&a)?;
    let template = match (&a.template, from.template) {
        (Some(t), _) => Some(Template::by_name_or_path(t)?),
        (None, t) => t,
    };
    let tokenizer_path = a.tokenizer.clone().or(from.tokenizer);
    let loaded = match (template, &tokenizer_path) {
        (Some(t), Some(p)) => Some((t, load_tokenizer(p)?)),
        (Some(_), None) => bail!("checking tokens needs a tokenizer too: pass --tokenizer FILE"),
        (None, Some(_)) => bail!("checking tokens needs a template too: pass --template T"),
        (None, None) => None,
    };
    let tokens = match &loaded {
        Some((template, tokenizer)) => Some(TokenCheck {
            tokenizer,
            template,
            config: TokenizeConfig {
                image_token_id: image_token_id(tokenizer)?,
                tokens_per_image: a.tokens_per_image.or(from.tokens_per_image).unwrap_or(1),
                max_length: a.max_length.or(from.max_length).unwrap_or(2048),
                truncation: match a.truncation {
                    TruncationArg::Truncate => Truncation::Truncate,
                    TruncationArg::Skip => Truncation::Skip,
                },
            },
        }),
        None => None,
    };
    let opts = CheckOptions {
        image_check,
        threads,
        tokens,
    };
    let report = check_dataset(&a.data, &a.images, &opts, &Bars::new())?;
    println!("{report}");
    print!("{}", report.problems_grouped(a.show));
    let errors = report.data_errors();
    if errors > 0 {
        bail!(
            "{errors} sample(s) of {} have data errors; fix or remove them before training",
            a.data.display()
        );
    }
    Ok(())
}
