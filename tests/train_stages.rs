//! The four stages on tiny models and synthetic data: losses fall, distillation terms fall,
//! SIGKILL + --resume equals an uninterrupted run, bad setups fail early and clearly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::mmkd;
use mmkd::train::metrics::{read_metrics, StepMetrics};

/// Synthetic data + tokenizer + a trained tiny teacher, made once per test binary.
struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let s = |p: &str| root.join(p).to_str().unwrap().to_string();
        run(&[
            "data",
            "synth",
            "--out",
            &s("data"),
            "--train",
            "48",
            "--val",
            "8",
            "--test",
            "8",
            "--image-size",
            "32",
            "--seed",
            "3",
        ]);
        run(&[
            "data",
            "tokenizer",
            "--data",
            &s("data/train"),
            "--vocab-size",
            "400",
            "--out",
            &s("data/tokenizer.json"),
        ]);
        stage(
            &root,
            "pretrain",
            &[
                "--role",
                "teacher",
                "--tokenizer",
                &s("data/tokenizer.json"),
                "--out",
                &s("teacher/pt"),
            ],
        );
        stage(
            &root,
            "sft",
            &[
                "--role",
                "teacher",
                "--init",
                &s("teacher/pt"),
                "--out",
                &s("teacher/sft"),
                "--set",
                "epochs=3",
            ],
        );
        World { _dir: dir, root }
    })
}

fn run(args: &[&str]) -> String {
    let (ok, out, err) = mmkd(args);
    assert!(ok, "mmkd {args:?} failed: {err}");
    out
}

fn data_for(stage: &str) -> &'static str {
    if stage == "pretrain" || stage == "dpt" {
        "data/train/pretrain.json"
    } else {
        "data/train/instruct.json"
    }
}

/// Runs a stage on the shared data with the tiny preset: (success, stdout, stderr).
fn try_stage(root: &Path, stage: &str, extra: &[&str]) -> (bool, String, String) {
    let data = root.join(data_for(stage));
    let images = root.join("data");
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

/// [`try_stage`] that must succeed; its stdout.
fn stage(root: &Path, stage: &str, extra: &[&str]) -> String {
    let (ok, out, err) = try_stage(root, stage, extra);
    assert!(ok, "mmkd {stage} {extra:?} failed: {err}");
    out
}

fn metrics(dir: &Path) -> Vec<StepMetrics> {
    read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

/// Mean of a term over the first and the last `k` steps that have it.
fn first_last(
    ms: &[StepMetrics],
    k: usize,
    term: impl Fn(&StepMetrics) -> Option<f32>,
) -> (f32, f32) {
    let vals: Vec<f32> = ms.iter().filter_map(&term).collect();
    assert!(vals.len() >= 2 * k, "too few values: {}", vals.len());
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    (mean(&vals[..k]), mean(&vals[vals.len() - k..]))
}

#[test]
fn teacher_stages_lower_their_loss_and_write_standard_outputs() {
    let w = world();
    for stage_dir in ["teacher/pt", "teacher/sft"] {
        let dir = w.root.join(stage_dir);
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
            "metrics.jsonl",
            "loss.png",
            "summary.json",
        ] {
            assert!(dir.join(file).exists(), "{stage_dir}: {file} missing");
        }
        let ms = metrics(&dir);
        let (first, last) = first_last(&ms, 3, |m| Some(m.loss));
        assert!(
            last < first,
            "{stage_dir}: loss did not fall ({first} → {last})"
        );
        for m in &ms {
            assert!(
                m.term("ce").is_some()
                    && m.term("l_res").is_none()
                    && m.grad_norm.is_finite()
                    && m.samples_per_s > 0.0
            );
        }
    }
    // The trained teacher loads like any checkpoint.
    let (ok, out, err) = mmkd(&[
        "inspect",
        w.root.join("teacher/sft").to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"image_tokens_per_image\":16"));
}

#[test]
fn student_distillation_chain_lowers_ce_and_distillation_terms() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let teacher = s("teacher/sft");
    let tok = s("data/tokenizer.json");
    stage(
        &w.root,
        "dpt",
        &[
            "--teacher",
            &teacher,
            "--tokenizer",
            &tok,
            "--out",
            &s("student/dpt"),
            "--set",
            "epochs=3",
            // The paper's DPT (projector only), not the synthetic presets' projector + LLM.
            "--set",
            "trainable=[\"projector\"]",
        ],
    );
    stage(
        &w.root,
        "sft",
        &[
            "--init",
            &s("student/dpt"),
            "--out",
            &s("student/sft"),
            "--set",
            "epochs=2",
        ],
    );
    stage(
        &w.root,
        "dft",
        &[
            "--init",
            &s("student/sft"),
            "--teacher",
            &teacher,
            "--out",
            &s("student/dft"),
            "--set",
            "epochs=3",
        ],
    );

    let dpt = metrics(&w.root.join("student/dpt"));
    let (v0, v1) = first_last(&dpt, 3, |m| m.term("l_vis"));
    assert!(v1 < v0, "DPT L_vis did not fall: {v0} → {v1}");
    let (r0, r1) = first_last(&dpt, 3, |m| m.term("l_res"));
    assert!(r1 < r0, "DPT L_res did not fall: {r0} → {r1}");
    let dft = metrics(&w.root.join("student/dft"));
    let (r0, r1) = first_last(&dft, 3, |m| m.term("l_res"));
    assert!(r1 < r0, "DFT L_res did not fall: {r0} → {r1}");
    let (c0, c1) = first_last(&dft, 3, |m| m.term("ce"));
    assert!(c1 < c0, "DFT CE did not fall: {c0} → {c1}");
    assert!(
        dft.iter()
            .any(|m| m.term("l_rel").is_some() && m.term("l_vis").is_some()),
        "DFT never logged L_vis/L_rel"
    );
    // Every logged line names every term.
    let line = std::fs::read_to_string(w.root.join("student/dft/metrics.jsonl")).unwrap();
    for key in [
        "\"ce\"",
        "\"l_res\"",
        "\"l_vis\"",
        "\"l_rel\"",
        "\"loss\"",
        "\"grad_norm\"",
        "\"lr\"",
        "\"samples_per_s\"",
    ] {
        assert!(
            line.lines().next().unwrap().contains(key),
            "metrics line lacks {key}"
        );
    }
}

