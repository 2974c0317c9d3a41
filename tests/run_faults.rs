//! Faults during a run: an interrupted run loses nothing (SIGTERM or Ctrl-C stops a stage after
//! the step in progress with a checkpoint, the message says how to resume, and the resumed run
//! ends with the same weights, bit for bit, as one never interrupted); a spike guard stops a
//! step before its update, naming it; guards that do not fire change no number.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{mmkd, mmkd_with_env};

/// Synthetic data and a tokenizer in `dir`.
fn data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, _, err) = mmkd(&[
        "data",
        "synth",
        "--out",
        &s(&data),
        "--train",
        "16",
        "--val",
        "2",
        "--test",
        "2",
        "--image-size",
        "32",
        "--seed",
        "3",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = mmkd(&[
        "data",
        "tokenizer",
        "--data",
        &s(&data.join("train")),
        "--vocab-size",
        "300",
        "--out",
        &s(&data.join("tokenizer.json")),
    ]);
    assert!(ok, "{err}");
    data
}

fn pretrain_args(data: &Path, out: &Path, steps: usize) -> Vec<String> {
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    vec![
        "pretrain".into(),
        "--config".into(),
        "shapes-tiny".into(),
        "--data".into(),
        s(data.join("train/pretrain.json")),
        "--images".into(),
        s(data.to_path_buf()),
        "--tokenizer".into(),
        s(data.join("tokenizer.json")),
        "--out".into(),
        s(out.to_path_buf()),
        "--max-steps".into(),
        steps.to_string(),
        "--quiet".into(),
    ]
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn a_stage_stopped_by_sigterm_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let whole = dir.path().join("whole");
    let (ok, _, err) = mmkd(&refs(&pretrain_args(&data, &whole, 6)));
    assert!(ok, "{err}");

    let cut = dir.path().join("cut");
    let args = pretrain_args(&data, &cut, 6);
    let (ok, _, err) = mmkd_with_env(&refs(&args), &[("MMKD_FAULT_SIGNAL_AT_STEP", "3")]);
    assert!(!ok, "the run was not stopped");
    assert!(
        err.contains("interrupted by SIGTERM after step 3 of 6")
            && err.contains("--resume")
            && err.contains("step-00000003"),
        "{err}"
    );
    assert!(!cut.join("summary.json").exists());
    assert!(
        !cut.join(".mmkd-lock").exists(),
        "the lock outlived the run"
    );

    let mut resume = args.clone();
    resume.push("--resume".into());
    let (ok, _, err) = mmkd(&refs(&resume));
    assert!(ok, "{err}");
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        bytes(&cut) == bytes(&whole),
        "the resumed run ended elsewhere"
    );
    let metrics = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6, "{metrics}");
}

#[test]
fn ctrl_c_stops_a_long_stage_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("long");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .args(pretrain_args(&data, &out, 1_000_000))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it has taken a step, Ctrl-C.
    let started = Instant::now();
    let metrics = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no step in 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("interrupted by SIGINT (Ctrl-C)") && err.contains("--resume"),
        "{err}"
    );
    let checkpoints: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
}

#[test]
fn the_tower_stage_stopped_by_sigterm_resumes_to_the_same_tower() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let args = |out: &str| -> Vec<String> {
        [
            "tower",
            "--objective",
            "labels",
            "--config",
            "shapes-tiny",
            "--set",
            "batch_size=4",
            "--data",
            &s(data.join("train/scenes.jsonl")),
            "--images",
            &s(data.clone()),
            "--max-steps",
            "5",
            "--quiet",
            "--out",
            &s(dir.path().join(out)),
        ]
        .map(String::from)
        .to_vec()
    };
    let (ok, _, err) = mmkd(&refs(&args("whole")));
    assert!(ok, "{err}");
    let (ok, _, err) = mmkd_with_env(&refs(&args("cut")), &[("MMKD_FAULT_SIGNAL_AT_STEP", "2")]);
    assert!(!ok);
    assert!(
        err.contains("`tower` interrupted by SIGTERM after step 2 of 5"),
        "{err}"
    );
    let mut resume = args("cut");
    resume.push("--resume".into());
    let (ok, _, err) = mmkd(&refs(&resume));
    assert!(ok, "{err}");
    let bytes = |d: &str| std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
    assert!(bytes("cut") == bytes("whole"));
}

#[test]
fn a_spike_guard_stops_the_step_before_its_update_and_changes_nothing_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let plain = dir.path().join("plain");
    let (ok, _, err) = mmkd(&refs(&pretrain_args(&data, &plain, 14)));
    assert!(ok, "{err}");
    // Guards that never fire: the same weights.
    let guarded = dir.path().join("guarded");
    let mut args = pretrain_args(&data, &guarded, 14);
    args.extend(
        [
            "--set",
            "max_loss_spike=1000",
            "--set",
            "max_grad_norm_spike=1000",
        ]
        .map(String::from),
    );
    let (ok, _, err) = mmkd(&refs(&args));
    assert!(ok, "{err}");
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&plain) == bytes(&guarded));
    // A guard tight enough to fire as soon as its warm-up of 10 steps is over.
    let tight = dir.path().join("tight");
    let mut args = pretrain_args(&data, &tight, 14);
    args.extend(["--set", "max_grad_norm_spike=0.01"].map(String::from));
    let (ok, _, err) = mmkd(&refs(&args));
    assert!(!ok);
    assert!(
        err.contains("the gradient norm jumped to")
            && err.contains("at step 11 (samples ")
            && err.contains("stopped before its update")
            && err.contains("max_grad_norm_spike"),
        "{err}"
    );
    let metrics = std::fs::read_to_string(tight.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 10, "{metrics}");
}

#[test]
fn a_run_that_does_not_fit_the_memory_is_refused_before_its_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("big");
    let (ok, _, err) = mmkd_with_env(
        &refs(&pretrain_args(&data, &out, 2)),
        &[("MMKD_MEMORY_LIMIT_BYTES", "1000000")],
    );
    assert!(!ok);
    assert!(
        err.contains("this run needs about")
            && err.contains("1.0 MiB are available")
            && err.contains("batch_size"),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "it started anyway");
}
