//! The world the CLI stage tests share: synthetic data, a tokenizer, a tiny teacher
//! (PT → SFT), a pre-trained student and a teacher with another tokenizer, built once per
//! test binary; and helpers to run stages in it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::mmkd;
use mmkd::train::metrics::{read_metrics, StepMetrics};

/// Synthetic data, a tokenizer, a tiny teacher (PT → SFT) and a pre-trained student.
pub struct World {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let s = |p: &str| root.join(p).to_str().unwrap().to_string();
        ok(&[
            "data",
            "synth",
            "--out",
            &s("data"),
            "--train",
            "32",
            "--val",
            "4",
            "--test",
            "4",
            "--image-size",
            "32",
            "--seed",
            "5",
        ]);
        ok(&[
            "data",
            "tokenizer",
            "--data",
            &s("data/train"),
            "--vocab-size",
            "400",
            "--out",
            &s("data/tokenizer.json"),
        ]);
        let tok = s("data/tokenizer.json");
        stage_ok(
            &root,
            "pretrain",
            &[
                "--role",
                "teacher",
                "--tokenizer",
                &tok,
                "--out",
                &s("teacher-pt"),
            ],
        );
        stage_ok(
            &root,
            "sft",
            &[
                "--role",
                "teacher",
                "--init",
                &s("teacher-pt"),
                "--out",
                &s("teacher"),
            ],
        );
        stage_ok(
            &root,
            "pretrain",
            &["--tokenizer", &tok, "--out", &s("student")],
        );
        // A teacher with another tokenizer: the same data's tokenizer at another vocabulary
        // size (other merges).
        ok(&[
            "data",
            "tokenizer",
            "--data",
            &s("data/train"),
            "--vocab-size",
            "300",
            "--out",
            &s("data/tokenizer-b.json"),
        ]);
        stage_ok(
            &root,
            "pretrain",
            &[
                "--role",
                "teacher",
                "--tokenizer",
                &s("data/tokenizer-b.json"),
                "--out",
                &s("teacher-b-pt"),
            ],
        );
        stage_ok(
            &root,
            "sft",
            &[
                "--role",
                "teacher",
                "--init",
                &s("teacher-b-pt"),
                "--out",
                &s("teacher-b"),
            ],
        );
        World { _dir: dir, root }
    })
}

pub fn ok(args: &[&str]) {
    let (ok, _, err) = mmkd(args);
    assert!(ok, "mmkd {args:?} failed: {err}");
}

/// A stage with the tiny preset on the world's data: (success, stdout, stderr).
pub fn stage(root: &Path, stage: &str, extra: &[&str]) -> (bool, String, String) {
    let data = if stage == "pretrain" || stage == "dpt" {
        "data/train/pretrain.json"
    } else {
        "data/train/instruct.json"
    };
    let (data, images) = (root.join(data), root.join("data"));
    let mut args = vec![
        stage,
        "--config",
        "shapes-tiny",
        "--quiet",
        "--data",
        data.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    mmkd(&args)
}

pub fn stage_ok(root: &Path, name: &str, extra: &[&str]) {
    let (ok, _, err) = stage(root, name, extra);
    assert!(ok, "mmkd {name} {extra:?} failed: {err}");
}

pub fn metrics(dir: &Path) -> Vec<StepMetrics> {
    read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

/// `stage` (`dft`, `gkd`, ...) of the pre-trained student against `teacher` into `out` for
/// `steps` steps, with `sets` as `--set`s (the arguments).
pub fn stage_args(
    w: &World,
    stage: &str,
    teacher: &str,
    out: &str,
    steps: usize,
    sets: &[&str],
) -> Vec<String> {
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let mut args: Vec<String> = [
        stage,
        "--config",
        "shapes-tiny",
        "--quiet",
        "--data",
        &s("data/train/instruct.json"),
        "--images",
        &s("data"),
        "--init",
        &s("student"),
        "--teacher",
        &s(teacher),
        "--out",
        &s(out),
        "--max-steps",
        &steps.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for set in sets {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    args
}

/// A 12-step `dft` of the pre-trained student against `teacher` into `out` with `objective`,
/// checkpointing every 2 steps (the arguments, for a run that is killed and resumed).
pub fn checkpointed_dft(w: &World, teacher: &str, out: &str, objective: &str) -> Vec<String> {
    let sets = ["train.save_every=2", "train.keep_last=6", objective];
    stage_args(w, "dft", teacher, out, 12, &sets)
}

/// Runs `args` in `out`'s place twice — once through, once SIGKILLed after its first
/// checkpoint and resumed in `killed` — and asserts the two students are the same bit for bit.
pub fn resumes_bit_exactly(args: impl Fn(&str) -> Vec<String>, out: &str, killed: &str) {
    let w = world();
    let run = |a: &[String]| {
        let (ok, _, err) = mmkd(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
    };
    run(&args(out));
    let cut = args(killed);
    assert!(
        super::kill_after_first_checkpoint(&cut, &w.root.join(killed)),
        "the run finished before it could be killed; the test needs a longer run"
    );
    run(&[cut, vec!["--resume".into()]].concat());
    assert!(
        std::fs::read(w.root.join(out).join("model.safetensors")).unwrap()
            == std::fs::read(w.root.join(killed).join("model.safetensors")).unwrap(),
        "the resumed student differs"
    );
    let losses =
        |dir: &str| -> Vec<f32> { metrics(&w.root.join(dir)).iter().map(|m| m.loss).collect() };
    assert_eq!(losses(out), losses(killed));
}
