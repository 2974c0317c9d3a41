//! `mmkd serve MODEL`: any mmkd model behind the OpenAI-compatible chat-completions API
//! (`POST /v1/chat/completions`, `GET /v1/models`), on loopback unless told otherwise — the
//! black-box teacher that vLLM, SGLang or a hosted API would be, for tests and the demo.
//! Requests are answered one at a time (each generation already uses every core).

pub mod api;

use std::io::Read;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use mmkd_datasets::{tokenize_prompt, Template};

use crate::checkpoint::LoadedModel;
use crate::generate::{generate, GenerationConfig};
use crate::prompt::{stop_token_ids, PromptLayout};
use api::{
    error_body, AnswerMessage, ChatRequest, ChatResponse, Choice, Conversation, Logprobs,
    TokenLogprob, TopLogprob, Usage,
};

/// The largest request body taken (images travel inside it).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// A server answering from a thread of this process; stopped when dropped.
pub struct RunningServer {
    pub addr: SocketAddr,
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn listen(addr: &str) -> Result<(tiny_http::Server, SocketAddr)> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .context("the server is not on an IP socket")?;
    Ok((server, bound))
}

/// A loaded model and how its prompts are laid out.
pub struct Server {
    pub bundle: LoadedModel,
    /// `None`: `plain` (the image block, then the text).
    pub template: Option<Template>,
    /// The name `/v1/models` lists and responses carry.
    pub name: String,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    requests: u64,
}

impl Server {
    pub fn new(
        bundle: LoadedModel,
        template: Option<Template>,
        name: String,
        default_max_tokens: usize,
    ) -> Self {
        Self {
            bundle,
            template,
            name,
            default_max_tokens,
            requests: 0,
        }
    }

    /// Serves on `addr` until the process ends; `ready` gets the bound address (port 0 picks
    /// a free one).
    pub fn run(self, addr: &str, ready: impl FnOnce(SocketAddr)) -> Result<()> {
        let (server, bound) = listen(addr)?;
        ready(bound);
        self.answer_all(&server);
        Ok(())
    }

    /// Serves on `addr` from a thread of this process until the returned handle is dropped
    /// (the demo's black-box teacher).
    pub fn spawn(self, addr: &str) -> Result<RunningServer> {
        let (server, bound) = listen(addr)?;
        let server = std::sync::Arc::new(server);
        let listener = server.clone();
        let thread = std::thread::spawn(move || self.answer_all(&listener));
        Ok(RunningServer {
            addr: bound,
            server,
            thread: Some(thread),
        })
    }

    fn answer_all(mut self, server: &tiny_http::Server) {
        for mut request in server.incoming_requests() {
            let (status, body) = self.respond(&mut request);
            let header = tiny_http::Header::from_bytes("Content-Type", "application/json")
                .expect("a valid header");
            let response = tiny_http::Response::from_string(body)
                .with_status_code(status)
                .with_header(header);
            // A client that hung up is its own problem; the server goes on.
            let _ = request.respond(response);
        }
    }

    /// The status and JSON body for one request.
    fn respond(&mut self, request: &mut tiny_http::Request) -> (u16, String) {
        let path = request.url().split('?').next().unwrap_or("").to_string();
        match (request.method(), path.as_str()) {
            (tiny_http::Method::Get, "/v1/models") => (
                200,
                serde_json::json!({"object": "list", "data": [
                    {"id": self.name, "object": "model", "created": 0, "owned_by": "mmkd"}
                ]})
                .to_string(),
            ),
            (tiny_http::Method::Post, "/v1/chat/completions") => {
                let mut body = Vec::new();
                let read = request
                    .as_reader()
                    .take(MAX_BODY_BYTES as u64 + 1)
                    .read_to_end(&mut body);
                if read.is_err() || body.len() > MAX_BODY_BYTES {
                    let msg =
                        format!("the request body is unreadable or over {MAX_BODY_BYTES} bytes");
                    return (400, error_body(&msg, "invalid_request_error"));
                }
                let parsed: Result<ChatRequest> = serde_json::from_slice(&body)
                    .context("the request is not a chat-completions JSON object");
                match parsed.and_then(|req| self.complete(&req)) {
                    Ok(answer) => (200, serde_json::to_string(&answer).expect("serialisable")),
                    Err(e) => (400, error_body(&format!("{e:#}"), "invalid_request_error")),
                }
            }
            (_, "/v1/models" | "/v1/chat/completions") => (
                405,
                error_body("method not allowed", "invalid_request_error"),
            ),
            (_, other) => (
                404,
                error_body(&format!("no route {other}"), "invalid_request_error"),
            ),
        }
    }

