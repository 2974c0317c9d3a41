//! `mmkd data select` (issue 19, part 5): the world's teacher and student rank the training
//! instructions; the kept share is the highest-scoring one, written as a LLaVA file a stage
//! trains on, with every score and the records not scored in the sidecar; bad budgets, a
//! missing model and an existing output are refused.

mod common;

use common::mmkd;
use common::world::{world, World};
use serde_json::Value;

fn select(w: &World, out: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let mut args = vec![
        "data".to_string(),
        "select".into(),
        "--data".into(),
        s("data/train/instruct.json"),
        "--images".into(),
        s("data"),
        "--out".into(),
        out.to_str().unwrap().into(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    mmkd(&refs)
}

#[test]
fn the_kept_share_is_the_highest_scoring_and_trains() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let out = dir.path().join("selected.json");
    let (ok, stdout, err) = select(
        w,
        &out,
        &[
            "--teacher",
            &s("teacher"),
            "--student",
            &s("student"),
            "--budget",
            "25%",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    let scored = summary["scored"].as_u64().unwrap();
    let kept = summary["selected"].as_u64().unwrap();
    assert_eq!(kept, ((scored as f64) * 0.25).round() as u64);
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("selected.json.selection.json")).unwrap(),
    )
    .unwrap();
    let samples = record["samples"].as_array().unwrap();
    assert_eq!(samples.len() as u64, scored);
    let score = |s: &Value| s["score"].as_f64().unwrap();
    let lowest_kept = samples
        .iter()
        .filter(|s| s["selected"] == true)
        .map(score)
        .fold(f64::INFINITY, f64::min);
    let highest_dropped = samples
        .iter()
        .filter(|s| s["selected"] == false)
        .map(score)
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(
        lowest_kept >= highest_dropped,
        "{lowest_kept} < {highest_dropped}"
    );
    // KL ≥ 0, and the teacher and student disagree somewhere.
    assert!(samples.iter().all(|s| score(s) >= -1e-6) && highest_dropped < lowest_kept + 10.0);
    assert!(lowest_kept > 0.0);

    // The output holds the kept records unchanged, in file order.
    let data: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(s("data/train/instruct.json")).unwrap())
            .unwrap();
    let kept_records: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let want: Vec<&Value> = samples
        .iter()
        .filter(|s| s["selected"] == true)
        .map(|s| &data[s["index"].as_u64().unwrap() as usize])
        .collect();
    assert_eq!(kept_records.iter().collect::<Vec<_>>(), want);

    // A stage trains on it.
    let student_out = dir.path().join("sft");
    let (ok, _, err) = mmkd(&[
        "sft",
        "--config",
        "shapes-tiny",
        "--quiet",
        "--init",
        &s("student"),
        "--data",
        out.to_str().unwrap(),
        "--images",
        &s("data"),
        "--out",
        student_out.to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    assert!(ok, "{err}");

    // The other criteria read one model each; the student's loss ranks by cross-entropy (the
    // pre-trained student recorded the captions' `plain` template: the chat one is named).
    let by_loss = dir.path().join("by-loss.json");
    let (ok, stdout, err) = select(
        w,
        &by_loss,
        &[
            "--criterion",
            "student-loss",
            "--student",
            &s("student"),
            "--template",
            "compact",
            "--budget",
            "3",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["selected"], 3);
    assert!(summary["threshold"].as_f64().unwrap() > 0.0);
    let (ok, _, err) = select(
        w,
        &dir.path().join("conf.json"),
        &[
            "--criterion",
            "teacher-confidence",
            "--teacher",
            &s("teacher"),
            "--budget",
            "50%",
        ],
    );
    assert!(ok, "{err}");

    // The random baseline: the same number of samples, fixed by its seed.
    let random = |seed: &str, name: &str| {
        let path = dir.path().join(name);
        let (ok, stdout, err) = select(
            w,
            &path,
            &[
                "--criterion",
                "random",
                "--student",
                &s("student"),
                "--template",
                "compact",
                "--budget",
                "25%",
                "--seed",
                seed,
                "--json",
            ],
        );
        assert!(ok, "{err}");
        let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(summary["selected"].as_u64().unwrap(), kept);
        std::fs::read_to_string(path).unwrap()
    };
    assert_eq!(random("1", "r1.json"), random("1", "r1-again.json"));
    assert_ne!(random("1", "r1b.json"), random("2", "r2.json"));

    // Refusals.
    let refused = |extra: &[&str], needle: &str| {
        let (ok, _, err) = select(w, &dir.path().join("refused.json"), extra);
        assert!(!ok && err.contains(needle), "{extra:?}: {err}");
    };
    refused(
        &["--student", &s("student"), "--budget", "10%"],
        "reads the teacher: pass --teacher",
    );
    refused(
        &[
            "--criterion",
            "student-loss",
            "--teacher",
            &s("teacher"),
            "--student",
            &s("student"),
            "--budget",
            "1",
        ],
        "does not read the teacher",
    );
    refused(
        &[
            "--teacher",
            &s("teacher"),
            "--student",
            &s("student"),
            "--budget",
            "0",
        ],
        "at least one sample",
    );
    refused(
        &[
            "--teacher",
            &s("teacher"),
            "--student",
            &s("student"),
            "--budget",
            "120%",
        ],
        "(0, 100]",
    );
    refused(
        &[
            "--teacher",
            &s("teacher"),
            "--student",
            &s("student"),
            "--budget",
            "half",
        ],
        "not a count (N) or a share (P%)",
    );
    refused(
        &[
            "--teacher",
            &s("teacher-b"),
            "--student",
            &s("student"),
            "--budget",
            "1",
        ],
        "the teacher's tokenizer is not the student's",
    );
    let (ok, _, err) = select(
        w,
        &out,
        &[
            "--teacher",
            &s("teacher"),
            "--student",
            &s("student"),
            "--budget",
            "1",
        ],
    );
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
}
