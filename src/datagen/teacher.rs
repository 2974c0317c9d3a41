//! The teacher that writes the data: a local mmkd model (batched generation with its KV cache,
//! in its chat template) or a server behind the chat-completions API. Both answer the same
//! requests with the same [`Reply`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use mmkd_datasets::{
    tokenize_sample, Role, Sample, SampleRef, Template, TokenizeConfig, Turn, IMAGE_PLACEHOLDER,
};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::client::{ApiClient, ApiRequest, ApiSettings, Sampling};
use super::filters::{Reply, Written};
use super::recipe::GenerationSettings;
use crate::checkpoint::LoadedModel;
use crate::eval::{Answerer, PromptItem};
use crate::generate::{generate_scored, GenerationConfig};
use crate::models::llava::{BuildOptions, Trainable};
use crate::prompt::PromptLayout;
use crate::teacher_cache::teacher_identity;

/// One prompt for the teacher.
#[derive(Clone, Debug)]
pub struct TeacherRequest {
    pub image: PathBuf,
    pub text: String,
    /// The sampling seed of this request (servers that honour `seed` repeat themselves).
    pub seed: u64,
}

/// A local model in its chat template.
pub struct LocalTeacher {
    pub answerer: Answerer,
    pub spec: String,
}

// One teacher per run: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
pub enum DataTeacher {
    Local(LocalTeacher),
    Api(ApiClient),
}

impl DataTeacher {
    /// Loads a local teacher; it must have a chat template (its own or `template`).
    pub fn local(
        spec: &str,
        template: Option<&str>,
        batch_size: usize,
        device: crate::runtime::DeviceSpec,
    ) -> Result<Self> {
        let mut options = BuildOptions::new(Trainable::NONE, 0);
        options.device = device.open()?;
        let bundle = LoadedModel::load(spec, &options)?;
        let Some(template) = PromptLayout::choose(&bundle, template)? else {
            bail!(
                "teacher {spec} has no chat template (it was trained with `plain`, for captions): \
                 pass --template NAME for the conversations it should answer"
            );
        };
        let answerer = Answerer::new(Arc::new(bundle), template, batch_size, 1, spec.into());
        Ok(DataTeacher::Local(LocalTeacher {
            answerer,
            spec: spec.to_string(),
        }))
    }

    pub fn api(settings: ApiSettings) -> Result<Self> {
        Ok(DataTeacher::Api(ApiClient::new(settings)?))
    }

    /// Who the teacher is, for the manifest (and a resumed run's check).
    pub fn identity(&self) -> Result<Value> {
        Ok(match self {
            DataTeacher::Local(t) => {
                let id = teacher_identity(&t.answerer.bundle.model_dir)?;
                json!({"kind": "local", "path": id.path, "digest": id.digest,
                       "template": t.answerer.template.name})
            }
            DataTeacher::Api(client) => {
                let s = client.settings();
                json!({"kind": "api", "url": s.url, "model": s.model})
            }
        })
    }

    /// The local teacher's model (its tokenizer and template check the written samples).
    pub fn local_model(&self) -> Option<(&LoadedModel, &Template)> {
        match self {
            DataTeacher::Local(t) => Some((&t.answerer.bundle, &t.answerer.template)),
            DataTeacher::Api(_) => None,
        }
    }

    /// Answers every request (in order): a reply, or why the request failed. `logprobs`:
    /// ask a server for its tokens' log-probabilities and this many alternatives each.
    pub fn answer(
        &self,
        requests: &[TeacherRequest],
        generation: &GenerationSettings,
        logprobs: Option<usize>,
    ) -> Vec<Result<Reply>> {
        match self {
            DataTeacher::Local(t) => t.answer(requests, generation),
            DataTeacher::Api(client) => {
                let calls: Vec<ApiRequest<'_>> = requests
                    .iter()
                    .map(|r| ApiRequest {
                        image: &r.image,
                        text: &r.text,
                        seed: r.seed,
                    })
                    .collect();
                let sampling = Sampling {
                    max_tokens: generation.max_tokens,
                    temperature: generation.temperature,
                    top_p: generation.top_p,
                    logprobs,
                };
                client
                    .complete_all(&calls, &sampling)
                    .into_iter()
                    .map(|r| r.map(|a| a.reply))
                    .collect()
            }
        }
    }
}

