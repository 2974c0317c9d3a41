//! Template layouts, ids and labels against hand-worked expectations.
//!
//! The tokenizer here maps every byte to its own id (no merges) and the special tokens to 256..,
//! so the expected ids below follow from the written-out text alone.

mod common;

use common::{byte_tokenizer, byte_tokenizer_with, sample, special};
use mmkd_datasets::{
    check_tokenizer, tokenize_sample, ProblemKind, Template, TokenizeConfig, TokenizedSample,
    Truncation, IGNORE_INDEX,
};
use serde_json::{json, Value};

const TPI: usize = 3;
const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
const LLAMA3_SYSTEM: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

/// A piece of an expected sequence.
enum Seg<'a> {
    /// Prompt text (not supervised).
    P(&'a str),
    /// Answer text (supervised).
    A(&'a str),
    /// Special token in the prompt.
    Ps(&'a str),
    /// Special token closing an answer (supervised).
    As(&'a str),
    /// An image block.
    Img,
}
use Seg::*;

fn expected(segs: &[Seg]) -> (Vec<u32>, Vec<i64>) {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for seg in segs {
        match seg {
            P(t) | A(t) => {
                for b in t.bytes() {
                    ids.push(b as u32);
                    labels.push(if matches!(seg, A(_)) {
                        b as i64
                    } else {
                        IGNORE_INDEX
                    });
                }
            }
            Ps(t) | As(t) => {
                ids.push(special(t));
                labels.push(if matches!(seg, As(_)) {
                    special(t) as i64
                } else {
                    IGNORE_INDEX
                });
            }
            Img => {
                ids.extend([special("<image>"); TPI]);
                labels.extend([IGNORE_INDEX; TPI]);
            }
        }
    }
    (ids, labels)
}

fn config(max_length: usize) -> TokenizeConfig {
    TokenizeConfig {
        image_token_id: special("<image>"),
        tokens_per_image: TPI,
        max_length,
        truncation: Truncation::Truncate,
    }
}

fn run(template: &str, record: Value) -> TokenizedSample {
    let t = Template::builtin(template).unwrap();
    let tok = byte_tokenizer();
    check_tokenizer(&tok, &t).unwrap();
    tokenize_sample(&sample(record).unwrap(), &tok, &t, &config(4096)).unwrap()
}

fn assert_layout(template: &str, record: Value, segs: &[Seg]) -> TokenizedSample {
    let out = run(template, record);
    let (ids, labels) = expected(segs);
    assert_eq!(out.input_ids, ids, "{template}: ids");
    assert_eq!(out.labels, labels, "{template}: labels");
    out
}

fn two_rounds() -> Value {
    json!({"id": "s1", "image": "a.png", "conversations": [
        {"from": "human", "value": "What color?\n<image>"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]})
}

#[test]
fn plain_is_image_then_caption_and_newline_all_supervised() {
    let record = json!({"id": "c", "image": "a.png", "conversations": [
        {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A red circle."}]});
    let out = assert_layout("plain", record, &[Img, A("A red circle.\n")]);
    assert_eq!(out.image_spans, vec![0..3]);
    assert_eq!(out.images, vec![std::path::PathBuf::from("/images/a.png")]);
    // Text-only: just the caption.
    let record = json!({"id": "t", "conversations": [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": "ok"}]});
    assert_layout("plain", record, &[A("ok\n")]);
}

#[test]
fn plain_rejects_several_rounds() {
    let t = Template::builtin("plain").unwrap();
    let err = tokenize_sample(
        &sample(two_rounds()).unwrap(),
        &byte_tokenizer(),
        &t,
        &config(4096),
    )
    .unwrap_err();
    assert_eq!(err.kind, ProblemKind::TemplateMismatch);
    assert_eq!(
        err.message,
        "template plain takes one human turn and one gpt turn; the sample has 2 rounds"
    );
}

#[test]
fn vicuna_v1_layout() {
    let sys_user = format!("{VICUNA_SYSTEM} USER: ");
    assert_layout(
        "vicuna_v1",
        two_rounds(),
        &[
            Ps("<s>"),
            P(&sys_user),
            Img,
            P("\nWhat color? ASSISTANT: "),
            A("red"),
            As("</s>"),
            P("USER: And the shape? ASSISTANT: "),
            A("circle"),
            As("</s>"),
        ],
    );
}

#[test]
fn phi_and_qwen2_base_layout() {
    let sys_user = format!("{VICUNA_SYSTEM} USER: ");
    let segs = [
        P(&sys_user),
        Img,
        P("\nWhat color? ASSISTANT: "),
        A("red"),
        As("<|endoftext|>"),
        P("USER: And the shape? ASSISTANT: "),
        A("circle"),
        As("<|endoftext|>"),
    ];
    let phi = assert_layout("phi", two_rounds(), &segs);
    assert_eq!(phi.image_spans, vec![sys_user.len()..sys_user.len() + TPI]);
    assert_layout("qwen2_base", two_rounds(), &segs);
}

#[test]
fn chatml_layout() {
    assert_layout(
        "chatml",
        two_rounds(),
        &[
            Ps("<|im_start|>"),
            P("system\nYou are a helpful assistant."),
            Ps("<|im_end|>"),
            P("\n"),
            Ps("<|im_start|>"),
            P("user\n"),
            Img,
            P("\nWhat color?"),
            Ps("<|im_end|>"),
            P("\n"),
            Ps("<|im_start|>"),
            P("assistant\n"),
            A("red"),
            As("<|im_end|>"),
            P("\n"),
            Ps("<|im_start|>"),
            P("user\nAnd the shape?"),
            Ps("<|im_end|>"),
            P("\n"),
            Ps("<|im_start|>"),
            P("assistant\n"),
            A("circle"),
            As("<|im_end|>"),
            P("\n"),
        ],
    );
}

#[test]
fn llama3_layout_text_only() {
    let record = json!({"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]});
    let sys = format!("\n\n{LLAMA3_SYSTEM}");
    let out = assert_layout(
        "llama3",
        record,
        &[
            Ps("<|begin_of_text|>"),
            Ps("<|start_header_id|>"),
            P("system"),
            Ps("<|end_header_id|>"),
            P(&sys),
            Ps("<|eot_id|>"),
            Ps("<|start_header_id|>"),
            P("user"),
            Ps("<|end_header_id|>"),
            P("\n\nHi?"),
            Ps("<|eot_id|>"),
            Ps("<|start_header_id|>"),
            P("assistant"),
            Ps("<|end_header_id|>"),
            P("\n\n"),
            A("Hello."),
            As("<|eot_id|>"),
        ],
    );
    assert!(out.images.is_empty() && out.image_spans.is_empty());
}

#[test]
fn several_images_stay_where_written_and_missing_placeholder_goes_first() {
    let record = json!({"id": "m", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "same"}]});
    let sys_user = format!("{VICUNA_SYSTEM} USER: Compare ");
    let out = assert_layout(
        "phi",
        record,
        &[
            P(&sys_user),
            Img,
            P(" and "),
            Img,
            P(". ASSISTANT: "),
            A("same"),
            As("<|endoftext|>"),
        ],
    );
    let first = sys_user.len();
    assert_eq!(
        out.image_spans,
        vec![first..first + TPI, first + TPI + 5..first + 2 * TPI + 5]
    );
    // An image sample without placeholder: LLaVA puts the image before the first question.
    let record = json!({"id": "n", "image": "a.png", "conversations": [
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]});
    let sys_user = format!("{VICUNA_SYSTEM} USER: ");
    assert_layout(
        "phi",
        record,
        &[
            P(&sys_user),
            Img,
            P("\nWhat color? ASSISTANT: "),
            A("red"),
            As("<|endoftext|>"),
        ],
    );
}

fn phi_two_rounds(
    max_length: usize,
    truncation: Truncation,
) -> Result<TokenizedSample, mmkd_datasets::Problem> {
    let t = Template::builtin("phi").unwrap();
    let cfg = TokenizeConfig {
        truncation,
        ..config(max_length)
    };
    tokenize_sample(&sample(two_rounds()).unwrap(), &byte_tokenizer(), &t, &cfg)
}

#[test]
fn truncation_keeps_image_blocks_whole() {
    let full = phi_two_rounds(4096, Truncation::Truncate).unwrap();
    let n = full.len();
    let image = full.image_spans[0].clone();

    // A cut inside the second answer: kept, cut, flagged.
    let cut = phi_two_rounds(n - 3, Truncation::Truncate).unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.input_ids, full.input_ids[..n - 3]);
    assert_eq!(cut.labels, full.labels[..n - 3]);

    // A cut through the image block: skipped, with the reason.
    let err = phi_two_rounds(image.start + 1, Truncation::Truncate).unwrap_err();
    assert_eq!(err.kind, ProblemKind::TooLong);
    assert_eq!(
        err.message,
        format!(
            "{n} tokens exceed max_length {} and a cut there would cut off image 1 (positions {}..{})",
            image.start + 1,
            image.start,
            image.end
        )
    );
    assert_eq!(err.sample.id.as_deref(), Some("s1"));

    // A cut after the image but before any answer token: nothing left to learn, skipped.
    let err = phi_two_rounds(image.end + 2, Truncation::Truncate).unwrap_err();
    assert_eq!(err.kind, ProblemKind::TooLong);
    assert!(
        err.message
            .ends_with("no answer token is left before the cut"),
        "{}",
        err.message
    );

    // Skip policy: anything too long is skipped.
    let err = phi_two_rounds(n - 1, Truncation::Skip).unwrap_err();
    assert_eq!(
        err.message,
        format!("{n} tokens exceed max_length {}", n - 1)
    );
    assert!(!phi_two_rounds(n, Truncation::Skip).unwrap().truncated);
}

#[test]
fn a_token_spanning_prompt_and_answer_is_reported_not_trained() {
    // ":" (end of the prompt) and "+" (start of the answer) merge into one token.
    let tok = byte_tokenizer_with(&[(":", "+")], Value::Null);
    let t = Template::from_toml_str(
        "name = \"colon\"\nuser_prefix = \"Q: \"\nuser_suffix = \"\\n\"\nassistant_prefix = \"A:\"\nanswer_end = \"<|endoftext|>\"\nimage_placement = \"front\"\nhuman_text = \"keep\"\n",
        "test",
    )
    .unwrap();
    let record = json!({"id": "x7", "conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "+2"}]});
    let err = tokenize_sample(&sample(record).unwrap(), &tok, &t, &config(4096)).unwrap_err();
    assert_eq!(err.kind, ProblemKind::TokenizationMismatch);
    assert_eq!(err.sample.id.as_deref(), Some("x7"));
    assert_eq!(
        err.message,
        "answer 1 shares tokens with the surrounding prompt (\":\" before, \"\" after)"
    );
}

#[test]
fn supervised_tokens_that_do_not_decode_to_the_answer_are_reported() {
    let tok = byte_tokenizer_with(&[], json!({"type": "Lowercase"}));
    let record = json!({"id": "low", "conversations": [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Red"}]});
    let err = tokenize_sample(
        &sample(record).unwrap(),
        &tok,
        &Template::builtin("phi").unwrap(),
        &config(4096),
    )
    .unwrap_err();
    assert_eq!(err.kind, ProblemKind::TokenizationMismatch);
    assert_eq!(
        err.message,
        "answer 1: the supervised tokens decode to \"red<|endoftext|>\", but the answer is \"Red<|endoftext|>\""
    );
}

#[test]
fn a_tokenizer_without_the_template_tokens_is_refused() {
    let tok = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
    let err = check_tokenizer(&tok, &Template::builtin("chatml").unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "template chatml uses \"<|im_start|>\" but the tokenizer does not have it as one token; add it as a special token"
    );
}
