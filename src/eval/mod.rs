//! Model-driven evaluation: answer a benchmark's questions with batched generation, write the
//! predictions in LLaVA's `model_vqa` format, and score them with [`crate::scoring`].

pub mod files;
pub mod run;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mmkd_datasets::{tokenize_prompt, Template};

use crate::checkpoint::bundle::LoadedModel;
use crate::generate::{generate, GenerationConfig};
use crate::models::llava::{BuildOptions, Trainable};
use crate::speculative::{speculative_generate, PromptImages, SpeculativeStats};

/// One prompt to answer.
#[derive(Clone, Debug)]
pub struct PromptItem {
    pub id: String,
    /// Image file (already resolved against the image root).
    pub image: Option<PathBuf>,
    pub text: String,
}

/// A model ready to answer prompts with a conversation template.
pub struct Answerer {
    /// Shared, so a training run can answer with the model it is training.
    pub bundle: Arc<LoadedModel>,
    pub template: Template,
    pub batch_size: usize,
    pub generation: GenerationConfig,
    pub model_id: String,
}

/// Generation statistics of a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    pub prompts: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

impl Answerer {
    /// Loads `model` to answer with `template`, or (`None`) the template it was trained with.
    pub fn load(
        model: &str,
        template: Option<&str>,
        batch_size: usize,
        max_new_tokens: usize,
        device: crate::runtime::DeviceSpec,
    ) -> Result<Self> {
        let mut options = BuildOptions::new(Trainable::NONE, 0);
        options.device = device.open()?;
        let bundle = LoadedModel::load(model, &options)?;
        let template = crate::checkpoint::training::template_for(
            bundle.training.as_ref(),
            &bundle.model_dir,
            template,
            "phi",
        )?;
        let model_id = Path::new(model)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| model.to_string());
        Ok(Self::new(
            Arc::new(bundle),
            template,
            batch_size,
            max_new_tokens,
            model_id,
        ))
    }

    /// Answers with a model already in memory (e.g. the one a stage is training).
    pub fn new(
        bundle: Arc<LoadedModel>,
        template: Template,
        batch_size: usize,
        max_new_tokens: usize,
        model_id: String,
    ) -> Self {
        let mut stop_token_ids: Vec<u32> = ["<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>"]
            .iter()
            .filter_map(|t| bundle.token_id(t))
            .collect();
        if let Some(id) = bundle.token_id(template.answer_end.trim()) {
            stop_token_ids.push(id);
        }
        let stop_strings = if template.answer_end.trim().is_empty()
            || bundle.token_id(template.answer_end.trim()).is_none()
        {
            vec![template.answer_end.clone()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        Self {
            bundle,
            template,
            batch_size: batch_size.max(1),
            generation: GenerationConfig {
                max_new_tokens,
                stop_token_ids,
                stop_strings,
                ..Default::default()
            },
            model_id,
        }
    }

    /// The prompt text (with `<image>` placeholders) for a question.
    pub fn prompt_text(&self, item: &PromptItem) -> String {
        self.template
            .generation_prompt(&[], &item.text, usize::from(item.image.is_some()))
    }

    pub fn prompt_ids(&self, item: &PromptItem) -> Result<Vec<u32>> {
        let model = &self.bundle.model;
        let (ids, _) = tokenize_prompt(
            &self.prompt_text(item),
            &self.bundle.tokenizer,
            model.image_token_id(),
            model.tokens_per_image(),
        )?;
        Ok(ids)
    }

    /// Answers every item, in order, `batch_size` at a time (image and text-only prompts are
    /// batched separately), with a progress bar.
    pub fn answer_all(
        &self,
        items: &[PromptItem],
        label: &str,
        progress: bool,
    ) -> Result<(Vec<String>, GenerationStats)> {
        let started = Instant::now();
        let bar = if progress {
            let bar = ProgressBar::new(items.len() as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        } else {
            ProgressBar::hidden()
        };
        let mut answers = vec![String::new(); items.len()];
        let mut new_tokens = 0;
        let (with_image, text_only): (Vec<usize>, Vec<usize>) =
            (0..items.len()).partition(|&i| items[i].image.is_some());
        for group in [with_image, text_only] {
            for chunk in group.chunks(self.batch_size) {
                let prompts = chunk
                    .iter()
                    .map(|&i| {
                        self.prompt_ids(&items[i])
                            .with_context(|| format!("question {}", items[i].id))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let images: Vec<PathBuf> = chunk
                    .iter()
                    .filter_map(|&i| items[i].image.clone())
                    .collect();
                let pixels = if images.is_empty() {
                    None
                } else {
                    Some(self.bundle.pixel_values(&images)?)
                };
                let decode = |ids: &[u32]| self.bundle.decode(ids).unwrap_or_default();
                let outputs = generate(
                    &self.bundle.model,
                    &prompts,
                    pixels.as_ref(),
                    &self.generation,
                    &decode,
                )?;
                for (&i, ids) in chunk.iter().zip(&outputs) {
                    new_tokens += ids.len();
                    let mut text = self.bundle.decode(ids)?;
                    for stop in &self.generation.stop_strings {
                        if let Some(cut) = text.find(stop.as_str()) {
                            text.truncate(cut);
                        }
                    }
                    answers[i] = text.trim().to_string();
                }
                bar.inc(chunk.len() as u64);
            }
        }
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        Ok((
            answers,
            GenerationStats {
                prompts: items.len(),
                new_tokens,
                seconds,
                tokens_per_s: new_tokens as f64 / seconds.max(1e-9),
            },
        ))
    }

    /// `draft` as a speculative draft for this model on `items`, one prompt at a time,
    /// proposing `gamma` tokens a round with this answerer's generation settings (greedy: the
    /// answers are this model's own): the acceptance statistics over all of them.
    pub fn speculate(
        &self,
        draft: &LoadedModel,
        items: &[PromptItem],
        gamma: usize,
    ) -> Result<SpeculativeStats> {
        anyhow::ensure!(
            draft.tokenizer.get_vocab(true) == self.bundle.tokenizer.get_vocab(true),
            "the draft's tokenizer is not the model's: it cannot draft for it"
        );
        let mut total = SpeculativeStats::default();
        let decode = |ids: &[u32]| self.bundle.decode(ids).unwrap_or_default();
        for item in items {
            let prompt = self
                .prompt_ids(item)
                .with_context(|| format!("question {}", item.id))?;
            let images = item.image.as_ref().map(std::slice::from_ref);
            let target_pixels = images.map(|i| self.bundle.pixel_values(i)).transpose()?;
            let draft_pixels = images.map(|i| draft.pixel_values(i)).transpose()?;
            let (_, stats) = speculative_generate(
                &self.bundle.model,
                &draft.model,
                &prompt,
                PromptImages {
                    target: target_pixels.as_ref(),
                    draft: draft_pixels.as_ref(),
                },
                &self.generation,
                gamma,
                &decode,
            )
            .with_context(|| format!("question {}", item.id))?;
            total += stats;
        }
        Ok(total)
    }
}
