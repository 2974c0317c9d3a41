//! Training a byte-level BPE tokenizer on LLaVA data (for the synthetic task's tiny models) and
//! loading Hugging Face `tokenizer.json` files.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

use crate::reader::LlavaDataset;
use crate::sample::IMAGE_PLACEHOLDER;
use crate::template::Template;

/// Special tokens of trained tokenizers, in id order (`<|endoftext|>` is id 0, `<image>` id 1):
/// every marker the shipped templates use, so one tokenizer serves all of them.
pub const SPECIAL_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<image>",
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// Load a Hugging Face tokenizer from a `tokenizer.json` file or a directory holding one.
/// Truncation and padding stored in the file are switched off: mmkd truncates around image
/// blocks and pads batches itself.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let mut tokenizer = read_tokenizer_file(&file)?;
    tokenizer.with_truncation(None).map_err(|e| {
        anyhow!(
            "cannot disable truncation of tokenizer {}: {e}",
            file.display()
        )
    })?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// Parses a `tokenizer.json`. The text is checked to be JSON first, and a panic inside the
/// tokenizers crate (some malformed files make it panic instead of failing) is contained: a bad
/// file is an error naming it, never a crash.
fn read_tokenizer_file(file: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow!("cannot read tokenizer {}: {e}", file.display()))?;
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        bail!(
            "cannot load tokenizer {}: not valid JSON ({e}){}",
            file.display(),
            if e.is_eof() {
                "; is the file truncated?"
            } else {
                ""
            }
        );
    }
    let parsed =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Tokenizer::from_str(&text)));
    match parsed {
        Ok(Ok(tokenizer)) => Ok(tokenizer),
        Ok(Err(e)) => bail!("cannot load tokenizer {}: {e}", file.display()),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "no message".into());
            bail!(
                "cannot load tokenizer {}: the tokenizers library failed on it ({why})",
                file.display()
            )
        }
    }
}

/// The text a tokenizer is trained on: every turn of every usable sample of the LLaVA files
/// found under `data` (a file, or a directory searched recursively for `*.json` / `*.jsonl`),
/// with `<image>` removed. Files that hold no LLaVA sample (e.g. evaluation question files) are
/// not used. Returns the texts and the files used.
pub fn collect_training_text(data: &Path) -> Result<(Vec<String>, Vec<PathBuf>)> {
    let files = if data.is_dir() {
        let mut found = Vec::new();
        find_json_files(data, &mut found)?;
        found.sort();
        found
    } else {
        vec![data.to_path_buf()]
    };
    let mut texts = Vec::new();
    let mut used = Vec::new();
    for file in files {
        let dataset = LlavaDataset::read(&file, Path::new(""))?;
        if dataset.samples.is_empty() {
            continue;
        }
        for sample in &dataset.samples {
            for turn in &sample.turns {
                texts.push(turn.value.replace(IMAGE_PLACEHOLDER, ""));
            }
        }
        used.push(file);
    }
    if texts.is_empty() {
        bail!("no LLaVA conversation found in {}", data.display());
    }
    Ok((texts, used))
}

fn find_json_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.is_dir() {
            find_json_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "jsonl")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// The words of the shipped templates (system prompts, role names) without their special
/// markers, so prompts tokenize compactly too.
fn template_text() -> Vec<String> {
    let mut out = Vec::new();
    for name in Template::builtin_names() {
        let Ok(t) = Template::builtin(name) else {
            continue;
        };
        let mut text = t.generation_prompt(&[("question", "answer")], "question", 0);
        for special in SPECIAL_TOKENS {
            text = text.replace(special, " ");
        }
        out.push(text);
    }
    out
}

