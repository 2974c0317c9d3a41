//! `mmkd eval vqa | caption | pope | mc | compare`: run a model over a benchmark and score it.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::eval::run::{compare, eval_captions, eval_choice, eval_pope, eval_vqa, EvalResults};
use crate::eval::Answerer;

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
            report(&r, &model.out)
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
