//! The offline teacher cache end to end on tiny models: `mmkd dft --teacher-cache` with
//! k = vocabulary trains exactly as the online teacher does, and a stale or mismatched cache
//! is refused with an error naming what differs.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::mmkd;
use mmkd::train::metrics::{read_metrics, StepMetrics};

/// Synthetic data, two tokenizers, two tiny teachers and a tiny student, made once.
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
            "24",
            "--val",
            "8",
            "--test",
            "8",
            "--image-size",
            "32",
            "--seed",
            "5",
        ]);
        for (from, out) in [
            ("data/train", "data/tokenizer.json"),
            ("data/val", "data/tokenizer-b.json"),
        ] {
            run(&[
                "data",
                "tokenizer",
                "--data",
                &s(from),
                "--vocab-size",
                "400",
                "--out",
                &s(out),
            ]);
        }
        for (role, tokenizer, seed, out) in [
            ("teacher", "data/tokenizer.json", "0", "teacher"),
            ("teacher", "data/tokenizer.json", "1", "teacher-b"),
            ("student", "data/tokenizer.json", "0", "student"),
            ("student", "data/tokenizer-b.json", "0", "student-b"),
        ] {
            stage(
                &root,
                "pretrain",
                &[
                    "--role",
                    role,
                    "--tokenizer",
                    &s(tokenizer),
                    "--seed",
                    seed,
                    "--out",
                    &s(out),
                ],
            );
        }
        World { _dir: dir, root }
    })
}