/// Train a byte-level BPE tokenizer with [`SPECIAL_TOKENS`] (ids 0..) on `texts` and the template
/// words. Every byte is in the vocabulary, so any text encodes.
pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let floor = 256 + SPECIAL_TOKENS.len();
    if vocab_size < floor {
        bail!(
            "vocab size {vocab_size} is below {floor} (256 bytes + {} special tokens)",
            SPECIAL_TOKENS.len()
        );
    }
    let byte_level = ByteLevel::new(false, false, true);
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(|e| anyhow!("cannot build tokenizer: {e}"))?;
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let corpus = texts.iter().cloned().chain(template_text());
    tokenizer
        .train(&mut trainer, corpus)
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    let json = tokenizer
        .to_string(false)
        .map_err(|e| anyhow!("cannot serialise tokenizer: {e}"))?;
    Tokenizer::from_str(&json).map_err(|e| anyhow!("cannot reload trained tokenizer: {e}"))
}

/// Save in the Hugging Face `tokenizer.json` format.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let text = tokenizer
        .to_string(true)
        .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?;
    crate::atomic::write_atomically(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let mut texts = Vec::new();
        for color in ["red", "green", "blue"] {
            for shape in ["circle", "square", "star"] {
                texts.push(format!("What color is the {shape}? It is {color}."));
                texts.push(format!("There is a {color} {shape} in the top left."));
            }
        }
        texts
    }

    #[test]
    fn a_truncated_or_broken_tokenizer_file_is_an_error_naming_it_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        save_tokenizer(&train_bpe(&corpus(), 400).unwrap(), &good).unwrap();
        let text = std::fs::read_to_string(&good).unwrap();
        let bad = dir.path().join("tokenizer.json");
        // Every cut inside the decoder section (where tokenizers 0.21 panicked on a truncated
        // file) and a spread of cuts over the rest.
        let decoder = text.find("\"decoder\"").unwrap();
        let step = (text.len() / 200).max(1);
        let cuts = (decoder..(decoder + 300).min(text.len()))
            .chain((0..text.len()).step_by(step))
            .filter(|&c| text.is_char_boundary(c));
        for cut in cuts {
            std::fs::write(&bad, &text[..cut]).unwrap();
            let err = load_tokenizer(&bad).unwrap_err().to_string();
            assert!(err.contains("tokenizer.json"), "cut {cut}: {err}");
        }
        // Valid JSON that is not a tokenizer.
        std::fs::write(
            &bad,
            r#"{"model": {"type": "BPE", "vocab": 3}, "decoder": 7}"#,
        )
        .unwrap();
        let err = load_tokenizer(&bad).unwrap_err().to_string();
        assert!(err.contains("cannot load tokenizer"), "{err}");
        assert!(load_tokenizer(&good).is_ok());
    }

    #[test]
    fn trained_tokenizer_has_special_tokens_and_round_trips() {
        let tok = train_bpe(&corpus(), 400).unwrap();
        for (i, special) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(special), Some(i as u32), "{special}");
        }
        assert!(tok.get_vocab_size(true) <= 400);
        let text = "USER: <image>\nWhat color is the circle? ASSISTANT: red<|endoftext|> héllo ✓";
        let enc = tok.encode(text, false).unwrap();
        assert!(enc.get_ids().contains(&1), "<image> is one token");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        // Learned merges: common words are single tokens.
        assert!(tok.token_to_id("Ġcircle").is_some());
    }

    #[test]
    fn training_is_deterministic_and_saves_hf_json() {
        let a = train_bpe(&corpus(), 380).unwrap();
        let b = train_bpe(&corpus(), 380).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokenizer.json");
        save_tokenizer(&a, &path).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["model"]["type"], "BPE");
        assert_eq!(json["added_tokens"][1]["content"], "<image>");
        let loaded = load_tokenizer(dir.path().join("sub").as_path()).unwrap();
        assert_eq!(loaded.token_to_id("<|im_end|>"), Some(3));
    }

    #[test]
    fn too_small_vocab_is_an_error() {
        let err = train_bpe(&corpus(), 100).unwrap_err();
        assert!(err.to_string().contains("below 266"), "{err}");
    }
}
