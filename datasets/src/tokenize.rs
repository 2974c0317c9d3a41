//! Turning a [`Sample`] into input ids and labels with a [`Template`], LLaVA style: the full
//! conversation text is cut at each image and every text chunk is tokenized whole, so ids match
//! what LLaVA's `tokenizer_image_token` produces. Each image becomes `tokens_per_image` copies of
//! `image_token_id`.
//!
//! Labels come from character spans, not from re-tokenizing pieces and counting (LLaVA's source
//! of "tokenization mismatch"): a token is supervised when it overlaps an answer (answer text plus
//! the template's `answer_end`). Every sample is then checked: each answer's supervised tokens
//! must be contiguous and decode to the answer (up to the separator whitespace a tokenizer glues
//! to the first word, as in `Ġred`). A sample failing the check is reported, never trained on.

use std::ops::Range;
use std::path::PathBuf;

use anyhow::{bail, Result};
use tokenizers::Tokenizer;

use crate::problem::{Problem, ProblemKind};
use crate::sample::{Sample, IMAGE_PLACEHOLDER};
use crate::template::Template;

/// Label value of positions that are not trained on.
pub const IGNORE_INDEX: i64 = -100;

/// What to do with a sample longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Cut it at `max_length` (as LLaVA does) unless the cut would split an image block or leave
    /// no supervised token; then skip it.
    #[default]
    Truncate,
    /// Skip every sample that does not fit.
    Skip,
}

/// Settings of [`tokenize_sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeConfig {
    /// Token id filling image blocks (the id of `<image>` in the tokenizer).
    pub image_token_id: u32,
    /// Positions per image (the vision tower's patch count after feature selection).
    pub tokens_per_image: usize,
    /// Longest sequence kept, in tokens, image blocks included.
    pub max_length: usize,
    pub truncation: Truncation,
}

/// A sample ready for batching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSample {
    /// The sample's id (or `#index` when it has none).
    pub id: String,
    /// Position of the record in its file.
    pub index: usize,
    pub input_ids: Vec<u32>,
    /// Unshifted labels: `labels[t]` is `input_ids[t]` where supervised, else [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// Image files in the order their blocks appear.
    pub images: Vec<PathBuf>,
    /// Positions of each image block (`tokens_per_image` long), same order as `images`.
    pub image_spans: Vec<Range<usize>>,
    /// Whether the sample was cut at `max_length`.
    pub truncated: bool,
    /// Where each supervised token starts in the text of its answer, in the order of the
    /// supervised positions: (answer round, byte offset from the start of that round's answer
    /// text, the separator the template puts before it included). Two tokenizations of the
    /// same sample predict the same text where these agree (cross-tokenizer distillation).
    pub answer_offsets: Vec<(u32, u32)>,
}

impl TokenizedSample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn has_images(&self) -> bool {
        !self.images.is_empty()
    }

    /// Number of supervised positions.
    pub fn supervised_count(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// The id of the `<image>` token, which must be a single token of the tokenizer.
pub fn image_token_id(tokenizer: &Tokenizer) -> Result<u32> {
    match tokenizer.token_to_id(IMAGE_PLACEHOLDER) {
        Some(id) => Ok(id),
        None => {
            bail!("the tokenizer has no {IMAGE_PLACEHOLDER:?} token; add it as a special token")
        }
    }
}

/// Check once, before tokenizing, that the tokenizer can serve the template: every special-token
/// looking marker of the template (`<s>`, `<|im_end|>`, ...) must be one token, and the tokenizer
/// must not truncate or pad by itself (lengths are handled here, around image blocks).
pub fn check_tokenizer(tokenizer: &Tokenizer, template: &Template) -> Result<()> {
    if tokenizer.get_truncation().is_some() {
        bail!("the tokenizer has truncation enabled; disable it (mmkd truncates around image blocks itself)");
    }
    if tokenizer.get_padding().is_some() {
        bail!("the tokenizer has padding enabled; disable it (mmkd pads batches itself)");
    }
    let fields = [
        &template.bos,
        &template.system_prefix,
        &template.system_suffix,
        &template.user_prefix,
        &template.user_suffix,
        &template.assistant_prefix,
        &template.answer_end,
        &template.assistant_suffix,
    ];
    for field in fields {
        for marker in special_markers(field) {
            let single = tokenizer.token_to_id(marker).is_some()
                && tokenizer
                    .encode(marker, false)
                    .map(|e| e.get_ids().len() == 1)
                    .unwrap_or(false);
            if !single {
                bail!(
                    "template {} uses {marker:?} but the tokenizer does not have it as one token; add it as a special token",
                    template.name
                );
            }
        }
    }
    Ok(())
}

/// Substrings shaped like special tokens: `<...>` with no whitespace inside.
fn special_markers(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut base = 0;
    while let Some(open) = rest.find('<') {
        let Some(len) = rest[open..].find('>') else {
            break;
        };
        let marker = &rest[open..open + len + 1];
        if len >= 2 && !marker.chars().any(char::is_whitespace) && !marker[1..].contains('<') {
            out.push(&text[base + open..base + open + len + 1]);
            base += open + len + 1;
            rest = &text[base..];
        } else {
            base += open + 1;
            rest = &text[base..];
        }
    }
    out
}

/// A piece of the laid-out conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text; `answer` is the round index when the text is a supervised answer (with its end).
    Text {
        text: String,
        answer: Option<usize>,
    },
    Image,
}

