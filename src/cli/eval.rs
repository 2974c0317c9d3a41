//! `mmkd eval vqa | caption | pope | mc | compare`: run a model over a benchmark and score it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::checkpoint::LoadedModel;
use crate::eval::files::{read_records, QuestionLine};
use crate::eval::run::vqa_prompts;
use crate::eval::run::{compare, eval_captions, eval_choice, eval_pope, eval_vqa, EvalResults};
use crate::eval::Answerer;
use crate::models::llava::{BuildOptions, Trainable};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub task: EvalTask,
}

/// Options shared by the model-driven tasks.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint directory or hub id.
    #[arg(long)]
    pub model: String,
    /// Image root the files' image paths are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// Conversation template (name or TOML file). Default: the one the model was trained with
    /// (its mmkd_training.json), else `phi`; a different one is used with a warning.
    #[arg(long)]
    pub template: Option<String>,
    /// Prompts answered together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Most tokens generated per answer.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Where predictions.jsonl, results.json and results.md go.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::runtime::DeviceSpec,
}

#[derive(Debug, Subcommand)]
pub enum EvalTask {
    /// VQA accuracy (official normalization, 10-answer soft accuracy) by answer type and category.
    Vqa {
        #[command(flatten)]
        model: ModelArgs,
        /// Questions: LLaVA question lines {question_id, image, text, category}.
        #[arg(long)]
        questions: PathBuf,
        /// Answers {question_id, answers, answer_type}; without it only predictions are written.
        #[arg(long)]
        answers: Option<PathBuf>,
        /// Appended to every question (e.g. "\nAnswer the question using a single word or phrase.").
        #[arg(long, default_value = "")]
        prompt_suffix: String,
        /// A smaller model with the same tokenizer (the distilled student) as the model's
        /// speculative draft: every question is answered again with it proposing --gamma
        /// tokens a round; the answers stay the model's own (greedy) and the acceptance rate
        /// goes to OUT/speculative.json.
        #[arg(long)]
        draft: Option<String>,
        /// Tokens the draft proposes per round.
        #[arg(long, default_value_t = 4, requires = "draft")]
        gamma: usize,
    },
    /// BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap conventions; METEOR not computed).
    Caption {
        #[command(flatten)]
        model: ModelArgs,
        /// Items {image_id, image, text?, references?}.
        #[arg(long)]
        questions: PathBuf,
        /// References {question_id, answers} when the items carry none.
        #[arg(long)]
        refs: Option<PathBuf>,
    },
    /// POPE accuracy, precision, recall, F1 and yes-ratio per split.
    Pope {
        #[command(flatten)]
        model: ModelArgs,
        /// One file per split: {question_id, image, text, label}.
        #[arg(long, num_args = 1.., required = true)]
        questions: Vec<PathBuf>,
    },
    /// Multiple choice by generated letter and by option likelihood.
    Mc {
        #[command(flatten)]
        model: ModelArgs,
        /// {question_id, image?, question, options, answer}.
        #[arg(long)]
        questions: PathBuf,
    },
    /// Several runs' results side by side.
    Compare {
        /// Run directories (or results.json files).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
}

fn answerer(m: &ModelArgs) -> Result<Answerer> {
    Answerer::load(
        &m.model,
        m.template.as_deref(),
        m.batch_size,
        m.max_new_tokens,
        m.device,
    )
}

fn report(results: &EvalResults, out: &std::path::Path) -> Result<()> {
    let md = std::fs::read_to_string(out.join("results.md"))?;
    println!("{md}");
    if let Some(g) = &results.generation {
        println!(
            "{} prompts, {} new tokens, {:.1} tokens/s",
            g.prompts, g.new_tokens, g.tokens_per_s
        );
    }
    println!("{}", serde_json::to_string(&results.headline)?);
    Ok(())
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.task {
        EvalTask::Vqa {
            model,
            questions,
            answers,
            prompt_suffix,
            draft,
            gamma,
        } => {
            let a = answerer(&model)?;
            let r = eval_vqa(
                &a,
                &questions,
                &model.images,
                answers.as_deref(),
                &prompt_suffix,
                &model.out,
                !model.quiet,
            )?;
            report(&r, &model.out)?;
            if let Some(draft) = draft {
                let lines: Vec<QuestionLine> = read_records(&questions)?;
                let items = vqa_prompts(&lines, &model.images, &prompt_suffix);
                let mut options = BuildOptions::new(Trainable::NONE, 0);
                options.device = model.device.open()?;
                let draft_model = LoadedModel::load(&draft, &options)
                    .with_context(|| format!("loading the draft {draft}"))?;
                let started = std::time::Instant::now();
                let stats = a.speculate(&draft_model, &items, gamma)?;
                let seconds = started.elapsed().as_secs_f64();
                let record = serde_json::json!({
                    "draft": draft, "gamma": gamma, "questions": items.len(),
                    "proposed": stats.proposed, "accepted": stats.accepted,
                    "acceptance_rate": stats.acceptance_rate(),
                    "target_forwards": stats.target_forwards, "seconds": seconds,
                });
                std::fs::write(
                    model.out.join("speculative.json"),
                    serde_json::to_string_pretty(&record)?,
                )?;
                println!(
                    "speculative with {draft}: γ {gamma}, {} of {} proposals accepted ({:.1} %), \
                     {} model forwards over {} questions, {seconds:.1} s",
                    stats.accepted,
                    stats.proposed,
                    100.0 * stats.acceptance_rate(),
                    stats.target_forwards,
                    items.len()
                );
            }
            Ok(())
        }
        EvalTask::Caption {
            model,
            questions,
            refs,
        } => {
            let a = answerer(&model)?;
            let r = eval_captions(
                &a,
                &questions,
                &model.images,
                refs.as_deref(),
                &model.out,
                !model.quiet,
            )?;
            report(&r, &model.out)
        }
        EvalTask::Pope { model, questions } => {
            let a = answerer(&model)?;
            let r = eval_pope(&a, &questions, &model.images, &model.out, !model.quiet)?;
            report(&r, &model.out)
        }
        EvalTask::Mc { model, questions } => {
            let a = answerer(&model)?;
            let r = eval_choice(&a, &questions, &model.images, &model.out, !model.quiet)?;
            report(&r, &model.out)
        }
        EvalTask::Compare { runs } => {
            println!("{}", compare(&runs)?);
            Ok(())
        }
    }
}
