//! Data-parallel training over MPI (`--features mpi`; `.ci/run` installs Open MPI): two ranks
//! of `mpirun` make the steps of one process with their micro-batches, resume and cache as one
//! process does, and a job with a dead, stuck or differently configured rank stops with a
//! message naming it.
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::world::{metrics, stage_args, world};

/// `mpirun -np N mmkd ARGS` (one thread per rank, as on a 2-core machine): (success, stdout,
/// stderr).
fn mpirun(ranks: usize, args: &[String], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string());
    for (k, v) in env
        .iter()
        .chain(&[("RAYON_NUM_THREADS", "1"), ("HF_HUB_OFFLINE", "1")])
    {
        cmd.env(k, v).args(["-x", k]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_mmkd")).args(args);
    let out = cmd.output().expect("running mpirun (install Open MPI)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_process(args: &[String]) -> (bool, String, String) {
    common::mmkd_with_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("RAYON_NUM_THREADS", "1")],
    )
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// The largest difference between two runs' weights.
fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| common::max_abs_diff(t, &b[name]))
        .fold(0.0, f64::max)
}

fn losses(dir: &Path) -> Vec<f32> {
    metrics(dir).iter().map(|m| m.loss).collect()
}

/// A 5-step DFT against the tiny teacher, batch 2 per micro-batch.
fn dft(out: &str, grad_accum: usize, extra: &[&str]) -> Vec<String> {
    let accum = format!("train.grad_accum={grad_accum}");
    let mut sets = vec!["train.batch_size=2", accum.as_str(), "train.lr=3e-3"];
    sets.extend_from_slice(extra);
    stage_args(world(), "dft", "teacher", out, 5, &sets)
}

#[test]
fn two_ranks_make_the_steps_of_one_process_with_their_micro_batches() {
    let w = world();
    let (ok, _, err) = one_process(&dft("dp-one", 2, &[]));
    assert!(ok, "{err}");
    let (ok, stdout, err) = mpirun(2, &dft("dp-two", 1, &[]), &[]);
    assert!(ok, "{err}");
    assert_eq!(stdout.lines().count(), 1, "rank 0 alone reports: {stdout}");
    let (one, two) = (w.root.join("dp-one"), w.root.join("dp-two"));
    let diff = max_weight_diff(&one, &two);
    assert!(diff <= 1e-6, "weights differ by {diff}");
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 5);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-6, "losses {l1:?} vs {l2:?}");
    }
    let (s1, s2) = (metrics(&one), metrics(&two));
    // The job's samples are counted (both ranks'), as one process counts its micro-batches'.
    assert_eq!(s1.last().unwrap().samples, s2.last().unwrap().samples);
    assert!(s2.last().unwrap().samples > 5 * 2);
}

#[test]
fn a_two_rank_run_killed_and_resumed_equals_an_uninterrupted_one() {
    let w = world();
    let every = ["train.save_every=1"];
    let (ok, _, err) = mpirun(2, &dft("dp-through", 1, &every), &[]);
    assert!(ok, "{err}");
    // Both ranks are asked to stop after step 2 (as `kill` on the job would); rank 0 writes
    // the checkpoint.
    let cut = dft("dp-cut", 1, &every);
    let (ok, _, err) = mpirun(2, &cut, &[("MMKD_FAULT_SIGNAL_AT_STEP", "2")]);
    assert!(
        !ok && err.contains("interrupted by SIGTERM after step 2"),
        "{err}"
    );
    let resume = [cut.clone(), vec!["--resume".into()]].concat();
    let (ok, _, err) = mpirun(2, &resume, &[]);
    assert!(ok, "{err}");
    let (through, cut_dir) = (w.root.join("dp-through"), w.root.join("dp-cut"));
    assert_eq!(
        std::fs::read(through.join("model.safetensors")).unwrap(),
        std::fs::read(cut_dir.join("model.safetensors")).unwrap(),
        "the resumed job's student differs"
    );
    assert_eq!(losses(&through), losses(&cut_dir));

    // The checkpoint resumes in one process only with the same global batch.
    let cut = dft("dp-cut-one", 1, &every);
    let (ok, _, err) = mpirun(2, &cut, &[("MMKD_FAULT_SIGNAL_AT_STEP", "2")]);
    assert!(!ok, "{err}");
    let (ok, _, err) = one_process(&[cut.clone(), vec!["--resume".into()]].concat());
    assert!(!ok);
    assert!(
        err.contains("was written by 2 rank(s) × grad_accum 1 × batch_size 2 (global batch 4)")
            && err.contains("this run is 1 rank(s) × grad_accum 1 × batch_size 2 (global batch 2)"),
        "{err}"
    );
    let mut as_one = dft("dp-cut-one", 2, &every);
    as_one.push("--resume".into());
    let (ok, _, err) = one_process(&as_one);
    assert!(ok, "{err}");
    let diff = max_weight_diff(&through, &w.root.join("dp-cut-one"));
    assert!(
        diff <= 1e-6,
        "resumed in one process, the weights differ by {diff}"
    );
}