    /// Answers one request.
    pub fn complete(&mut self, req: &ChatRequest) -> Result<ChatResponse> {
        req.check()?;
        let conversation = req.conversation()?;
        let max_new_tokens = req.max_new_tokens(self.default_max_tokens)?;
        let prompt = self.prompt_ids(&conversation)?;
        let pixels = self.pixels(&conversation.images)?;
        let cfg = GenerationConfig {
            max_new_tokens,
            temperature: req.temperature.unwrap_or(0.0),
            top_p: req.top_p.unwrap_or(1.0),
            seed: req.seed.unwrap_or(0),
            stop_token_ids: stop_token_ids(&self.bundle, self.template.as_ref()),
            ..Default::default()
        };
        let bundle = &self.bundle;
        let decode = |ids: &[u32]| bundle.decode(ids).unwrap_or_default();
        let ids = generate(
            &bundle.model,
            std::slice::from_ref(&prompt),
            pixels.as_ref(),
            &cfg,
            &decode,
        )?
        .remove(0);
        let logprobs = if req.logprobs.unwrap_or(false) && !ids.is_empty() {
            Some(self.logprobs(
                &prompt,
                &ids,
                pixels.as_ref(),
                req.top_logprobs.unwrap_or(0),
            )?)
        } else {
            None
        };
        self.requests += 1;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(ChatResponse {
            id: format!("chatcmpl-mmkd-{}", self.requests),
            object: "chat.completion".into(),
            created,
            model: self.name.clone(),
            choices: vec![Choice {
                index: 0,
                message: AnswerMessage {
                    role: "assistant".into(),
                    content: bundle.decode(&ids)?,
                },
                finish_reason: if ids.len() >= max_new_tokens {
                    "length"
                } else {
                    "stop"
                }
                .into(),
                logprobs,
            }],
            usage: Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: ids.len(),
                total_tokens: prompt.len() + ids.len(),
            },
        })
    }

    /// The prompt's token ids in the model's layout.
    fn prompt_ids(&self, conversation: &Conversation) -> Result<Vec<u32>> {
        let images = conversation.images.len();
        match &self.template {
            Some(t) => {
                let history: Vec<(&str, &str)> = conversation
                    .history
                    .iter()
                    .map(|(q, a)| (q.as_str(), a.as_str()))
                    .collect();
                let text = t.generation_prompt(&history, &conversation.question, images);
                let model = &self.bundle.model;
                let (ids, _) = tokenize_prompt(
                    &text,
                    &self.bundle.tokenizer,
                    model.image_token_id(),
                    model.tokens_per_image(),
                )?;
                Ok(ids)
            }
            None => {
                if !conversation.history.is_empty() || images > 1 {
                    bail!(
                        "this model has no chat template (`plain`): one user message with at most \
                         one image"
                    );
                }
                let layout =
                    PromptLayout::new(&self.bundle, None, &conversation.question, images == 1)?;
                Ok(layout.prompt_ids().to_vec())
            }
        }
    }

    /// Pixel values of the request's images, decoded by the same guarded loader as data
    /// images (a corrupt header cannot make it allocate without bound).
    fn pixels(&self, images: &[Vec<u8>]) -> Result<Option<Tensor>> {
        if images.is_empty() {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let paths = images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let path = dir.path().join(format!("image-{i}"));
                std::fs::write(&path, bytes)?;
                Ok(path)
            })
            .collect::<Result<Vec<_>>>()?;
        self.bundle
            .pixel_values(&paths)
            .map(Some)
            .context("decoding the request's image")
    }

    /// The log-probability of each generated token and the `top` most likely at its place,
    /// from one forward of the prompt and the answer (temperature 1, as the API reports them).
    fn logprobs(
        &self,
        prompt: &[u32],
        answer: &[u32],
        pixels: Option<&Tensor>,
        top: usize,
    ) -> Result<Logprobs> {
        let model = &self.bundle.model;
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(answer);
        let batch = crate::models::llava::TokenBatch::right_padded(&[ids], 0);
        let logits = model.forward(&batch, pixels)?.logits;
        let rows = logits
            .squeeze(0)?
            .narrow(0, prompt.len() - 1, answer.len())?
            .to_dtype(DType::F32)?;
        let logp = crate::distill::log_softmax(&rows)?;
        let sorted = logp.arg_sort_last_dim(false)?;
        let logp: Vec<Vec<f32>> = logp.to_vec2()?;
        let order: Vec<Vec<u32>> = sorted.to_vec2()?;
        let piece = |id: u32| -> (String, Vec<u8>) {
            let text = self.bundle.decode(&[id]).unwrap_or_default();
            let bytes = text.as_bytes().to_vec();
            (text, bytes)
        };
        let content = answer
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                let (token, bytes) = piece(id);
                let top_logprobs = order[t]
                    .iter()
                    .take(top)
                    .map(|&alt| {
                        let (token, bytes) = piece(alt);
                        TopLogprob {
                            token,
                            logprob: logp[t][alt as usize],
                            bytes,
                        }
                    })
                    .collect();
                TokenLogprob {
                    token,
                    logprob: logp[t][id as usize],
                    bytes,
                    top_logprobs,
                }
            })
            .collect();
        Ok(Logprobs { content })
    }
}