fn tensors(dir: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn sigkill_then_resume_equals_an_uninterrupted_run() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let common_args = |out: &str| {
        vec![
            "sft".to_string(),
            "--config".into(),
            "shapes-tiny".into(),
            "--quiet".into(),
            "--init".into(),
            s("teacher/pt"),
            "--role".into(),
            "teacher".into(),
            "--data".into(),
            s(data_for("sft")),
            "--images".into(),
            s("data"),
            "--out".into(),
            out.to_string(),
            "--max-steps".into(),
            "30".into(),
            "--save-every".into(),
            "3".into(),
        ]
    };
    let full = s("resume/full");
    let args = common_args(&full);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = s("resume/killed");
    let killed_dir = PathBuf::from(&killed);
    let interrupted = common::kill_after_first_checkpoint(&common_args(&killed), &killed_dir);
    assert!(
        interrupted,
        "the run finished before it could be killed; the test needs a longer run"
    );
    // Without --resume, the leftover checkpoints are refused.
    let (ok, _, err) = mmkd(
        &common_args(&killed)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("--resume"), "{err}");
    let mut resume = common_args(&killed);
    resume.push("--resume".into());
    run(&resume.iter().map(String::as_str).collect::<Vec<_>>());

    assert_eq!(
        tensors(&killed_dir),
        tensors(Path::new(&full)),
        "resumed weights differ from the uninterrupted run"
    );
    let (a, b) = (metrics(&killed_dir), metrics(Path::new(&full)));
    assert_eq!(a.len(), 30);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.step, x.loss, x.lr), (y.step, y.loss, y.lr));
    }
    // Only the last `keep_last` (2) checkpoints remain.
    assert!(killed_dir.join("checkpoints").read_dir().unwrap().count() <= 2);
}

#[test]
fn distillation_refuses_an_incompatible_teacher() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let (teacher, tok) = (s("teacher/sft"), s("data/tokenizer.json"));
    // A student DPT against the teacher with one more `--set`; its (success, stderr).
    let dpt = |out: &str, set: &str| {
        let out = s(out);
        let args = [
            "--teacher",
            &teacher,
            "--tokenizer",
            &tok,
            "--out",
            &out,
            "--set",
            set,
        ];
        let (ok, _, err) = try_stage(&w.root, "dpt", &args);
        (ok, err)
    };
    // A student with a different tokens-per-image (patch 16 → 4 tokens).
    let (ok, err) = dpt("bad/dpt", "models.student.vision_config.patch_size=16");
    assert!(!ok && err.contains("visual tokens per image"), "{err}");
    let (ok, err) = dpt("bad/dpt2", "models.student.text_config.vocab_size=512");
    assert!(
        !ok && err.contains("vocabulary") && err.contains("truncate_vocab"),
        "{err}"
    );
    let (ok, _, err) = try_stage(
        &w.root,
        "dft",
        &["--out", &s("bad/dft"), "--init", &s("teacher/sft")],
    );
    assert!(!ok && err.contains("--teacher"), "{err}");
    let (ok, _, err) = try_stage(&w.root, "sft", &["--out", &s("bad/sft")]);
    assert!(!ok && err.contains("--init"), "{err}");
    let (ok, _, err) = try_stage(
        &w.root,
        "sft",
        &[
            "--out",
            &s("bad/sft2"),
            "--init",
            &s("teacher/pt"),
            "--set",
            "train.bacth_size=2",
        ],
    );
    assert!(!ok && err.contains("bacth_size"), "{err}");
}

