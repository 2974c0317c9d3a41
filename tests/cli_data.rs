//! `mmkd data synth | tokenizer | check` as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

fn mmkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .args(args)
        .output()
        .expect("mmkd runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn synth_then_tokenizer_then_check() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shapes");
    let data_s = data.to_str().unwrap();
    let out = mmkd(&[
        "data",
        "synth",
        "--out",
        data_s,
        "--seed",
        "3",
        "--train",
        "30",
        "--val",
        "6",
        "--test",
        "6",
        "--image-size",
        "32",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains("train: 30 images, 30 pretrain samples, 31 instruct samples (1 text-only)"),
        "{}",
        text(&out.stdout)
    );

    let tok = dir.path().join("tokenizer.json");
    let out = mmkd(&[
        "data",
        "tokenizer",
        "--data",
        data_s,
        "--vocab-size",
        "400",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(tok.is_file());

    let instruct = data.join("train/instruct.json");
    let out = mmkd(&[
        "data",
        "check",
        "--data",
        instruct.to_str().unwrap(),
        "--images",
        data_s,
        "--template",
        "phi",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--tokens-per-image",
        "16",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(
            "records: 31\nusable samples: 31 (30 with images, 1 text-only)\nimages: 30\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("tokens per sample: min "), "{stdout}");
    assert!(stdout.ends_with("problems: 0\n"), "{stdout}");
}

#[test]
fn check_exits_non_zero_and_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"id": "fine", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#, "\n",
            r#"{"id": "no-image-file", "image": "x.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]}"#, "\n",
            r#"{"id": "bot", "conversations": [{"from": "bot", "value": "Hi"}]}"#, "\n",
        ),
    )
    .unwrap();
    let out = mmkd(&[
        "data",
        "check",
        "--data",
        file.to_str().unwrap(),
        "--images",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("problems: 2 (unknown_role 1, missing_image 1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sample \"bot\" (record 2) at line 3: turn 0 has unknown `from` \"bot\""),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "sample \"no-image-file\" (record 1) at line 2: image {}: file not found",
            Path::new(dir.path()).join("x.png").display()
        )),
        "{stdout}"
    );
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "error: 2 sample(s) of {} have data errors; fix or remove them before training",
            file.display()
        )
    );

    // Malformed JSON list: the message names file, line and column.
    let file = dir.path().join("bad.json");
    std::fs::write(&file, "[\n  {\"id\": 1,\n   \"conversations\" []}\n]").unwrap();
    let out = mmkd(&[
        "data",
        "check",
        "--data",
        file.to_str().unwrap(),
        "--images",
        ".",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "error: malformed JSON in {} at line 3, column 20: expected `:`",
            file.display()
        )
    );
}
