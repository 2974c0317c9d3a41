//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use mmkd_datasets::{Problem, Sample, SampleRef, SPECIAL_TOKENS};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// GPT-2's byte-to-character table used by byte-level BPE vocabularies.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from_u32(b as u32).unwrap();
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A byte-level tokenizer without merges: byte `b` is token `b`, and the special tokens of
/// trained tokenizers follow as ids 256.. . Expected ids can be worked out by hand from text.
/// `merges` adds merged tokens (ids after the special tokens) to provoke tokens that straddle prompt and answer.
pub fn byte_tokenizer_with(merges: &[(&str, &str)], normalizer: Value) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    // Special tokens are model tokens too (as in trained tokenizers), so their ids stay put.
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(t.to_string(), json!(256 + i));
    }
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + SPECIAL_TOKENS.len() + i));
    }
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    });
    Tokenizer::from_bytes(spec.to_string().as_bytes()).unwrap()
}

pub fn byte_tokenizer() -> Tokenizer {
    byte_tokenizer_with(&[], Value::Null)
}

/// Id of a special token in the byte tokenizer.
pub fn special(token: &str) -> u32 {
    256 + SPECIAL_TOKENS.iter().position(|t| *t == token).unwrap() as u32
}

/// A sample from a JSON record, resolving images against `/images`.
pub fn sample(record: Value) -> Result<Sample, Problem> {
    let id = record.get("id").and_then(|v| v.as_str()).map(String::from);
    Sample::from_json(
        &record,
        SampleRef {
            index: 0,
            id,
            line: None,
        },
        Path::new("/images"),
    )
}
