//! Laying out a single prompt (and optional answer) as token ids for `score` and `generate`.
//!
//! `plain` is the exact layout of LLaVA's pretraining: the image's feature tokens, then the
//! prompt, then the answer, each tokenized on its own without special tokens. Any conversation
//! template (`phi`, `chatml`, … or a TOML file) lays out one round exactly as training does, so a
//! score is the log-probability the fine-tuned model was trained to maximise.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mmkd_datasets::{
    tokenize_prompt, tokenize_sample, Role, Sample, SampleRef, Template, TokenizeConfig,
    Truncation, Turn, IGNORE_INDEX,
};

use crate::checkpoint::bundle::LoadedModel;
use crate::checkpoint::training::template_for;

/// End-of-sequence tokens of the tokenizers mmkd meets; whichever the tokenizer has stop generation.
const END_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<|eot_id|>",
    "<|end_of_text|>",
];

/// Token ids of a prompt, and optionally of an answer that follows it.
#[derive(Clone, Debug)]
pub struct PromptLayout {
    template: Option<Template>,
    prompt_text: String,
    with_image: bool,
    prompt_ids: Vec<u32>,
    answer_ids: Vec<u32>,
}

impl PromptLayout {
    /// The layout a command asked for: `plain` (image, prompt, answer each tokenized alone) or
    /// a template name/path; without a request, the chat template the model was trained with
    /// (its `mmkd_training.json`), else `plain`. A request that differs from the model's
    /// record is used with a warning.
    pub fn choose(bundle: &LoadedModel, requested: Option<&str>) -> Result<Option<Template>> {
        let record = bundle.training.as_ref();
        match requested {
            Some("plain") => {
                if let Some(r) = record.filter(|r| r.chat) {
                    eprintln!(
                        "warning: --template plain, but the model was trained with {} (recorded \
                         in its {})",
                        r.template_name,
                        crate::checkpoint::training::TRAINING_FILE
                    );
                }
                Ok(None)
            }
            Some(name) => template_for(record, &bundle.model_dir, Some(name), name).map(Some),
            None => Ok(record.filter(|r| r.chat).map(|r| r.template.clone())),
        }
    }

    /// The model `model` on `device` and the layout of `prompt` for it in `template` (see
    /// [`PromptLayout::choose`]): what `generate` and `score` start from.
    pub fn load(
        model: &str,
        device: crate::runtime::DeviceSpec,
        template: Option<&str>,
        prompt: &str,
        with_image: bool,
    ) -> Result<(LoadedModel, Self)> {
        let mut options =
            crate::models::llava::BuildOptions::new(crate::models::llava::Trainable::NONE, 0);
        options.device = device.open()?;
        let bundle = LoadedModel::load(model, &options)?;
        let layout = Self::new(
            &bundle,
            Self::choose(&bundle, template)?,
            prompt,
            with_image,
        )?;
        Ok((bundle, layout))
    }

    /// `template`: `None` for `plain`, else the conversation template.
    pub fn new(
        bundle: &LoadedModel,
        template: Option<Template>,
        prompt: &str,
        with_image: bool,
    ) -> Result<Self> {
        let model = &bundle.model;
        let (template, prompt_ids) = match template {
            None => {
                let mut ids = if with_image {
                    bundle.image_block()
                } else {
                    Vec::new()
                };
                ids.extend(bundle.encode(prompt)?);
                (None, ids)
            }
            Some(t) => {
                let text = t.generation_prompt(&[], prompt, usize::from(with_image));
                let (ids, _) = tokenize_prompt(
                    &text,
                    &bundle.tokenizer,
                    model.image_token_id(),
                    model.tokens_per_image(),
                )?;
                (Some(t), ids)
            }
        };
        Ok(Self {
            template,
            prompt_text: prompt.to_string(),
            with_image,
            prompt_ids,
            answer_ids: Vec::new(),
        })
    }

    /// Appends the answer's tokens: on their own for `plain`; for a chat template, the tokens
    /// training supervises for this answer (without the closing end-of-turn token).
    pub fn answer(mut self, answer: &str, bundle: &LoadedModel) -> Result<Self> {
        self.answer_ids = match &self.template {
            None => bundle.encode(answer)?,
            Some(t) => {
                let model = &bundle.model;
                let sample = Sample {
                    reference: SampleRef {
                        index: 0,
                        id: Some("score".into()),
                        line: None,
                    },
                    images: if self.with_image {
                        vec![PathBuf::from("image")]
                    } else {
                        Vec::new()
                    },
                    turns: vec![
                        Turn {
                            role: Role::Human,
                            value: self.prompt_text.clone(),
                        },
                        Turn {
                            role: Role::Gpt,
                            value: answer.to_string(),
                        },
                    ],
                };
                let cfg = TokenizeConfig {
                    image_token_id: model.image_token_id(),
                    tokens_per_image: model.tokens_per_image(),
                    max_length: usize::MAX,
                    truncation: Truncation::Truncate,
                };
                let tokenized = tokenize_sample(&sample, &bundle.tokenizer, t, &cfg)
                    .map_err(|p| anyhow::anyhow!("{p}"))
                    .context("laying out the answer with the template")?;
                let start = tokenized
                    .labels
                    .iter()
                    .position(|&l| l != IGNORE_INDEX)
                    .context("the template supervises no answer token")?;
                let end_len = bundle.encode(&t.answer_end)?.len();
                let supervised: Vec<u32> = tokenized.input_ids[start..]
                    .iter()
                    .zip(&tokenized.labels[start..])
                    .take_while(|(_, &l)| l != IGNORE_INDEX)
                    .map(|(&id, _)| id)
                    .collect();
                // The prompt is what precedes the first supervised token in training.
                self.prompt_ids = tokenized.input_ids[..start].to_vec();
                supervised[..supervised.len().saturating_sub(end_len)].to_vec()
            }
        };
        Ok(self)
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// The whole sequence and the index where the answer starts.
    pub fn with_answer(&self) -> Result<(Vec<u32>, usize)> {
        anyhow::ensure!(
            !self.answer_ids.is_empty(),
            "the answer is empty (no tokens to score)"
        );
        let mut ids = self.prompt_ids.clone();
        ids.extend_from_slice(&self.answer_ids);
        Ok((ids, self.prompt_ids.len()))
    }

    pub fn stop_token_ids(&self, bundle: &LoadedModel) -> Vec<u32> {
        stop_token_ids(bundle, self.template.as_ref())
    }
}

/// The tokens that end an answer of `bundle` laid out in `template` (`None`: `plain`): the
/// tokenizer's end-of-sequence tokens and the template's end of answer.
pub fn stop_token_ids(bundle: &LoadedModel, template: Option<&Template>) -> Vec<u32> {
    let mut ids: Vec<u32> = END_TOKENS
        .iter()
        .filter_map(|t| bundle.token_id(t))
        .collect();
    if let Some(t) = template {
        if let Some(id) = bundle.token_id(t.answer_end.trim()) {
            ids.push(id);
        }
    } else if let Some(nl) = bundle.encode("\n").ok().filter(|v| v.len() == 1) {
        // `plain` captions end with a newline.
        ids.push(nl[0]);
    }
    ids
}
