//! `mmkd score`: log-probability of each answer token given the image, the prompt and the
//! previous answer tokens.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{DType, D};
use clap::Args;
use serde::Serialize;

use crate::checkpoint::bundle::LoadedModel;
use crate::models::llava::TokenBatch;
use crate::prompt::PromptLayout;

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Checkpoint directory or hub id.
    #[arg(long)]
    pub model: String,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::runtime::DeviceSpec,
    /// The image the prompt is about (none: a text-only prompt).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The question or instruction.
    #[arg(long)]
    pub prompt: String,
    /// The answer whose tokens are scored.
    #[arg(long)]
    pub answer: String,
    /// `plain` (image, prompt, answer, each tokenized alone) or a conversation template
    /// (phi, chatml, vicuna_v1, qwen2_base, llama3, or a TOML file).
    /// Default: the chat template the model was trained with (its mmkd_training.json), else
    /// `plain`.
    #[arg(long)]
    pub template: Option<String>,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ScoreResult {
    pub answer_tokens: Vec<u32>,
    pub answer_logprobs: Vec<f32>,
    pub sum_logprob: f32,
}

/// Scores `answer` after `prompt` (and the image) with `bundle`'s model.
pub fn score(
    bundle: &LoadedModel,
    layout: &PromptLayout,
    image: Option<&PathBuf>,
) -> Result<ScoreResult> {
    let (ids, answer_start) = layout.with_answer()?;
    ensure!(
        answer_start > 0,
        "the prompt is empty: nothing conditions the first answer token"
    );
    let pixels = image
        .map(|p| bundle.pixel_values(std::slice::from_ref(p)))
        .transpose()?;
    let batch = TokenBatch::right_padded(std::slice::from_ref(&ids), 0);
    let out = bundle.model.forward(&batch, pixels.as_ref())?;
    let n = ids.len() - answer_start;
    // Logit t predicts token t + 1.
    let logits = out
        .logits
        .narrow(1, answer_start - 1, n)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
    let answer_tokens = ids[answer_start..].to_vec();
    let answer_logprobs: Vec<f32> = answer_tokens
        .iter()
        .zip(logprobs.iter())
        .map(|(&tok, row)| row[tok as usize])
        .collect();
    Ok(ScoreResult {
        sum_logprob: answer_logprobs.iter().sum(),
        answer_tokens,
        answer_logprobs,
    })
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let (bundle, layout) = PromptLayout::load(
        &args.model,
        args.device,
        args.template.as_deref(),
        &args.prompt,
        args.image.is_some(),
    )?;
    let layout = layout.answer(&args.answer, &bundle)?;
    let result = score(&bundle, &layout, args.image.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    println!("{:>8}  {:<16} {:>10}", "token", "text", "logprob");
    for (tok, lp) in result.answer_tokens.iter().zip(&result.answer_logprobs) {
        println!(
            "{:>8}  {:<16} {:>10.4}",
            tok,
            format!("{:?}", bundle.decode(&[*tok])?),
            lp
        );
    }
    println!("sum log-probability: {:.4}", result.sum_logprob);
    Ok(())
}
