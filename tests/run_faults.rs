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
    common::synth_data(&data, (16, 2, 2), 300);
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

/// Runs `mmkd` with its writes limited the way a storage fault limits them: `file_size` bytes
/// per file (`RLIMIT_FSIZE`: the kernel fails a write beyond it with EFBIG, as a full disk fails
/// it with ENOSPC, for every writer in the process, third-party ones included), or, with
/// `unprivileged`, as the user `nobody` when the tests run as root (root writes through any
/// permission bits, so a read-only directory needs another user).
fn mmkd_constrained(
    args: &[&str],
    file_size: Option<u64>,
    unprivileged: bool,
) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mmkd"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(limit) = file_size {
                // A write beyond the limit then returns EFBIG instead of killing the process.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let rlim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if unprivileged
                && libc::geteuid() == 0
                && (libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("running mmkd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const NOBODY: libc::uid_t = 65534;

/// Every file under `dir` with its bytes, temporary files included.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// A pretrain of 8 steps checkpointing every 2, stopped after its first checkpoint.
fn stopped_after_step_2(data: &Path, out: &Path) -> Vec<String> {
    let mut args = pretrain_args(data, out, 8);
    args.extend(["--save-every".into(), "2".into()]);
    let (ok, _, err) = mmkd_with_env(&refs(&args), &[("MMKD_FAULT_SIGNAL_AT_STEP", "2")]);
    assert!(!ok && err.contains("after step 2 of 8"), "{err}");
    args.push("--resume".into());
    args
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_last_one_and_the_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let whole = dir.path().join("whole");
    let mut args = pretrain_args(&data, &whole, 8);
    args.extend(["--save-every".into(), "2".into()]);
    let (ok, _, err) = mmkd(&refs(&args));
    assert!(ok, "{err}");

    let out = dir.path().join("full");
    let resume = stopped_after_step_2(&data, &out);
    let checkpoints = out.join("checkpoints");
    let before = snapshot(&checkpoints);
    // The weights (150 kB) no longer fit; the small files (metrics, lock) still do.
    let (ok, _, err) = mmkd_constrained(&refs(&resume), Some(64 * 1024), false);
    assert!(!ok, "the run went on with a full disk");
    assert!(
        err.contains("the disk is full")
            && err.contains("Nothing finished was lost: the last good checkpoint is")
            && err.contains("step-00000002")
            && err.contains("free some space and continue with the same command and --resume")
            && err.contains("step-00000004")
            && err.contains("File too large"),
        "{err}"
    );
    // The last good checkpoint is untouched and no half-written attempt is left behind.
    assert_eq!(snapshot(&checkpoints), before);
    assert!(!out.join("summary.json").exists());
    assert!(!out.join(".mmkd-lock").exists());

    // What a run killed while writing a checkpoint leaves: removed by the next checkpoint.
    let abandoned = checkpoints.join(".step-00000004.tmp-4000000");
    std::fs::create_dir(&abandoned).unwrap();
    std::fs::write(abandoned.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    let (ok, _, err) = mmkd(&refs(&resume));
    assert!(ok, "{err}");
    assert!(!abandoned.exists(), "an abandoned checkpoint was left");
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        bytes(&out) == bytes(&whole),
        "the resumed run ended elsewhere"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 8, "{metrics}");
}

#[test]
fn a_full_disk_while_writing_the_final_model_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("full");
    let mut resume = stopped_after_step_2(&data, &out);
    // No checkpoint between step 2 and the end: the final model is the next big write.
    resume.extend(["--set".into(), "save_every=0".into()]);
    let before = snapshot(&out.join("checkpoints"));
    let (ok, _, err) = mmkd_constrained(&refs(&resume), Some(64 * 1024), false);
    assert!(!ok);
    assert!(
        err.contains("the disk is full") && err.contains("step-00000002"),
        "{err}"
    );
    assert_eq!(snapshot(&out.join("checkpoints")), before);
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp") || n == "model.safetensors")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_read_only_output_directory_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let out = dir.path().join("ro");
    let resume = stopped_after_step_2(&data, &out);
    let before = snapshot(&out);
    // The data readable by another user, OUT writable by nobody.
    let chmod = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(dir.path(), 0o755);
    for f in snapshot(&out) {
        chmod(&f.0, 0o444);
    }
    for d in [
        out.join("checkpoints/step-00000002"),
        out.join("checkpoints"),
        out.clone(),
    ] {
        chmod(&d, 0o555);
    }
    let (ok, _, err) = mmkd_constrained(&refs(&resume), None, true);
    for d in [
        out.clone(),
        out.join("checkpoints"),
        out.join("checkpoints/step-00000002"),
    ] {
        chmod(&d, 0o755);
    }
    assert!(!ok, "a read-only OUT was written");
    assert!(
        err.contains("cannot be written (a read-only filesystem, or no permission)")
            && err.contains("the last good checkpoint is")
            && err.contains("make it writable and continue with the same command and --resume")
            && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(snapshot(&out), before);
}

#[test]
fn a_full_disk_while_writing_a_teacher_cache_keeps_its_finished_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let teacher = dir.path().join("teacher");
    let (ok, _, err) = mmkd(&refs(&pretrain_args(&data, &teacher, 2)));
    assert!(ok, "{err}");
    let args = |out: &str| -> Vec<String> {
        [
            "teacher-cache",
            "--teacher",
            &s(teacher.clone()),
            "--config",
            "shapes-tiny",
            "--stage",
            "dpt",
            "--data",
            &s(data.join("train/pretrain.json")),
            "--images",
            &s(data.clone()),
            "--shard-size",
            "4",
            "--quiet",
            "--out",
            &s(dir.path().join(out)),
        ]
        .map(String::from)
        .to_vec()
    };
    let (ok, _, err) = mmkd(&refs(&args("whole")));
    assert!(ok, "{err}");
    let whole = snapshot(&dir.path().join("whole"));
    let shards: Vec<u64> = whole
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|(_, b)| b.len() as u64)
        .collect();
    // A per-file limit that the first shards fit and a later, larger one does not.
    let first_larger = (1..shards.len())
        .find(|&j| shards[j] > *shards[..j].iter().max().unwrap())
        .expect("some shard larger than all before it");
    let limit = *shards[..first_larger].iter().max().unwrap();
    let (ok, _, err) = mmkd_constrained(&refs(&args("full")), Some(limit), false);
    assert!(!ok);
    assert!(
        err.contains("the disk is full")
            && err.contains(&format!(
                "{first_larger} finished shard(s) with {} samples are kept",
                4 * first_larger
            ))
            && err.contains("run the same command again to resume after them"),
        "{err}"
    );
    assert!(
        !dir.path().join("full").exists(),
        "an unfinished cache in place"
    );

    let mut again = args("full");
    again.push("--json".into());
    let (ok, stdout, err) = mmkd(&refs(&again));
    assert!(ok, "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(
        summary["resumed_samples"],
        4 * first_larger as u64,
        "{stdout}"
    );
    let rel = |files: Vec<(PathBuf, Vec<u8>)>, root: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        files
            .into_iter()
            .map(|(p, b)| (p.strip_prefix(root).unwrap().to_path_buf(), b))
            .filter(|(p, _)| p != Path::new("manifest.json"))
            .collect()
    };
    assert!(
        rel(snapshot(&dir.path().join("full")), &dir.path().join("full"))
            == rel(whole, &dir.path().join("whole")),
        "the resumed cache's shards differ from an uninterrupted one's"
    );
}

#[test]
fn a_full_disk_while_writing_a_data_set_leaves_no_half_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let args = [
        "data",
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--train",
        "64",
        "--val",
        "8",
        "--test",
        "8",
        "--image-size",
        "32",
        "--seed",
        "3",
    ];
    // The images (a few kB) fit, the training files do not.
    let (ok, _, err) = mmkd_constrained(&args, Some(8 * 1024), false);
    assert!(!ok);
    assert!(
        err.contains("the disk is full")
            && err.contains("the data set is unfinished: it has no manifest.json yet")
            && err.contains("run the same command again"),
        "{err}"
    );
    let files = snapshot(&out);
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(!name.contains("tmp"), "left behind: {}", path.display());
        if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .unwrap_or_else(|e| panic!("{} is half-written: {e}", path.display()));
        }
    }
    let (ok, _, err) = mmkd(&args);
    assert!(ok, "{err}");
    assert!(out.join("manifest.json").exists());
}