/// The conversation of `sample` laid out by `template`, with images as separate pieces.
fn layout(sample: &Sample, template: &Template) -> Result<Vec<Piece>, (ProblemKind, String)> {
    let rounds = sample.num_rounds();
    if template.single_round && rounds != 1 {
        return Err((
            ProblemKind::TemplateMismatch,
            format!(
                "template {} takes one human turn and one gpt turn; the sample has {rounds} rounds",
                template.name
            ),
        ));
    }
    let unplaced_images = if sample.placeholder_count() == 0 {
        sample.images.len()
    } else {
        0
    };
    let mut pieces = Vec::new();
    let mut text = template.preamble();
    for (r, round) in sample.rounds().enumerate() {
        text.push_str(&template.user_prefix);
        let content =
            template.human_content(round.question, if r == 0 { unplaced_images } else { 0 });
        let mut parts = content.split(IMAGE_PLACEHOLDER);
        if let Some(first) = parts.next() {
            text.push_str(first);
        }
        for part in parts {
            pieces.push(Piece::Text {
                text: std::mem::take(&mut text),
                answer: None,
            });
            pieces.push(Piece::Image);
            text.push_str(part);
        }
        text.push_str(&template.user_suffix);
        text.push_str(&template.assistant_prefix);
        let separator = if template.supervise_separator_whitespace {
            text.split_off(text.trim_end().len())
        } else {
            String::new()
        };
        pieces.push(Piece::Text {
            text: std::mem::take(&mut text),
            answer: None,
        });
        pieces.push(Piece::Text {
            text: format!("{separator}{}{}", round.answer, template.answer_end),
            answer: Some(r),
        });
        text.push_str(&template.assistant_suffix);
    }
    pieces.push(Piece::Text { text, answer: None });
    let images = pieces.iter().filter(|p| matches!(p, Piece::Image)).count();
    if images != sample.images.len() {
        return Err((
            ProblemKind::ImageCountMismatch,
            format!(
                "template {} places {images} image(s) but the sample has {}",
                template.name,
                sample.images.len()
            ),
        ));
    }
    Ok(pieces)
}

/// Text between two images, with the byte ranges of the answers in it.
#[derive(Default)]
struct Chunk {
    text: String,
    answers: Vec<(usize, Range<usize>)>,
}

/// Tokenize a prompt holding `<image>` placeholders (e.g. [`Template::generation_prompt`]) the
/// way training samples are tokenized: chunks between placeholders are encoded whole and each
/// placeholder becomes `tokens_per_image` copies of `image_token_id`. Returns the ids and the
/// positions of each image block.
pub fn tokenize_prompt(
    prompt: &str,
    tokenizer: &Tokenizer,
    image_token_id: u32,
    tokens_per_image: usize,
) -> Result<(Vec<u32>, Vec<Range<usize>>)> {
    let mut ids = Vec::new();
    let mut blocks = Vec::new();
    for (c, chunk) in prompt.split(IMAGE_PLACEHOLDER).enumerate() {
        if c > 0 {
            let start = ids.len();
            ids.extend(std::iter::repeat_n(image_token_id, tokens_per_image));
            blocks.push(start..ids.len());
        }
        if !chunk.is_empty() {
            let enc = tokenizer
                .encode(chunk, false)
                .map_err(|e| anyhow::anyhow!("cannot tokenize prompt chunk {chunk:?}: {e}"))?;
            ids.extend_from_slice(enc.get_ids());
        }
    }
    Ok((ids, blocks))
}

