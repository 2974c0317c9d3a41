//! The OpenAI chat-completions wire format, as far as `mmkd serve` speaks it: requests with text
//! and base64 image parts, responses with the answer, its finish reason, token usage and, when
//! asked, the log-probabilities of the generated tokens.

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// A conversation as the model's template lays it out: answered rounds, the open question, and
/// the images (all in the first user message, where the templates place them).
#[derive(Debug, PartialEq)]
pub struct Conversation {
    pub history: Vec<(String, String)>,
    pub question: String,
    pub images: Vec<Vec<u8>>,
}

/// The most tokens one request may ask for.
pub const MAX_TOKENS_LIMIT: usize = 4096;
/// The most alternatives per token (OpenAI's limit).
pub const TOP_LOGPROBS_LIMIT: usize = 20;

impl ChatRequest {
    /// Refuses what this server does not do, naming it.
    pub fn check(&self) -> Result<()> {
        ensure!(
            !self.stream.unwrap_or(false),
            "`stream` is not supported: ask without it"
        );
        ensure!(
            self.n.unwrap_or(1) == 1,
            "`n` = {} is not supported: one choice per request",
            self.n.unwrap_or(1)
        );
        if let Some(t) = self.temperature {
            ensure!(
                t.is_finite() && (0.0..=2.0).contains(&t),
                "`temperature` must be in [0, 2], got {t}"
            );
        }
        if let Some(p) = self.top_p {
            ensure!(p > 0.0 && p <= 1.0, "`top_p` must be in (0, 1], got {p}");
        }
        let k = self.top_logprobs.unwrap_or(0);
        ensure!(
            k <= TOP_LOGPROBS_LIMIT,
            "`top_logprobs` must be at most {TOP_LOGPROBS_LIMIT}, got {k}"
        );
        ensure!(
            k == 0 || self.logprobs.unwrap_or(false),
            "`top_logprobs` needs `logprobs: true`"
        );
        Ok(())
    }

    pub fn max_new_tokens(&self, default: usize) -> Result<usize> {
        let n = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default);
        ensure!(
            (1..=MAX_TOKENS_LIMIT).contains(&n),
            "`max_tokens` must be between 1 and {MAX_TOKENS_LIMIT}, got {n}"
        );
        Ok(n)
    }

    /// The messages as one conversation: user and assistant turns alternating, starting and
    /// ending with the user; images only in the first user message.
    pub fn conversation(&self) -> Result<Conversation> {
        let mut turns = Vec::new();
        let mut images = Vec::new();
        for (i, message) in self.messages.iter().enumerate() {
            let (text, mut found) =
                flatten(&message.content).with_context(|| format!("messages[{i}]"))?;
            let expected = if turns.len() % 2 == 0 {
                "user"
            } else {
                "assistant"
            };
            match message.role.as_str() {
                "system" | "developer" => bail!(
                    "messages[{i}]: `{}` messages are not supported: the model's chat template \
                     has its own system prompt",
                    message.role
                ),
                role if role == expected => {}
                role => bail!(
                    "messages[{i}]: a `{role}` message where a `{expected}` one must come (user \
                     and assistant alternate, starting with the user)"
                ),
            }
            ensure!(
                found.is_empty() || i == 0,
                "messages[{i}]: images are taken in the first user message only"
            );
            images.append(&mut found);
            turns.push(text);
        }
        ensure!(
            turns.len() % 2 == 1,
            "the last message must be the user's (the one to answer)"
        );
        let question = turns.pop().expect("an odd number of turns");
        let history = turns
            .chunks(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect();
        Ok(Conversation {
            history,
            question,
            images,
        })
    }
}

/// A message's text (parts joined with newlines) and its images' bytes.
fn flatten(content: &Content) -> Result<(String, Vec<Vec<u8>>)> {
    match content {
        Content::Text(text) => Ok((text.clone(), Vec::new())),
        Content::Parts(parts) => {
            let mut texts = Vec::new();
            let mut images = Vec::new();
            for part in parts {
                match part {
                    Part::Text { text } => texts.push(text.as_str()),
                    Part::ImageUrl { image_url } => images.push(data_url_bytes(&image_url.url)?),
                }
            }
            Ok((texts.join("\n"), images))
        }
    }
}

/// The bytes of a `data:image/...;base64,...` URL (the server fetches nothing).
pub fn data_url_bytes(url: &str) -> Result<Vec<u8>> {
    let Some(rest) = url.strip_prefix("data:") else {
        bail!("image URLs must be base64 data URLs (data:image/png;base64,...): this server fetches nothing");
    };
    let (meta, payload) = rest.split_once(',').context("a data URL without a comma")?;
    ensure!(
        meta.ends_with(";base64"),
        "the image data URL is not base64 (`{meta}`)"
    );
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .context("the image data URL's base64 is malformed")
}

/// `POST /v1/chat/completions`' answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Choice {
    pub index: usize,
    pub message: AnswerMessage,
    pub finish_reason: String,
    pub logprobs: Option<Logprobs>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AnswerMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Logprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// An error body as OpenAI's API writes it.
pub fn error_body(message: &str, kind: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": kind}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> ChatRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn messages_become_a_conversation_with_the_images_of_the_first_turn() {
        let png = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        let req = request(serde_json::json!({"messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
                {"type": "text", "text": "what is this"}]},
            {"role": "assistant", "content": "a circle"},
            {"role": "user", "content": "what colour"}]}));
        req.check().unwrap();
        assert_eq!(
            req.conversation().unwrap(),
            Conversation {
                history: vec![("what is this".into(), "a circle".into())],
                question: "what colour".into(),
                images: vec![vec![1, 2, 3]],
            }
        );
    }

    #[test]
    fn what_the_server_does_not_do_is_named() {
        let err = |json: serde_json::Value| {
            let req = request(json);
            let e = req.check().and_then(|()| req.conversation().map(|_| ()));
            format!("{:#}", e.unwrap_err())
        };
        let user = serde_json::json!({"role": "user", "content": "hi"});
        assert!(err(serde_json::json!({"messages": [user], "stream": true})).contains("`stream`"));
        assert!(err(serde_json::json!({"messages": [user], "n": 2})).contains("`n` = 2"));
        assert!(
            err(serde_json::json!({"messages": [{"role": "system", "content": "x"}, user]}))
                .contains("`system` messages are not supported")
        );
        assert!(err(serde_json::json!({"messages": [user, user]}))
            .contains("a `user` message where a `assistant`"));
        assert!(err(
            serde_json::json!({"messages": [user, {"role": "assistant", "content": "x"}]})
        )
        .contains("the last message must be the user's"));
        assert!(err(
            serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
        )
        .contains("fetches nothing"));
        assert!(
            err(serde_json::json!({"messages": [user], "top_logprobs": 3}))
                .contains("needs `logprobs: true`")
        );
        assert!(
            request(serde_json::json!({"messages": [user], "max_tokens": 0}))
                .max_new_tokens(16)
                .is_err()
        );
    }
}
