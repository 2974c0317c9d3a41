//! `mmkd generate`: answer a prompt about an image (greedy by default, or sampled with a seed).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::generate::{generate, GenerationConfig};

use crate::prompt::PromptLayout;

#[derive(Debug, Args)]
pub struct GenerateArgs {
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
    /// `plain` (image, prompt, answer, each tokenized alone) or a conversation template
    /// (phi, chatml, vicuna_v1, qwen2_base, llama3, or a TOML file).
    /// Default: the chat template the model was trained with (its mmkd_training.json), else
    /// `plain`.
    #[arg(long)]
    pub template: Option<String>,
    /// Most tokens generated.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches P (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sample from the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampling (with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the generated token ids too.
    #[arg(long)]
    pub show_ids: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (bundle, layout) = PromptLayout::load(
        &args.model,
        args.device,
        args.template.as_deref(),
        &args.prompt,
        args.image.is_some(),
    )?;
    let pixels = args
        .image
        .as_ref()
        .map(|p| bundle.pixel_values(std::slice::from_ref(p)))
        .transpose()?;
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop_token_ids: layout.stop_token_ids(&bundle),
        ..Default::default()
    };
    let decode = |ids: &[u32]| bundle.decode(ids).unwrap_or_default();
    let out = generate(
        &bundle.model,
        &[layout.prompt_ids().to_vec()],
        pixels.as_ref(),
        &cfg,
        &decode,
    )?;
    let ids = &out[0];
    println!("{}", bundle.decode(ids)?);
    if args.show_ids {
        println!("{ids:?}");
    }
    Ok(())
}
