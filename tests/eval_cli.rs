//! `mmkd metrics ...` end to end: outputs on the committed fixtures, and clear errors (exit code
//! 1, message naming the file, line and ids) on bad prediction/reference files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(name)
}

fn mmkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .args(args)
        .output()
        .expect("run mmkd")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Parse the last stdout line as JSON, after checking the run succeeded.
fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

/// Check a failed run: exit code 1 and every fragment present in stderr.
fn assert_fails_with(out: &Output, fragments: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    for f in fragments {
        assert!(stderr.contains(f), "stderr lacks {f:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

#[test]
fn vqa_json_matches_the_fixture() {
    let pred = fixture("vqa_pred.jsonl");
    let answers = fixture("vqa_answers.jsonl");
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&answers),
        "--json",
    ]);
    let got = last_json(&out);
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("vqa_fixture.json")).expect("read"))
            .expect("json");
    assert!(
        (got["accuracy"].as_f64().expect("accuracy") - want["accuracy"].as_f64().expect("want"))
            .abs()
            < 1e-9
    );
    assert_eq!(got["count"], want["count"]);
    let yes_no = &got["per_answer_type"]["yes/no"];
    assert!(
        (yes_no["accuracy"].as_f64().expect("yes/no")
            - want["per_answer_type"]["yes/no"]["accuracy"]
                .as_f64()
                .expect("w"))
        .abs()
            < 1e-9
    );
    assert_eq!(yes_no["count"], 6);
    assert_eq!(
        got["per_category"]["how many"]["count"],
        want["per_category"]["how many"]["count"]
    );
    assert_eq!(got["exact_match_count"], 3);
    assert_eq!(got["processor"], "official");
}

#[test]
fn vqa_evalai_processor_option() {
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&fixture("vqa_pred.jsonl")),
        "--answers",
        path_str(&fixture("vqa_answers.jsonl")),
        "--processor",
        "evalai",
        "--json",
    ]);
    let got = last_json(&out);
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("vqa_fixture.json")).expect("read"))
            .expect("json");
    assert_eq!(got["processor"], "eval_ai");
    assert!(
        (got["accuracy"].as_f64().expect("accuracy")
            - want["accuracy_evalai"].as_f64().expect("want"))
        .abs()
            < 1e-9
    );
    let bad = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        "p",
        "--answers",
        "a",
        "--processor",
        "nope",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "clap rejects an unknown processor"
    );
}

#[test]
fn vqa_table_is_markdown() {
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&fixture("vqa_results.json")),
        "--answers",
        path_str(&fixture("vqa_annotations.json")),
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| accuracy |"), "{stdout}");
    assert!(stdout.contains("| 75.64 |"), "{stdout}");
    assert!(
        stdout.contains("| answer type | count | accuracy |"),
        "{stdout}"
    );
    assert!(stdout.contains("| yes/no | 6 | 71.67 |"), "{stdout}");
    assert!(stdout.contains("single reference answer"), "{stdout}");
}

#[test]
fn caption_json_matches_pycocoevalcap() {
    let out = mmkd(&[
        "metrics",
        "caption",
        "--pred",
        path_str(&fixture("caption_pred.jsonl")),
        "--refs",
        path_str(&fixture("caption_refs.jsonl")),
        "--json",
    ]);
    let got = last_json(&out);
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("caption_fixture.json")).expect("read"),
    )
    .expect("json");
    for key in ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"] {
        let (g, w) = (
            got[key].as_f64().expect(key),
            want["scores"][key].as_f64().expect(key),
        );
        assert!((g - w).abs() < 1e-9, "{key}: {g} vs {w}");
    }
    assert!(got["meteor"].is_null());
    assert!(got["meteor_note"]
        .as_str()
        .expect("note")
        .contains("not computed"));
    assert_eq!(got["count"], 32);
}

