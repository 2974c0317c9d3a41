//! Every kind of bad input gives a clear message naming the sample, is counted, and never panics
//! or disappears silently.

mod common;

use std::path::Path;

use common::{byte_tokenizer, special};
use mmkd_datasets::check::{check_dataset, CheckOptions, TokenCheck};
use mmkd_datasets::{
    ImageCheck, LlavaDataset, NoProgress, ProblemKind, Template, TokenizeConfig, TokenizedDataset,
    Truncation,
};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn png(dir: &Path, name: &str) {
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
        .save(dir.join(name))
        .unwrap();
}

#[test]
fn malformed_json_list_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "data.json",
        "[\n{\"id\": \"a\", \"conversations\": []},\n{\"id\": \"b\" \"conversations\": []}\n]\n",
    );
    let err = LlavaDataset::read(&path, dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "malformed JSON in {} at line 3, column 12: expected `,` or `}}`",
            path.display()
        )
    );
}

#[test]
fn malformed_jsonl_line_is_a_counted_problem_and_the_rest_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#;
    let path = write(
        dir.path(),
        "data.jsonl",
        &format!("{good}\n{{\"id\": \"broken\", \"conv\n\n{good}\n"),
    );
    let ds = LlavaDataset::read(&path, dir.path()).unwrap();
    assert_eq!(ds.records, 3);
    assert_eq!(ds.samples.len(), 2);
    assert_eq!(ds.samples[1].reference.line, Some(4));
    assert_eq!(ds.problems.len(), 1);
    let p = &ds.problems[0];
    assert_eq!(p.kind, ProblemKind::MalformedJson);
    assert_eq!(p.sample.line, Some(2));
    assert_eq!(
        p.message,
        format!(
            "malformed JSON in {} at line 2, column 22: EOF while parsing a string",
            path.display()
        )
    );
    assert_eq!(
        p.to_string(),
        format!(
            "sample #1 (no id) at line 2: {} [malformed_json]",
            p.message
        )
    );
}

/// One bad record per case: (record, kind, message).
fn record_cases() -> Vec<(&'static str, ProblemKind, &'static str)> {
    vec![
        (
            r#"{"id": "no-conv", "image": "a.png"}"#,
            ProblemKind::MissingConversations,
            "no `conversations` field",
        ),
        (
            r#"{"id": "empty-conv", "conversations": []}"#,
            ProblemKind::MissingConversations,
            "`conversations` is empty",
        ),
        (
            r#"{"id": "role", "conversations": [{"from": "human", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]}"#,
            ProblemKind::UnknownRole,
            "turn 1 has unknown `from` \"assistant\" (expected \"human\" or \"gpt\")",
        ),
        (
            r#"{"id": "tag-no-image", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]}"#,
            ProblemKind::PlaceholderWithoutImage,
            "the text has 1 `<image>` placeholder(s) but the sample has no image",
        ),
        (
            r#"{"id": "count", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]}"#,
            ProblemKind::ImageCountMismatch,
            "the sample has 2 image(s) but 1 `<image>` placeholder(s)",
        ),
        (
            r#"{"id": "empty-answer", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}"#,
            ProblemKind::EmptyAnswer,
            "turn 1 (gpt) is an empty answer",
        ),
        (
            r#"{"id": "gpt-first", "conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yo"}]}"#,
            ProblemKind::BadTurnOrder,
            "turn 0 is from gpt but human was expected (turns must alternate human, gpt, ...)",
        ),
        (
            r#"{"id": "unanswered", "conversations": [{"from": "human", "value": "Hi"}]}"#,
            ProblemKind::BadTurnOrder,
            "the last turn (0) is a human turn without an answer",
        ),
        (
            r#"{"id": "tag-in-answer", "image": "a.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}]}"#,
            ProblemKind::PlaceholderInAnswer,
            "turn 1 (gpt) contains `<image>`",
        ),
        (
            r#"{"id": "value-type", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]}"#,
            ProblemKind::BadField,
            "turn 0 `value` is a number, not a string",
        ),
        (
            r#"[1, 2]"#,
            ProblemKind::NotAnObject,
            "record is a list, not a JSON object",
        ),
    ]
}

