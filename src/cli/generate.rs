//! `mmkd generate`: answer a prompt about an image (greedy by default, or sampled with a seed).

use std::path::PathBuf;

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;

use crate::generate::{generate, GenerationConfig};
use crate::speculative::{speculative_generate, PromptImages};

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
    /// A smaller model with the same tokenizer (e.g. the distilled student) as a speculative
    /// draft: it proposes --gamma tokens, the model verifies them in one forward. Greedy: the
    /// answer is the model's own greedy answer (checked); with --temperature: a sample of the
    /// model's own distribution (speculative sampling; no --top-k / --top-p). The acceptance
    /// rate and the speed-up against the model alone are printed.
    #[arg(long)]
    pub draft: Option<String>,
    /// Tokens the draft proposes per round.
    #[arg(long, default_value_t = 4)]
    pub gamma: usize,
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
    let started = Instant::now();
    let out = generate(
        &bundle.model,
        &[layout.prompt_ids().to_vec()],
        pixels.as_ref(),
        &cfg,
        &decode,
    )?;
    let alone_seconds = started.elapsed().as_secs_f64();
    let mut ids = out[0].clone();
    if let Some(draft) = &args.draft {
        let (draft_bundle, draft_layout) = PromptLayout::load(
            draft,
            args.device,
            args.template.as_deref(),
            &args.prompt,
            args.image.is_some(),
        )
        .context("loading the draft")?;
        ensure!(
            draft_bundle.tokenizer.get_vocab(true) == bundle.tokenizer.get_vocab(true)
                && draft_layout.prompt_ids() == layout.prompt_ids(),
            "--draft {draft}: its tokenizer or prompt layout is not the model's; a draft must \
             tokenize the prompt exactly as the model does"
        );
        let draft_pixels = args
            .image
            .as_ref()
            .map(|p| draft_bundle.pixel_values(std::slice::from_ref(p)))
            .transpose()?;
        let started = Instant::now();
        let (speculative, stats) = speculative_generate(
            &bundle.model,
            &draft_bundle.model,
            layout.prompt_ids(),
            PromptImages {
                target: pixels.as_ref(),
                draft: draft_pixels.as_ref(),
            },
            &cfg,
            args.gamma,
            &decode,
        )?;
        let seconds = started.elapsed().as_secs_f64();
        if cfg.temperature <= 0.0 {
            ensure!(
                speculative == ids,
                "speculative decoding gave another answer than the model alone ({speculative:?} \
                 vs {ids:?}): please report this"
            );
        } else {
            // Another draw of the same distribution: the speculative one is the answer.
            ids = speculative;
        }
        eprintln!(
            "speculative: γ {}, {} of {} proposals accepted ({:.1} %), {} model forwards for {} \
             tokens; {seconds:.3} s vs {alone_seconds:.3} s alone ({:.2}×)",
            args.gamma,
            stats.accepted,
            stats.proposed,
            100.0 * stats.acceptance_rate(),
            stats.target_forwards,
            ids.len(),
            alone_seconds / seconds.max(1e-9)
        );
    }
    println!("{}", bundle.decode(&ids)?);
    if args.show_ids {
        println!("{ids:?}");
    }
    Ok(())
}