#[test]
fn caption_table_says_meteor_is_not_computed() {
    let out = mmkd(&[
        "metrics",
        "caption",
        "--pred",
        path_str(&fixture("caption_pred.jsonl")),
        "--refs",
        path_str(&fixture("caption_refs.jsonl")),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("| bleu_1 | bleu_2 | bleu_3 | bleu_4 | meteor | rouge_l | cider |"),
        "{stdout}"
    );
    assert!(stdout.contains("| n/a |"), "{stdout}");
    assert!(stdout.contains("METEOR not computed"), "{stdout}");
}

#[test]
fn coco_format_captions_give_the_same_scores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("caption_fixture.json")).expect("read"),
    )
    .expect("json");
    let mut anns = Vec::new();
    let mut results = Vec::new();
    for img in fx["images"].as_array().expect("images") {
        let id: u64 = img["id"].as_str().expect("id").parse().expect("int id");
        for r in img["references"].as_array().expect("refs") {
            anns.push(serde_json::json!({"image_id": id, "id": anns.len(), "caption": r}));
        }
        results.push(serde_json::json!({"image_id": id, "caption": img["candidate"]}));
    }
    let refs = write(
        dir.path(),
        "captions_val.json",
        &serde_json::json!({"images": [], "annotations": anns}).to_string(),
    );
    let pred = write(
        dir.path(),
        "results.json",
        &Value::Array(results).to_string(),
    );
    let got = last_json(&mmkd(&[
        "metrics",
        "caption",
        "--pred",
        path_str(&pred),
        "--refs",
        path_str(&refs),
        "--json",
    ]));
    let (g, w) = (
        got["cider"].as_f64().expect("cider"),
        fx["scores"]["cider"].as_f64().expect("cider"),
    );
    assert!((g - w).abs() < 1e-9, "{g} vs {w}");
}

#[test]
fn pope_json_per_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pred = write(
        dir.path(),
        "pred.jsonl",
        concat!(
            "{\"question_id\": 1, \"text\": \"Yes, there is.\"}\n",
            "{\"question_id\": 2, \"text\": \"No, there is not.\"}\n",
            "{\"question_id\": 3, \"text\": \"Yes\"}\n",
            "{\"question_id\": 4, \"text\": \"no\"}\n",
        ),
    );
    let labels = write(
        dir.path(),
        "labels.jsonl",
        concat!(
            "{\"question_id\": 1, \"label\": \"yes\", \"category\": \"random\"}\n",
            "{\"question_id\": 2, \"label\": \"no\", \"category\": \"random\"}\n",
            "{\"question_id\": 3, \"answers\": [\"no\"], \"category\": \"adversarial\"}\n",
            "{\"question_id\": 4, \"label\": \"yes\", \"category\": \"adversarial\"}\n",
        ),
    );
    let got = last_json(&mmkd(&[
        "metrics",
        "pope",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&labels),
        "--json",
    ]));
    // TP 1 (q1), TN 1 (q2), FP 1 (q3), FN 1 (q4).
    assert_eq!(got["accuracy"].as_f64(), Some(50.0));
    assert_eq!(got["precision"].as_f64(), Some(50.0));
    assert_eq!(got["yes_ratio"].as_f64(), Some(50.0));
    assert_eq!(got["count"], 4);
    assert_eq!(got["per_split"]["random"]["accuracy"].as_f64(), Some(100.0));
    assert_eq!(
        got["per_split"]["adversarial"]["accuracy"].as_f64(),
        Some(0.0)
    );
}

#[test]
fn malformed_prediction_line_names_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pred = write(
        dir.path(),
        "bad_pred.jsonl",
        "{\"question_id\": 1000, \"text\": \"yes\"}\n\n{\"question_id\": 1001, \"text\": \"yes\"\n",
    );
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&fixture("vqa_answers.jsonl")),
    ]);
    assert_fails_with(
        &out,
        &["error:", "bad_pred.jsonl", "line 3", "invalid JSON"],
    );
}

#[test]
fn prediction_without_text_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pred = write(
        dir.path(),
        "p.jsonl",
        "{\"question_id\": 1, \"text\": \"a\"}\n{\"question_id\": 2, \"prompt\": \"b\"}\n",
    );
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&fixture("vqa_answers.jsonl")),
    ]);
    assert_fails_with(&out, &["p.jsonl", "line 2", "no \"text\""]);
}