fn run(args: &[&str]) -> String {
    let (ok, out, err) = mmkd(args);
    assert!(ok, "mmkd {args:?} failed: {err}");
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn data_args(root: &Path) -> Vec<String> {
    vec![
        "--config".into(),
        "shapes-tiny".into(),
        "--quiet".into(),
        "--data".into(),
        root.join("data/train/instruct.json").display().to_string(),
        "--images".into(),
        root.join("data").display().to_string(),
    ]
}

fn stage(root: &Path, stage: &str, extra: &[&str]) -> String {
    let data = if stage == "pretrain" {
        "data/train/pretrain.json"
    } else {
        "data/train/instruct.json"
    };
    let mut args = vec![
        stage.to_string(),
        "--config".into(),
        "shapes-tiny".into(),
        "--quiet".into(),
        "--data".into(),
        root.join(data).display().to_string(),
        "--images".into(),
        root.join("data").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Writes a DFT cache of `teacher`; returns mmkd's (ok, stdout, stderr).
fn write_cache(teacher: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let root = &world().root;
    let mut args = vec![
        "teacher-cache".to_string(),
        "--teacher".into(),
        p(teacher).into(),
    ];
    args.extend(data_args(root));
    args.extend([
        "--out".into(),
        p(out).into(),
        "--shard-size".into(),
        "10".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs two DFT steps from `init`; `teacher` is `["--teacher", DIR]` or `["--teacher-cache", C]`.
fn dft(init: &Path, teacher: &[&str], out: &Path, extra: &[&str]) -> (bool, String, String) {
    let root = &world().root;
    let mut args = vec!["dft".to_string()];
    args.extend(data_args(root));
    args.extend([
        "--init".into(),
        p(init).into(),
        "--out".into(),
        p(out).into(),
    ]);
    args.extend(["--max-steps".into(), "2".into()]);
    args.extend(teacher.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn vocab(model: &Path) -> usize {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["text_config"]["vocab_size"].as_u64().unwrap() as usize
}

#[test]
fn cached_dft_at_full_vocabulary_equals_online_dft() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, student) = (w.root.join("teacher"), w.root.join("student"));
    let k = vocab(&teacher).to_string();
    let cache = tmp.path().join("cache");
    let (ok, out, err) = write_cache(&teacher, &cache, &["--top-k", &k, "--json"]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(w.root.join("data/train/instruct.json")).unwrap(),
    )
    .unwrap();
    let n = records.len() as u64;
    assert_eq!(summary["samples"].as_u64(), Some(n));
    assert_eq!(summary["shards"].as_u64(), Some(n.div_ceil(10)));
    assert!(summary["visual_positions"].as_u64().unwrap() > 0);

    let online = tmp.path().join("online");
    let cached = tmp.path().join("cached");
    let (ok, _, err) = dft(&student, &["--teacher", p(&teacher)], &online, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = dft(
        &student,
        &["--teacher-cache", p(&cache)],
        &cached,
        &["--save-every", "1"],
    );
    assert!(ok, "{err}");
    let (a, b) = (
        read_metrics(&online.join("metrics.jsonl")).unwrap(),
        read_metrics(&cached.join("metrics.jsonl")).unwrap(),
    );
    assert_eq!(a.len(), 2);
    assert!(a
        .iter()
        .any(|m| m.term("l_vis").is_some() && m.term("l_rel").is_some()));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        // Step 1 sees the same weights; step 2 the same update of them.
        let tol = if step == 0 { 1e-5 } else { 1e-4 };
        for (name, u, v) in [
            ("loss", Some(x.loss), Some(y.loss)),
            ("ce", x.term("ce"), y.term("ce")),
            ("l_res", x.term("l_res"), y.term("l_res")),
            ("l_vis", x.term("l_vis"), y.term("l_vis")),
            ("l_rel", x.term("l_rel"), y.term("l_rel")),
        ] {
            // A batch without images has no L_vis / L_rel in either run.
            assert_eq!(u.is_some(), v.is_some(), "step {} {name}", step + 1);
            let (Some(u), Some(v)) = (u, v) else { continue };
            assert!(
                (u - v).abs() <= tol * u.abs().max(1.0),
                "step {} {name}: online {u} vs cached {v}",
                step + 1
            );
        }
        assert!(
            (x.grad_norm - y.grad_norm).abs() < 1e-4 * x.grad_norm,
            "step {}: grad norm",
            step + 1
        );
    }

    // A smaller k trains too, with a (slightly) different loss.
    let small = tmp.path().join("small");
    let (ok, _, err) = write_cache(&teacher, &small, &["--top-k", "4"]);
    assert!(ok, "{err}");
    let (ok, _, err) = dft(
        &student,
        &["--teacher-cache", p(&small)],
        &tmp.path().join("k4"),
        &[],
    );
    assert!(ok, "{err}");
    let c = read_metrics(&tmp.path().join("k4/metrics.jsonl")).unwrap();
    assert_eq!(c[0].term("ce"), a[0].term("ce"));
    assert!(c[0].term("l_res").unwrap() <= a[0].term("l_res").unwrap() + 1e-6);

    // The cache is part of the run's identity: resuming with another one is refused.
    let resume = |c: &Path| {
        dft(
            &student,
            &["--teacher-cache", p(c)],
            &cached,
            &["--save-every", "1", "--resume"],
        )
    };
    let (ok, _, err) = resume(&small);
    assert!(
        !ok && err.contains("was written with other settings"),
        "{err}"
    );
    let (ok, _, err) = resume(&cache);
    assert!(ok, "{err}");
}

/// Asserts a refused run: exit status 1, an `error:` line holding `needle`, no panic.
#[test]
fn micro_batches_side_by_side_change_no_number() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, student) = (w.root.join("teacher"), w.root.join("student"));
    let runs: Vec<Vec<StepMetrics>> = ["1", "2"]
        .iter()
        .map(|parallel| {
            let out = tmp.path().join(format!("parallel-{parallel}"));
            let (ok, _, err) = dft(
                &student,
                &["--teacher", p(&teacher)],
                &out,
                &[
                    "--set",
                    "grad_accum=2",
                    "--set",
                    &format!("parallel_micro_batches={parallel}"),
                ],
            );
            assert!(ok, "{err}");
            read_metrics(&out.join("metrics.jsonl")).unwrap()
        })
        .collect();
    assert_eq!(runs[0].len(), 2);
    for (step, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
        assert!(
            (a.loss - b.loss).abs() <= 1e-6 * a.loss.abs().max(1.0),
            "step {}: {} vs {}",
            step + 1,
            a.loss,
            b.loss
        );
        assert_eq!(a.samples, b.samples);
    }
}

#[test]
fn a_chunked_loss_changes_no_number() {
    // LLaVA-KD's DFT against an online teacher with the logits formed 5 rows at a time from
    // both models' hidden states (as on CUDA), and all at once.
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, student) = (w.root.join("teacher"), w.root.join("student"));
    let runs: Vec<Vec<StepMetrics>> = ["0", "5"]
        .iter()
        .map(|rows| {
            let out = tmp.path().join(format!("chunk-{rows}"));
            let (ok, _, err) = dft(
                &student,
                &["--teacher", p(&teacher)],
                &out,
                &["--set", &format!("loss_chunk_rows={rows}")],
            );
            assert!(ok, "{err}");
            read_metrics(&out.join("metrics.jsonl")).unwrap()
        })
        .collect();
    assert_eq!(runs[0].len(), 2);
    for term in ["ce", "l_res", "l_vis", "l_rel"] {
        let mut seen = false;
        for (step, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
            match (a.term(term), b.term(term)) {
                (Some(x), Some(y)) => {
                    assert!(
                        (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                        "step {}, {term}: {x} vs {y}",
                        step + 1
                    );
                    seen = true;
                }
                (None, None) => {} // A text-only batch has no visual term.
                other => panic!("step {}, {term}: {other:?}", step + 1),
            }
        }
        assert!(seen, "no step computed {term}");
    }
}

fn refused(result: (bool, String, String), needle: &str) {
    let (ok, _, err) = result;
    assert!(!ok, "expected a refusal containing {needle:?}");
    assert!(err.contains("error:") && err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn stale_or_mismatched_caches_are_refused_naming_the_field() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // The teacher is copied so it can be "retrained" in place later.
    let teacher = t.join("teacher");
    std::fs::create_dir_all(&teacher).unwrap();
    for f in std::fs::read_dir(w.root.join("teacher")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, teacher.join(f.file_name().unwrap())).unwrap();
        }
    }
    let cache = t.join("cache");
    let (ok, _, err) = write_cache(&teacher, &cache, &["--top-k", "8"]);
    assert!(ok, "{err}");
    let student = w.root.join("student");
    let c = ["--teacher-cache", p(&cache)];
    let out = |name: &str| t.join(name);

    // The cache is usable as written.
    let (ok, _, err) = dft(&student, &c, &out("ok"), &[]);
    assert!(ok, "{err}");

    refused(
        dft(
            &student,
            &c,
            &out("temperature"),
            &["--set", "distill.temperature=2"],
        ),
        "`temperature`: cache 1.0, this run 2.0",
    );
    refused(
        dft(&student, &c, &out("template"), &["--set", "template=phi"]),
        "`template`: cache compact, this run phi",
    );
    refused(
        dft(
            &student,
            &c,
            &out("length"),
            &["--set", "data.max_length=100"],
        ),
        "`max_length`: cache 160, this run 100",
    );
    refused(
        dft(&w.root.join("student-b"), &c, &out("tokenizer"), &[]),
        "`tokenizer_digest`: cache",
    );

    // Another data file (one answer changed).
    let data = w.root.join("data/train/instruct.json");
    let text = std::fs::read_to_string(&data).unwrap();
    let changed = t.join("instruct.json");
    std::fs::write(
        &changed,
        text.replacen("\"gpt\",\"value\":\"", "\"gpt\",\"value\":\"x", 1),
    )
    .unwrap();
    let root = &w.root;
    let mut args: Vec<String> = vec![
        "dft".into(),
        "--config".into(),
        "shapes-tiny".into(),
        "--quiet".into(),
    ];
    args.extend([
        "--data".into(),
        p(&changed).into(),
        "--images".into(),
        p(&root.join("data")).into(),
    ]);
    args.extend([
        "--init".into(),
        p(&student).into(),
        "--out".into(),
        p(&out("data")).into(),
    ]);
    args.extend(c.iter().map(|s| s.to_string()));
    refused(
        mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        "`data_digest`: cache",
    );

    // Both teacher sources at once.
    let (ok, _, err) = dft(
        &student,
        &["--teacher-cache", p(&cache), "--teacher", p(&teacher)],
        &out("both"),
        &[],
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");

    // The teacher checkpoint changed since the cache was written.
    std::fs::copy(
        w.root.join("teacher-b/model.safetensors"),
        teacher.join("model.safetensors"),
    )
    .unwrap();
    refused(
        dft(&student, &c, &out("teacher"), &[]),
        "is stale: `teacher`",
    );

    // Writing over a finished cache is refused; --top-k beyond the vocabulary too.
    refused(
        write_cache(&teacher, &cache, &[]),
        "already holds a teacher cache",
    );
    refused(
        write_cache(&teacher, &out("big"), &["--top-k", "100000"]),
        "--top-k must be between 1 and the vocabulary (400), got 100000",
    );

    // Damaged caches.
    let damaged = t.join("damaged");
    let (ok, _, err) = write_cache(&w.root.join("teacher"), &damaged, &["--top-k", "8"]);
    assert!(ok, "{err}");
    let dc = ["--teacher-cache", p(&damaged)];
    std::fs::remove_file(damaged.join("shard-00001.safetensors")).unwrap();
    refused(
        dft(&student, &dc, &out("shard"), &[]),
        "shard-00001.safetensors is missing",
    );
    std::fs::write(damaged.join("manifest.json"), "{\"run\": 3}").unwrap();
    refused(
        dft(&student, &dc, &out("manifest"), &[]),
        "not a teacher-cache manifest",
    );
    std::fs::remove_file(damaged.join("manifest.json")).unwrap();
    refused(
        dft(&student, &dc, &out("incomplete"), &[]),
        "is incomplete (no manifest.json)",
    );
}

/// A shard damaged after the cache was written (a disk error, a partial copy): the run stops
/// with an error naming the shard, never a panic, and nothing of the damaged run is kept as a
/// finished stage.
#[test]
fn a_corrupt_shard_is_refused_naming_it() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cache = t.join("cache");
    let (ok, _, err) = write_cache(&w.root.join("teacher"), &cache, &["--top-k", "8"]);
    assert!(ok, "{err}");
    let shard = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a shard");
    let name = shard.file_name().unwrap().to_string_lossy().to_string();
    let bytes = std::fs::read(&shard).unwrap();
    let student = w.root.join("student");
    let c = ["--teacher-cache", p(&cache)];
    for (i, damaged) in [bytes[..bytes.len() / 2].to_vec(), bytes[..7].to_vec(), {
        let mut b = bytes.clone();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        b
    }]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&shard, &damaged).unwrap();
        let out = t.join(format!("damaged-{i}"));
        refused(dft(&student, &c, &out, &[]), &name);
        assert!(!out.join("summary.json").exists());
    }
}