#[test]
fn each_bad_record_is_reported_with_its_id_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"id": 42, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#;
    let cases = record_cases();
    let mut text = format!("[\n{good}");
    for (record, _, _) in &cases {
        text.push_str(",\n");
        text.push_str(record);
    }
    text.push_str("\n]\n");
    let path = write(dir.path(), "data.json", &text);
    let ds = LlavaDataset::read(&path, dir.path()).unwrap();
    assert_eq!(ds.records, cases.len() + 1);
    assert_eq!(ds.samples.len(), 1);
    assert_eq!(ds.samples[0].reference.id.as_deref(), Some("42"));
    assert_eq!(ds.problems.len(), cases.len());
    for (p, (record, kind, message)) in ds.problems.iter().zip(&cases) {
        assert_eq!((p.kind, p.message.as_str()), (*kind, *message), "{record}");
        let id: serde_json::Value = serde_json::from_str(record).unwrap();
        assert_eq!(
            p.sample.id.as_deref(),
            id.get("id").and_then(|v| v.as_str()),
            "{record}"
        );
    }
}

#[test]
fn missing_corrupt_and_unsupported_images_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "good.png");
    std::fs::write(
        dir.path().join("corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not a png",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("picture.tif"),
        b"II*\x00\x08\x00\x00\x00rest of a tiff",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"just text").unwrap();
    let sample = |id: &str, image: &str| {
        format!(
            r#"{{"id": "{id}", "image": "{image}", "conversations": [{{"from": "human", "value": "<image>\nWhat?"}}, {{"from": "gpt", "value": "red"}}]}}"#
        )
    };
    let text = [
        sample("good", "good.png"),
        sample("missing", "missing.png"),
        sample("corrupt", "corrupt.png"),
        sample("tiff", "picture.tif"),
        sample("text", "notes.txt"),
    ]
    .join("\n");
    let path = write(dir.path(), "data.jsonl", &text);
    let root = dir.path();

    let mut ds = LlavaDataset::read(&path, root).unwrap();
    ds.verify_images(ImageCheck::Decode, 2, &|_| {});
    assert_eq!(ds.samples.len(), 1);
    let got: Vec<(String, ProblemKind, String)> = ds
        .problems
        .iter()
        .map(|p| (p.sample.name(), p.kind, p.message.clone()))
        .collect();
    let at = |name: &str| root.join(name).display().to_string();
    assert_eq!(
        got[0],
        (
            "missing".into(),
            ProblemKind::MissingImage,
            format!("image {}: file not found", at("missing.png"))
        )
    );
    assert_eq!(got[1].1, ProblemKind::CorruptImage);
    assert!(
        got[1]
            .2
            .starts_with(&format!("image {}: cannot decode: ", at("corrupt.png"))),
        "{}",
        got[1].2
    );
    assert_eq!(got[2].1, ProblemKind::UnsupportedImage, "{}", got[2].2);
    assert!(
        got[2]
            .2
            .starts_with(&format!("image {}: unsupported: ", at("picture.tif"))),
        "{}",
        got[2].2
    );
    assert_eq!(
        got[3],
        (
            "text".into(),
            ProblemKind::UnsupportedImage,
            format!("image {}: unrecognised image format", at("notes.txt"))
        )
    );

    // The cheap check only sees the missing file.
    let mut ds = LlavaDataset::read(&path, root).unwrap();
    ds.verify_images(ImageCheck::Exists, 1, &|_| {});
    assert_eq!(ds.samples.len(), 4);
    assert_eq!(ds.problems.len(), 1);
}

