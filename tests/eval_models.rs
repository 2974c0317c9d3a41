//! `mmkd eval` with a real (random, tiny) checkpoint: predictions in LLaVA's model_vqa format,
//! results.json / results.md, scores consistent with `mmkd metrics` on the same predictions,
//! and `compare`.

mod common;

use std::path::Path;

use common::{fixture, mmkd};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn eval_args<'a>(task: &'a str, out: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let model = fixture("llava_siglip_qwen2");
    let images = fixture("images");
    let mut args: Vec<String> = vec![
        "eval".into(),
        task.into(),
        "--model".into(),
        s(&model).into(),
        "--images".into(),
        s(&images).into(),
        "--out".into(),
        s(out).into(),
        "--quiet".into(),
        "--max-new-tokens".into(),
        "4".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn run(args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = mmkd(&refs);
    assert!(ok, "mmkd {args:?}: {err}");
    out
}

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn vqa_writes_model_vqa_predictions_and_scores_them_like_mmkd_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vqa");
    let set = fixture("evalset");
    run(&eval_args(
        "vqa",
        &out,
        &[
            "--questions",
            s(&set.join("questions.jsonl")),
            "--answers",
            s(&set.join("answers.jsonl")),
        ],
    ));
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = preds
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, id) in lines.iter().zip(["1", "2", "q3"]) {
        for key in [
            "question_id",
            "prompt",
            "text",
            "answer_id",
            "model_id",
            "metadata",
        ] {
            assert!(line.get(key).is_some(), "prediction lacks {key}: {line}");
        }
        assert_eq!(line["question_id"], id);
        assert!(
            line["prompt"].as_str().unwrap().contains("USER: <image>\n"),
            "phi layout: {line}"
        );
    }
    let r = results(&out);
    assert_eq!(r["task"], "vqa");
    assert!(r["metrics"]["per_category"]["shape"]["count"] == 2);
    assert!(r["generation"]["prompts"] == 3);
    assert!(out.join("results.md").exists());
    // The same predictions scored by `mmkd metrics` give the same accuracy.
    let (ok, json, err) = mmkd(&[
        "metrics",
        "vqa",
        "--pred",
        s(&out.join("predictions.jsonl")),
        "--answers",
        s(&set.join("answers.jsonl")),
        "--json",
    ]);
    assert!(ok, "{err}");
    let m: serde_json::Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    assert!(
        (m["accuracy"].as_f64().unwrap() - r["headline"]["vqa_accuracy"].as_f64().unwrap()).abs()
            < 1e-9
    );
}

#[test]
fn caption_pope_and_choice_runs_write_results_and_compare_lays_them_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let set = fixture("evalset");
    let cap = tmp.path().join("cap");
    run(&eval_args(
        "caption",
        &cap,
        &["--questions", s(&set.join("captions.jsonl"))],
    ));
    let r = results(&cap);
    for k in ["bleu_1", "bleu_4", "rouge_l", "cider"] {
        let v = r["metrics"][k].as_f64().unwrap();
        assert!((0.0..=10.0).contains(&v), "{k} = {v}");
    }
    assert!(r["metrics"]["meteor"].is_null());
    let pope = tmp.path().join("pope");
    run(&eval_args(
        "pope",
        &pope,
        &["--questions", s(&set.join("pope_random.jsonl"))],
    ));
    let r = results(&pope);
    assert_eq!(r["metrics"]["overall"]["count"], 2);
    assert!(r["metrics"]["per_split"]["random"].is_object());
    let mc = tmp.path().join("mc");
    run(&eval_args(
        "mc",
        &mc,
        &["--questions", s(&set.join("choices.jsonl"))],
    ));
    let r = results(&mc);
    let lik = r["metrics"]["accuracy_likelihood"].as_f64().unwrap();
    assert!([0.0, 50.0, 100.0].contains(&lik), "{lik}");
    let preds = std::fs::read_to_string(mc.join("predictions.jsonl")).unwrap();
    assert!(preds.contains("option_logprobs"));

    let table = run(&[
        "eval".into(),
        "compare".into(),
        s(&cap).into(),
        s(&pope).into(),
    ]);
    assert!(
        table.contains("caption_cider") && table.contains("pope_f1"),
        "{table}"
    );
}

#[test]
fn missing_answers_and_bad_lines_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let set = fixture("evalset");
    let partial = tmp.path().join("answers.jsonl");
    std::fs::write(
        &partial,
        "{\"question_id\": 1, \"answers\": [\"circle\"]}\n",
    )
    .unwrap();
    let args = eval_args(
        "vqa",
        &tmp.path().join("o"),
        &[
            "--questions",
            s(&set.join("questions.jsonl")),
            "--answers",
            s(&partial),
        ],
    );
    let (ok, _, err) = mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && err.contains("2 question(s) have no answers"),
        "{err}"
    );
    let bad = tmp.path().join("q.jsonl");
    std::fs::write(
        &bad,
        "{\"question_id\": 1, \"image\": \"x.png\", \"text\": \"q\"}\n{oops\n",
    )
    .unwrap();
    let args = eval_args("vqa", &tmp.path().join("o2"), &["--questions", s(&bad)]);
    let (ok, _, err) = mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("q.jsonl:2"), "{err}");
}