/// The full conversation text with `<image>` placeholders: what LLaVA would tokenize.
pub fn render_text(sample: &Sample, template: &Template) -> Result<String, Problem> {
    let pieces =
        layout(sample, template).map_err(|(k, m)| Problem::new(sample.reference.clone(), k, m))?;
    Ok(pieces
        .iter()
        .map(|p| match p {
            Piece::Text { text, .. } => text.as_str(),
            Piece::Image => IMAGE_PLACEHOLDER,
        })
        .collect())
}

/// Tokenize one sample; see the module documentation. Call [`check_tokenizer`] once beforehand.
pub fn tokenize_sample(
    sample: &Sample,
    tokenizer: &Tokenizer,
    template: &Template,
    cfg: &TokenizeConfig,
) -> Result<TokenizedSample, Problem> {
    let reference = &sample.reference;
    let problem = |kind, msg: String| Problem::new(reference.clone(), kind, msg);
    let pieces = layout(sample, template).map_err(|(k, m)| problem(k, m))?;

    // Chunks of text between images, as LLaVA's tokenizer_image_token splits the prompt.
    let mut chunks: Vec<Chunk> = vec![Chunk::default()];
    for piece in &pieces {
        match piece {
            Piece::Image => chunks.push(Chunk::default()),
            Piece::Text { text, answer } => {
                let chunk = chunks.last_mut().expect("chunks starts non-empty");
                let start = chunk.text.len();
                chunk.text.push_str(text);
                if let Some(r) = answer {
                    chunk.answers.push((*r, start..chunk.text.len()));
                }
            }
        }
    }

    let mut out = TokenizedSample {
        id: reference.name(),
        index: reference.index,
        input_ids: Vec::new(),
        labels: Vec::new(),
        images: sample.images.clone(),
        image_spans: Vec::new(),
        truncated: false,
        answer_offsets: Vec::new(),
    };
    let mut supervised: Vec<Option<AnswerTokens>> = vec![None; sample.num_rounds()];
    for (c, chunk) in chunks.iter().enumerate() {
        if c > 0 {
            let start = out.input_ids.len();
            out.input_ids.extend(std::iter::repeat_n(
                cfg.image_token_id,
                cfg.tokens_per_image,
            ));
            out.labels
                .extend(std::iter::repeat_n(IGNORE_INDEX, cfg.tokens_per_image));
            out.image_spans.push(start..out.input_ids.len());
        }
        if chunk.text.is_empty() {
            continue;
        }
        let enc = tokenizer.encode(chunk.text.as_str(), false).map_err(|e| {
            problem(
                ProblemKind::TokenizationMismatch,
                format!("the tokenizer failed: {e}"),
            )
        })?;
        for (&id, &(s, e)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            let pos = out.input_ids.len();
            if id == cfg.image_token_id {
                return Err(problem(
                    ProblemKind::TokenizationMismatch,
                    format!("the text (outside image blocks) tokenizes to the image token id {id}"),
                ));
            }
            let owner = chunk.answers.iter().find(|(_, r)| overlaps(s..e, r));
            out.input_ids.push(id);
            out.labels.push(if owner.is_some() {
                i64::from(id)
            } else {
                IGNORE_INDEX
            });
            if let Some((round, range)) = owner {
                out.answer_offsets
                    .push((*round as u32, s.saturating_sub(range.start) as u32));
                let entry = &mut supervised[*round];
                match entry {
                    None => {
                        *entry = Some(AnswerTokens {
                            positions: pos..pos + 1,
                            chunk: c,
                            span: s..e,
                        })
                    }
                    Some(AnswerTokens {
                        positions, span, ..
                    }) => {
                        if positions.end != pos {
                            return Err(problem(
                                ProblemKind::TokenizationMismatch,
                                format!("answer {} is not one contiguous run of tokens", round + 1),
                            ));
                        }
                        positions.end = pos + 1;
                        span.start = span.start.min(s);
                        span.end = span.end.max(e);
                    }
                }
            }
        }
    }

    check_answers(sample, template, tokenizer, &chunks, &supervised, &out)
        .map_err(|m| problem(ProblemKind::TokenizationMismatch, m))?;
    truncate(&mut out, cfg).map_err(|m| problem(ProblemKind::TooLong, m))?;
    Ok(out)
}