#[test]
fn a_diverging_run_stops_clearly_and_keeps_its_last_good_checkpoint() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let out = s("nan/sft");
    let (ok, _, err) = try_stage(
        &w.root,
        "sft",
        &[
            "--init",
            &s("teacher/pt"),
            "--role",
            "teacher",
            "--out",
            &out,
            "--save-every",
            "1",
            "--max-steps",
            "40",
            "--set",
            "lr=1e12",
            "--set",
            "train.max_grad_norm=0",
            "--set",
            "train.schedule.warmup={ steps = 0 }",
        ],
    );
    assert!(!ok, "a run at lr 1e12 should diverge");
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    assert!(!Path::new(&out).join("summary.json").exists());
    let ckpt = mmkd::train::state::latest_checkpoint(Path::new(&out))
        .unwrap()
        .expect("a checkpoint survives");
    let (ok, _, e) = mmkd(&["inspect", ckpt.to_str().unwrap()]);
    assert!(ok, "the kept checkpoint loads: {e}");
}

#[test]
fn trainable_modules_follow_the_setting_and_students_can_take_the_teachers_tower() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let teacher_tower = format!("models.student.vision=\"{}\"", s("teacher/sft"));
    // Student pre-training on the teacher's tower into `out`, with extra `--set`s.
    let pretrain_on_teachers_tower = |out: &str, sets: &[&str]| -> PathBuf {
        let (tokenizer, out_dir) = (s("data/tokenizer.json"), s(out));
        let mut args = vec!["--tokenizer", &tokenizer, "--out", &out_dir];
        for set in sets.iter().chain([&teacher_tower.as_str()]) {
            args.extend(["--set", set]);
        }
        stage(&w.root, "pretrain", &args);
        w.root.join(out)
    };
    let out =
        pretrain_on_teachers_tower("shared-tower/pt", &["trainable=[\"projector\", \"llm\"]"]);
    let student = tensors(&out);
    let teacher = tensors(&w.root.join("teacher/sft"));
    let tower: Vec<&String> = student
        .keys()
        .filter(|k| k.contains("vision_tower"))
        .collect();
    assert!(!tower.is_empty());
    for name in tower {
        assert_eq!(student[name], teacher[name], "{name} is not the teacher's");
    }
    // Projector and LLM trained: the summary counts both, the tower is not among them.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let count = |pred: &dyn Fn(&str) -> bool| -> usize {
        student
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, v)| v.len())
            .sum()
    };
    let expected = count(&|k| k.contains("multi_modal_projector") || k.contains("language_model"));
    assert_eq!(summary["parameters_trained"], expected);
    assert_eq!(
        summary["settings"]["train"]["trainable"],
        serde_json::json!(["projector", "llm"])
    );

    // A trainable tower at learning-rate scale 0 is in the optimizer but does not move,
    // while the modules above it train.
    let scaled_out = pretrain_on_teachers_tower(
        "shared-tower/frozen-by-scale",
        &[
            "trainable=[\"vision\", \"projector\", \"llm\"]",
            "vision_lr_scale=0.0",
        ],
    );
    let scaled = tensors(&scaled_out);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(scaled_out.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        summary["parameters_trained"],
        scaled.values().map(Vec::len).sum::<usize>()
    );
    for (name, values) in &scaled {
        if name.contains("vision_tower") {
            assert_eq!(values, &teacher[name], "{name} moved at vision_lr_scale 0");
        }
    }

    // A student pre-training run that must be refused; returns its stderr.
    let refused_pretrain = |out: &str, sets: &[&str]| -> String {
        let (tok, out) = (s("data/tokenizer.json"), s(out));
        let mut args = vec!["--tokenizer", &tok, "--out", &out];
        for set in sets {
            args.extend(["--set", set]);
        }
        let (ok, _, err) = try_stage(&w.root, "pretrain", &args);
        assert!(!ok, "pretrain with {sets:?} should fail");
        err
    };
    // A tower that does not match the preset's vision_config is refused, naming the key.
    let err = refused_pretrain(
        "shared-tower/bad",
        &[
            &teacher_tower,
            "models.student.vision_config.hidden_size=48",
        ],
    );
    assert!(
        err.contains("`hidden_size` = 32") && err.contains("says 48"),
        "{err}"
    );
    // An empty module list is an error, not a stage that trains nothing.
    let err = refused_pretrain("shared-tower/none", &["trainable=[]"]);
    assert!(err.contains("train.trainable is empty"), "{err}");
}
