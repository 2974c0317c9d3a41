//! Laying out a single prompt (and optional answer) as token ids for scoring and generation.

use anyhow::Result;

use crate::checkpoint::bundle::ModelBundle;

/// Templates available to `score` / `generate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TemplateName {
    /// The image's feature tokens, then the prompt, then the answer, each tokenized on its own
    /// without special tokens (LLaVA's pretraining layout).
    Plain,
}

/// Token ids of a prompt, and optionally of an answer that follows it.
#[derive(Clone, Debug)]
pub struct PromptLayout {
    template: TemplateName,
    prompt_ids: Vec<u32>,
    answer_ids: Vec<u32>,
}

/// End-of-sequence tokens of the tokenizers mmkd meets; whichever the tokenizer has stop generation.
const END_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<|eot_id|>",
    "<|end_of_text|>",
];

impl PromptLayout {
    pub fn new(
        bundle: &ModelBundle,
        template: TemplateName,
        prompt: &str,
        with_image: bool,
    ) -> Result<Self> {
        let prompt_ids = match template {
            TemplateName::Plain => {
                let mut ids = if with_image {
                    bundle.image_block()
                } else {
                    Vec::new()
                };
                ids.extend(bundle.encode(prompt)?);
                ids
            }
        };
        Ok(Self {
            template,
            prompt_ids,
            answer_ids: Vec::new(),
        })
    }

    /// Appends the answer's tokens.
    pub fn answer(mut self, answer: &str, bundle: &ModelBundle) -> Result<Self> {
        self.answer_ids = match self.template {
            TemplateName::Plain => bundle.encode(answer)?,
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

    pub fn stop_token_ids(&self, bundle: &ModelBundle) -> Vec<u32> {
        END_TOKENS
            .iter()
            .filter_map(|t| bundle.token_id(t))
            .collect()
    }
}