fn overlaps(token: Range<usize>, answer: &Range<usize>) -> bool {
    if token.is_empty() {
        // Offsets trimmed to nothing (e.g. a whitespace token with trim_offsets): use its position.
        answer.contains(&token.start)
    } else {
        token.start < answer.end && answer.start < token.end
    }
}

/// The tokens labelled for one answer.
#[derive(Debug, Clone)]
struct AnswerTokens {
    /// Positions in the output sequence.
    positions: Range<usize>,
    /// The chunk they come from.
    chunk: usize,
    /// The chunk bytes they cover.
    span: Range<usize>,
}

/// Every answer must own a contiguous token run that decodes to exactly the answer and its end
/// marker, apart from whitespace the tokenizer attached in front.
fn check_answers(
    sample: &Sample,
    template: &Template,
    tokenizer: &Tokenizer,
    chunks: &[Chunk],
    supervised: &[Option<AnswerTokens>],
    out: &TokenizedSample,
) -> Result<(), String> {
    for (r, round) in sample.rounds().enumerate() {
        let expected = format!("{}{}", round.answer, template.answer_end);
        let Some(AnswerTokens {
            positions,
            chunk: c,
            span,
        }) = &supervised[r]
        else {
            return Err(format!("answer {} got no supervised token", r + 1));
        };
        let chunk = &chunks[*c];
        let Some((_, answer_range)) = chunk.answers.iter().find(|(owner, _)| *owner == r) else {
            return Err(format!(
                "answer {} is missing from the laid-out text",
                r + 1
            ));
        };
        // Bytes the answer's tokens cover beyond the answer itself must be separator whitespace
        // (the answer range itself may start with the separator, see the template).
        let before = chunk
            .text
            .get(span.start.min(answer_range.start)..answer_range.start);
        let after = chunk
            .text
            .get(answer_range.end..span.end.max(answer_range.end));
        match (before, after) {
            (Some(b), Some(a)) if b.trim().is_empty() && a.is_empty() => {}
            (Some(b), Some(a)) => {
                return Err(format!(
                    "answer {} shares tokens with the surrounding prompt ({:?} before, {:?} after)",
                    r + 1,
                    b,
                    a
                ))
            }
            _ => {
                return Err(format!(
                    "answer {} token offsets fall inside a character",
                    r + 1
                ))
            }
        }
        let ids = &out.input_ids[positions.clone()];
        let decoded = tokenizer
            .decode(ids, false)
            .map_err(|e| format!("cannot decode answer {}: {e}", r + 1))?;
        if decoded.trim_start() != expected.trim_start() {
            return Err(format!(
                "answer {}: the supervised tokens decode to {decoded:?}, but the answer is {expected:?}",
                r + 1
            ));
        }
    }
    Ok(())
}

fn truncate(out: &mut TokenizedSample, cfg: &TokenizeConfig) -> Result<(), String> {
    let len = out.input_ids.len();
    if len <= cfg.max_length {
        return Ok(());
    }
    if cfg.truncation == Truncation::Skip {
        return Err(format!("{len} tokens exceed max_length {}", cfg.max_length));
    }
    if let Some((k, block)) = out
        .image_spans
        .iter()
        .enumerate()
        .find(|(_, s)| s.end > cfg.max_length)
    {
        return Err(format!(
            "{len} tokens exceed max_length {} and a cut there would cut off image {} (positions {}..{})",
            cfg.max_length,
            k + 1,
            block.start,
            block.end
        ));
    }
    out.input_ids.truncate(cfg.max_length);
    out.labels.truncate(cfg.max_length);
    // The cut keeps a prefix, so the answer tokens left are the first ones.
    let kept = out.supervised_count();
    out.answer_offsets.truncate(kept);
    if out.supervised_count() == 0 {
        return Err(format!(
            "{len} tokens exceed max_length {} and no answer token is left before the cut",
            cfg.max_length
        ));
    }
    out.truncated = true;
    Ok(())
}
