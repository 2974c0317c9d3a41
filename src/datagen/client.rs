//! A client of the OpenAI-compatible chat-completions API (vLLM, SGLang, llama.cpp's server,
//! hosted APIs, `mmkd serve`): one image and one question a request, the image as a base64
//! data URL; bounded concurrency, a timeout per request, retries with exponential backoff on
//! 429, 5xx, transport errors and malformed replies (honouring `Retry-After`).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use super::filters::Reply;

/// Where and how to reach the teacher.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Base URL, e.g. `http://127.0.0.1:8000/v1`.
    pub url: String,
    /// The `model` field of requests.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when present.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Retries after the first attempt.
    pub retries: u32,
    pub timeout: Duration,
    /// The first backoff; doubled each retry, capped at 30 s.
    pub backoff: Duration,
}

/// One request: an image and the text to send with it.
#[derive(Clone, Debug)]
pub struct ApiRequest<'a> {
    pub image: &'a Path,
    pub text: &'a str,
    pub seed: u64,
}

/// The sampling settings sent with every request.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Ask for log-probabilities (and this many alternatives per token).
    pub logprobs: Option<usize>,
}

/// A reply, with the alternatives per token when asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiReply {
    pub reply: Reply,
    /// Per generated token: (token text, its log-probability, its top alternatives as
    /// (text, log-probability)).
    pub tokens: Vec<TokenAlternatives>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenAlternatives {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// An attempt's failure: worth retrying or not.
#[derive(Debug)]
enum Failure {
    Retry(String, Option<Duration>),
    Fatal(String),
}

pub struct ApiClient {
    agent: ureq::Agent,
    endpoint: String,
    settings: ApiSettings,
}

impl ApiClient {
    pub fn settings(&self) -> &ApiSettings {
        &self.settings
    }

    pub fn new(settings: ApiSettings) -> Result<Self> {
        anyhow::ensure!(
            settings.concurrency >= 1,
            "--concurrency must be at least 1"
        );
        let base = settings.url.trim_end_matches('/');
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--teacher-url {base}: not an http(s) URL"
        );
        let agent = ureq::AgentBuilder::new().timeout(settings.timeout).build();
        Ok(Self {
            agent,
            endpoint: format!("{base}/chat/completions"),
            settings,
        })
    }

    /// Sends every request, `concurrency` at a time; each result in request order.
    pub fn complete_all(
        &self,
        requests: &[ApiRequest<'_>],
        sampling: &Sampling,
    ) -> Vec<Result<ApiReply>> {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<ApiReply>>>> =
            Mutex::new((0..requests.len()).map(|_| None).collect());
        let workers = self.settings.concurrency.min(requests.len()).max(1);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(request) = requests.get(i) else {
                        break;
                    };
                    let result = self.complete(request, sampling);
                    results.lock().expect("no worker panics holding it")[i] = Some(result);
                });
            }
        });
        results
            .into_inner()
            .expect("no worker panicked")
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("the request was not sent"))))
            .collect()
    }

    /// One request, retried as the settings say.
    pub fn complete(&self, request: &ApiRequest<'_>, sampling: &Sampling) -> Result<ApiReply> {
        let body = request_body(&self.settings.model, request, sampling)?;
        let mut backoff = self.settings.backoff;
        let mut last = String::new();
        for attempt in 0..=self.settings.retries {
            match self.attempt(&body) {
                Ok(reply) => return Ok(reply),
                Err(Failure::Fatal(msg)) => bail!("{msg}"),
                Err(Failure::Retry(msg, after)) => {
                    last = msg;
                    if attempt < self.settings.retries {
                        std::thread::sleep(after.unwrap_or(backoff).min(Duration::from_secs(60)));
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
        bail!(
            "{} attempt(s) failed, the last: {last}",
            self.settings.retries + 1
        )
    }

    fn attempt(&self, body: &Value) -> Result<ApiReply, Failure> {
        let mut call = self
            .agent
            .post(&self.endpoint)
            .set("Content-Type", "application/json");
        if let Some(key) = &self.settings.api_key {
            call = call.set("Authorization", &format!("Bearer {key}"));
        }
        let response = match call.send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let after = r
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = r.into_string().unwrap_or_default();
                let msg = format!(
                    "HTTP {code} from {}: {}",
                    self.endpoint,
                    error_message(&text)
                );
                return Err(if code == 429 || code >= 500 {
                    Failure::Retry(msg, after)
                } else {
                    Failure::Fatal(msg)
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure::Retry(format!("{}: {t}", self.endpoint), None))
            }
        };
        let text = response
            .into_string()
            .map_err(|e| Failure::Retry(format!("reading the reply: {e}"), None))?;
        parse_reply(&text).map_err(|e| Failure::Retry(format!("{e:#}"), None))
    }
}

/// The chat-completions body of one request.
fn request_body(model: &str, request: &ApiRequest<'_>, sampling: &Sampling) -> Result<Value> {
    let bytes = std::fs::read(request.image)
        .with_context(|| format!("reading image {}", request.image.display()))?;
    let url = format!(
        "data:{};base64,{}",
        mime_type(request.image),
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": request.text},
        ]}],
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": request.seed,
    });
    if let Some(k) = sampling.logprobs {
        body["logprobs"] = json!(true);
        if k > 0 {
            body["top_logprobs"] = json!(k);
        }
    }
    Ok(body)
}