#[test]
fn ranks_with_other_settings_are_refused_at_start_up() {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    for (rank, lr) in [(0, "3e-3"), (1, "1e-3")] {
        if rank > 0 {
            cmd.arg(":");
        }
        let args = dft("dp-mismatch", 1, &[]);
        let lr_set = format!("train.lr={lr}");
        cmd.args([
            "-np",
            "1",
            "-x",
            "RAYON_NUM_THREADS=1",
            env!("CARGO_BIN_EXE_mmkd"),
        ])
        .args(
            args.iter()
                .map(|a| if a == "train.lr=3e-3" { &lr_set } else { a }),
        );
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rank(s) 1 of 2 were started with other settings, data or models than rank 0"),
        "{err}"
    );
    assert!(!world().root.join("dp-mismatch/metrics.jsonl").exists());
}

#[test]
fn a_dead_or_stuck_rank_stops_the_job_with_a_message_naming_it() {
    let (ok, out, err) = mpirun(
        2,
        &dft("dp-dead", 1, &[]),
        &[("MMKD_FAULT_RANK", "1:2:exit")],
    );
    let all = format!("{out}{err}");
    assert!(!ok);
    assert!(
        all.contains("rank 1") && all.contains("signal 9"),
        "mpirun names the dead rank: {all}"
    );

    let (ok, out, err) = mpirun(
        2,
        &dft("dp-stuck", 1, &[]),
        &[
            ("MMKD_FAULT_RANK", "1:2:stall"),
            ("MMKD_COLLECTIVE_TIMEOUT_S", "3"),
        ],
    );
    let all = format!("{out}{err}");
    assert!(!ok);
    assert!(
        all.contains("rank 0 of 2: the all-reduce of")
            && all.contains("one of them died or is stuck"),
        "{all}"
    );
}

#[test]
fn commands_that_run_in_one_process_are_refused_under_mpirun() {
    let w = world();
    let student = w.root.join("student");
    let (ok, _, err) = mpirun(
        2,
        &["inspect".into(), student.to_str().unwrap().into()],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("this command runs in one process, not as 2 MPI ranks"),
        "{err}"
    );
}

/// `teacher-cache` of the tiny teacher over the instructions, 8 samples a shard.
fn cache_args(out: &str) -> Vec<String> {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    [
        "teacher-cache",
        "--config",
        "shapes-tiny",
        "--quiet",
        "--teacher",
        &s("teacher"),
        "--data",
        &s("data/train/instruct.json"),
        "--images",
        &s("data"),
        "--out",
        &s(out),
        "--shard-size",
        "8",
        "--batch-size",
        "4",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_two_rank_teacher_cache_is_the_one_process_cache_file_for_file() {
    let w = world();
    let (ok, _, err) = one_process(&cache_args("cache-one"));
    assert!(ok, "{err}");
    let (ok, stdout, err) = mpirun(2, &cache_args("cache-two"), &[]);
    assert!(ok, "{err}");
    assert_eq!(stdout.lines().count(), 1, "rank 0 alone reports: {stdout}");
    let files = |dir: &str| {
        let mut names: Vec<_> = std::fs::read_dir(w.root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let names = files("cache-one");
    assert!(names.len() >= 4, "several shards: {names:?}");
    assert_eq!(names, files("cache-two"));
    for name in names {
        assert!(
            std::fs::read(w.root.join("cache-one").join(&name)).unwrap()
                == std::fs::read(w.root.join("cache-two").join(&name)).unwrap(),
            "{name:?} differs"
        );
    }
    // A DFT reads it as it reads the one-process cache.
    let mut dft = stage_args(w, "dft", "teacher", "dp-cached", 2, &[]);
    let at = dft.iter().position(|a| a == "--teacher").unwrap();
    dft[at] = "--teacher-cache".into();
    dft[at + 1] = w.root.join("cache-two").to_str().unwrap().into();
    let (ok, _, err) = mpirun(2, &dft, &[]);
    assert!(ok, "{err}");
}

#[test]
fn the_bench_step_split_over_two_ranks_is_the_one_process_step() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{
          "vocab": 50, "batch": 4, "prefix_tokens": 2, "prompt_tokens": 3, "response_tokens": 4,
          "vision": {"image_size": 16, "patch": 8, "hidden": 16, "intermediate": 32, "layers": 2, "heads": 2},
          "student": {"hidden": 16, "intermediate": 32, "layers": 2, "heads": 4, "kv_heads": 2},
          "teacher": {"hidden": 24, "intermediate": 40, "layers": 2, "heads": 4, "kv_heads": 2}
        }"#,
    )
    .unwrap();
    let args: Vec<String> = [
        "bench",
        "--spec",
        spec.to_str().unwrap(),
        "--steps",
        "3",
        "--no-matmul-peak",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let report = |stdout: &str| -> serde_json::Value {
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let (ok, one, err) = one_process(&args);
    assert!(ok, "{err}");
    let (ok, two, err) = mpirun(2, &args, &[]);
    assert!(ok, "{err}");
    let (one, two) = (report(&one), report(&two));
    assert_eq!(
        (one["ranks"].as_u64(), two["ranks"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(two["batch"], 4, "the job's batch");
    let trainable = two["trainable_parameters"].as_u64().unwrap();
    assert!(two["allreduced_bytes_per_step"].as_u64().unwrap() >= 4 * trainable);
    // Four updates (warm-up included) on the two halves of the batch land where the whole
    // batch's do.
    let loss = |r: &serde_json::Value| r["loss_last"].as_f64().unwrap();
    assert!((loss(&one) - loss(&two)).abs() <= 1e-5, "{one} vs {two}");
}