impl LocalTeacher {
    /// Batched generation; a batch that fails fails each of its requests with its error.
    fn answer(
        &self,
        requests: &[TeacherRequest],
        generation: &GenerationSettings,
    ) -> Vec<Result<Reply>> {
        let a = &self.answerer;
        let mut replies = Vec::with_capacity(requests.len());
        for batch in requests.chunks(a.batch_size) {
            match self.answer_batch(batch, generation) {
                Ok(r) => replies.extend(r.into_iter().map(Ok)),
                Err(e) => {
                    let msg = format!("{e:#}");
                    replies.extend(batch.iter().map(|_| Err(anyhow::anyhow!("{msg}"))));
                }
            }
        }
        replies
    }

    fn answer_batch(
        &self,
        batch: &[TeacherRequest],
        generation: &GenerationSettings,
    ) -> Result<Vec<Reply>> {
        let a = &self.answerer;
        let bundle = &a.bundle;
        let prompts = batch
            .iter()
            .map(|r| {
                a.prompt_ids(&PromptItem {
                    id: String::new(),
                    image: Some(r.image.clone()),
                    text: r.text.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let images: Vec<PathBuf> = batch.iter().map(|r| r.image.clone()).collect();
        let pixels = bundle.pixel_values(&images)?;
        let cfg = GenerationConfig {
            max_new_tokens: generation.max_tokens,
            temperature: generation.temperature,
            top_p: generation.top_p,
            ..a.generation.clone()
        };
        let seeds: Vec<u64> = batch.iter().map(|r| r.seed).collect();
        let decode = |ids: &[u32]| bundle.decode(ids).unwrap_or_default();
        let outputs = generate_scored(
            &bundle.model,
            &prompts,
            Some(&pixels),
            &cfg,
            &seeds,
            &decode,
        )?;
        outputs
            .into_iter()
            .map(|out| {
                let mut text = bundle.decode(&out.ids)?;
                for stop in &cfg.stop_strings {
                    if let Some(cut) = text.find(stop.as_str()) {
                        text.truncate(cut);
                    }
                }
                Ok(Reply {
                    text: text.trim().to_string(),
                    finished: out.stopped,
                    token_logprobs: Some(out.logprobs),
                    alternatives: Vec::new(),
                })
            })
            .collect()
    }
}

/// The supervised-span check: a sample, tokenized as the student will be trained on it,
/// must supervise every answer and fit `max_length`.
pub struct SpanCheck {
    pub tokenizer: Tokenizer,
    pub template: Template,
    pub config: TokenizeConfig,
}

impl SpanCheck {
    pub fn new(model: &LoadedModel, template: Template, max_length: usize) -> Self {
        Self {
            tokenizer: model.tokenizer.clone(),
            template,
            config: crate::batch::training_tokenize_config(&model.model, max_length),
        }
    }

    /// The supervised tokens of `rounds` + `next` (one image's conversation) when it
    /// tokenizes without a cut and supervises more than `kept` (the count of `rounds` alone,
    /// as this returned it when they were admitted); `None`: the span check fails.
    pub fn admits(
        &self,
        image: &std::path::Path,
        rounds: &[Written],
        kept: usize,
        next: &Written,
    ) -> Option<usize> {
        let sample = conversation(image, rounds.iter().chain([next]));
        let t = tokenize_sample(&sample, &self.tokenizer, &self.template, &self.config).ok()?;
        let supervised = t.supervised_count();
        (!t.truncated && supervised > kept).then_some(supervised)
    }
}

/// The LLaVA conversation of one image's rounds (the image before the first question).
pub fn conversation<'a>(
    image: &std::path::Path,
    rounds: impl Iterator<Item = &'a Written>,
) -> Sample {
    let mut turns = Vec::new();
    for (i, w) in rounds.enumerate() {
        let question = if i == 0 {
            format!("{IMAGE_PLACEHOLDER}\n{}", w.question)
        } else {
            w.question.clone()
        };
        turns.push(Turn {
            role: Role::Human,
            value: question,
        });
        turns.push(Turn {
            role: Role::Gpt,
            value: w.response.clone(),
        });
    }
    Sample {
        reference: SampleRef {
            index: 0,
            id: None,
            line: None,
        },
        images: vec![image.to_path_buf()],
        turns,
    }
}