#[test]
fn missing_predictions_list_ids_and_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Only the first 30 of the 39 fixture questions.
    let lines: Vec<String> = std::fs::read_to_string(fixture("vqa_pred.jsonl"))
        .expect("read")
        .lines()
        .take(30)
        .map(String::from)
        .collect();
    let pred = write(dir.path(), "partial.jsonl", &(lines.join("\n") + "\n"));
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&fixture("vqa_answers.jsonl")),
    ]);
    assert_fails_with(
        &out,
        &[
            "partial.jsonl has no prediction for 9 of the 39 ids",
            "1030, 1031, 1032, 1033, 1034",
            "(4 more)",
        ],
    );
}

#[test]
fn extra_predictions_are_reported_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = std::fs::read_to_string(fixture("vqa_pred.jsonl")).expect("read");
    text.push_str(
        "{\"question_id\": 5, \"text\": \"x\"}\n{\"question_id\": \"abc\", \"text\": \"y\"}\n",
    );
    let pred = write(dir.path(), "extra.jsonl", &text);
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&fixture("vqa_answers.jsonl")),
    ]);
    assert_fails_with(&out, &["extra.jsonl has 2 ids that are not in", "5, abc"]);
}

#[test]
fn duplicate_ids_name_both_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refs = write(
        dir.path(),
        "refs.jsonl",
        "{\"question_id\": 1, \"answers\": [\"a dog\"]}\n{\"question_id\": 2, \"answers\": [\"a cat\"]}\n{\"question_id\": 1, \"answers\": [\"a bird\"]}\n",
    );
    let pred = write(
        dir.path(),
        "pred.jsonl",
        "{\"question_id\": 1, \"text\": \"a dog\"}\n{\"question_id\": 2, \"text\": \"a cat\"}\n",
    );
    let out = mmkd(&[
        "metrics",
        "caption",
        "--pred",
        path_str(&pred),
        "--refs",
        path_str(&refs),
    ]);
    assert_fails_with(&out, &["refs.jsonl", "duplicate id 1", "line 1 and line 3"]);
}

#[test]
fn bad_reference_records_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pred = write(
        dir.path(),
        "pred.jsonl",
        "{\"question_id\": 1, \"text\": \"yes\"}\n",
    );
    let empty = write(
        dir.path(),
        "empty.jsonl",
        "{\"question_id\": 1, \"answers\": []}\n",
    );
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&empty),
    ]);
    assert_fails_with(&out, &["empty.jsonl", "line 1", "empty \"answers\""]);
    let typed = write(
        dir.path(),
        "typed.jsonl",
        "{\"question_id\": 1, \"answers\": [\"yes\", 3]}\n",
    );
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&typed),
    ]);
    assert_fails_with(&out, &["typed.jsonl", "line 1", "answers[1]"]);
    let label = write(
        dir.path(),
        "labels.jsonl",
        "{\"question_id\": 1, \"label\": \"maybe\"}\n",
    );
    let out = mmkd(&[
        "metrics",
        "pope",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&label),
    ]);
    assert_fails_with(
        &out,
        &["labels.jsonl", "line 1", "\"yes\" or \"no\"", "maybe"],
    );
    let float_id = write(
        dir.path(),
        "f.jsonl",
        "{\"question_id\": 1.5, \"answers\": [\"yes\"]}\n",
    );
    let out = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        path_str(&pred),
        "--answers",
        path_str(&float_id),
    ]);
    assert_fails_with(&out, &["f.jsonl", "line 1", "integer or a string"]);
}

#[test]
fn missing_and_empty_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = mmkd(&[
        "metrics",
        "caption",
        "--pred",
        "/nonexistent/p.jsonl",
        "--refs",
        path_str(&fixture("caption_refs.jsonl")),
    ]);
    assert_fails_with(&out, &["cannot read /nonexistent/p.jsonl"]);
    let empty = write(dir.path(), "empty.jsonl", "\n\n");
    let out = mmkd(&[
        "metrics",
        "caption",
        "--pred",
        path_str(&empty),
        "--refs",
        path_str(&fixture("caption_refs.jsonl")),
    ]);
    assert_fails_with(&out, &["empty.jsonl", "no records"]);
}