fn mime_type(path: &Path) -> &'static str {
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        _ => "image/png",
    }
}

/// The error message of an API error body (`{"error": {"message": …}}`), else the body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// The first choice of a chat-completions reply.
pub fn parse_reply(text: &str) -> Result<ApiReply> {
    let value: Value =
        serde_json::from_str(text).context("the reply is not JSON (malformed reply)")?;
    let choice = value["choices"]
        .get(0)
        .context("the reply has no `choices[0]` (malformed reply)")?;
    let content = match &choice["message"]["content"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => bail!("`choices[0].message.content` is {other}, not text (malformed reply)"),
    };
    let finished = choice["finish_reason"].as_str() != Some("length");
    let mut tokens = Vec::new();
    if let Some(entries) = choice["logprobs"]["content"].as_array() {
        for (i, e) in entries.iter().enumerate() {
            let at = || format!("`choices[0].logprobs.content[{i}]` (malformed reply)");
            let token = e["token"].as_str().with_context(at)?.to_string();
            let logprob = e["logprob"].as_f64().with_context(at)? as f32;
            let top = match e["top_logprobs"].as_array() {
                Some(alts) => alts
                    .iter()
                    .map(|a| {
                        Some((
                            a["token"].as_str()?.to_string(),
                            a["logprob"].as_f64()? as f32,
                        ))
                    })
                    .collect::<Option<Vec<_>>>()
                    .with_context(at)?,
                None => Vec::new(),
            };
            tokens.push(TokenAlternatives {
                token,
                logprob,
                top,
            });
        }
    }
    let token_logprobs = (!tokens.is_empty()).then(|| tokens.iter().map(|t| t.logprob).collect());
    Ok(ApiReply {
        reply: Reply {
            text: content,
            finished,
            token_logprobs,
            alternatives: tokens.clone(),
        },
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_with_their_log_probabilities() {
        let text = r#"{"choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "red"},
            "logprobs": {"content": [{"token": "red", "logprob": -0.25, "bytes": [114],
                "top_logprobs": [{"token": "red", "logprob": -0.25}, {"token": "blue", "logprob": -1.5}]}]}}]}"#;
        let r = parse_reply(text).unwrap();
        assert_eq!(r.reply.text, "red");
        assert!(r.reply.finished);
        assert_eq!(r.reply.token_logprobs, Some(vec![-0.25]));
        assert_eq!(
            r.tokens[0].top,
            vec![("red".into(), -0.25), ("blue".into(), -1.5)]
        );
        let cut = r#"{"choices": [{"finish_reason": "length", "message": {"content": "re"}}]}"#;
        let r = parse_reply(cut).unwrap();
        assert!(!r.reply.finished && r.reply.token_logprobs.is_none());
    }

    #[test]
    fn malformed_replies_are_named() {
        for (text, says) in [
            ("not json", "not JSON"),
            ("{}", "no `choices[0]`"),
            (r#"{"choices": [{"message": {"content": 3}}]}"#, "not text"),
            (
                r#"{"choices": [{"message": {"content": "a"}, "logprobs": {"content": [{"token": "a"}]}}]}"#,
                "logprobs.content[0]",
            ),
        ] {
            let e = format!("{:#}", parse_reply(text).unwrap_err());
            assert!(e.contains(says) && e.contains("malformed"), "{e}");
        }
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            error_message(r#"{"error": {"message": "rate limited", "type": "x"}}"#),
            "rate limited"
        );
        assert_eq!(error_message("Bad Gateway"), "Bad Gateway");
    }
}