#[test]
fn the_build_report_counts_every_skipped_sample() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "a.png");
    let long_answer = "word ".repeat(200);
    let text = [
        r#"{"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}"#.to_string(),
        r#"{"id": "no-conv"}"#.to_string(),
        format!(
            r#"{{"id": "long", "image": "a.png", "conversations": [{{"from": "human", "value": "{}<image>"}}, {{"from": "gpt", "value": "x"}}]}}"#,
            long_answer
        ),
        r#"{"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#.to_string(),
    ]
    .join("\n");
    let path = write(dir.path(), "d.jsonl", &text);
    let ds = LlavaDataset::read(&path, dir.path()).unwrap();
    let cfg = TokenizeConfig {
        image_token_id: special("<image>"),
        tokens_per_image: 4,
        max_length: 300,
        truncation: Truncation::Truncate,
    };
    let built = TokenizedDataset::build(
        &ds,
        &byte_tokenizer(),
        &Template::builtin("phi").unwrap(),
        &cfg,
        2,
        &|_| {},
    )
    .unwrap();
    let ids: Vec<&str> = built.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["ok", "text"]);
    let r = &built.report;
    assert_eq!(
        (
            r.records,
            r.kept,
            r.truncated,
            r.problems.len(),
            r.data_errors()
        ),
        (4, 2, 0, 2, 1)
    );
    assert_eq!(
        r.to_string(),
        "4 records: 2 kept (0 truncated), 2 skipped (missing_conversations 1, too_long 1)"
    );
}

#[test]
fn check_reports_counts_and_problems() {
    let dir = tempfile::tempdir().unwrap();
    png(dir.path(), "a.png");
    let text = [
        r#"{"id": "img", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}"#,
        r#"{"id": "txt", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#,
        r#"{"id": "gone", "image": "b.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}"#,
    ]
    .join("\n");
    let path = write(dir.path(), "d.jsonl", &text);
    let tok = byte_tokenizer();
    let template = Template::builtin("chatml").unwrap();
    let opts = CheckOptions {
        image_check: ImageCheck::Decode,
        threads: 2,
        tokens: Some(TokenCheck {
            tokenizer: &tok,
            template: &template,
            config: TokenizeConfig {
                image_token_id: special("<image>"),
                tokens_per_image: 10,
                max_length: 4096,
                truncation: Truncation::Truncate,
            },
        }),
    };
    let report = check_dataset(&path, dir.path(), &opts, &NoProgress).unwrap();
    assert_eq!(
        (
            report.records,
            report.usable,
            report.with_images,
            report.text_only,
            report.images
        ),
        (3, 2, 1, 1, 1)
    );
    assert_eq!(report.data_errors(), 1);
    assert_eq!(report.problems[0].sample.name(), "gone");
    assert_eq!(report.problems[0].kind, ProblemKind::MissingImage);
    let rounds = report.rounds.unwrap();
    assert_eq!((rounds.min, rounds.max), (1, 2));
    // Supervised tokens, by hand: "red" + <|im_end|> + "yes" + <|im_end|> = 8 and "Hello" + <|im_end|> = 6.
    let sup = report.supervised_tokens.unwrap();
    assert_eq!((sup.min, sup.max), (6, 8));
    assert!(
        report
            .to_string()
            .contains("usable samples: 2 (1 with images, 1 text-only)"),
        "{report}"
    );
}

/// Found by `scripts/fuzz.sh` (target `image`): a 1.9 kB PNG whose header declares 32 × 1 023 410 208
/// pixels made the decoder allocate 98 GB and abort. It is refused from its header now.
#[test]
fn an_image_declaring_more_pixels_than_memory_is_refused_from_its_header() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/image_declaring_98gb.png");
    let fault = mmkd_datasets::load_image(&path).unwrap_err();
    assert_eq!(fault.kind, mmkd_datasets::ProblemKind::CorruptImage);
    assert!(
        fault.reason.contains("32×1023410208") && fault.reason.contains("512 MiB"),
        "{}",
        fault.reason
    );
    assert!(mmkd_datasets::check_image(&path, mmkd_datasets::ImageCheck::Decode).is_err());
}
