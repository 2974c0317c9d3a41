//! `mmkd merge` (LM-Cocktail): the weighted average of checkpoints, with weights given or from
//! each model's loss on a few examples; models that cannot be averaged are refused naming what
//! differs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::mmkd;

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
}

impl World {
    /// Synthetic data and a tokenizer.
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        common::synth_data(&data, (16, 4, 2), 300);
        let (ok, _, err) = mmkd(&[
            "data",
            "tokenizer",
            "--data",
            s(&data.join("train")),
            "--vocab-size",
            "290",
            "--out",
            s(&data.join("tokenizer-290.json")),
        ]);
        assert!(ok, "{err}");
        World {
            _dir: dir,
            root,
            data,
        }
    }

    /// A tiny model pre-trained for `steps` steps from weights of `init_seed`.
    fn model(&self, name: &str, init_seed: &str, steps: &str, extra: &[&str]) -> PathBuf {
        let out = self.root.join(name);
        let mut args = vec!["pretrain", "--config", "shapes-tiny", "--data"];
        let pretrain = self.data.join("train/pretrain.json");
        let tokenizer = self.data.join("tokenizer.json");
        args.extend([s(&pretrain), "--images", s(&self.data)]);
        if !extra.contains(&"--tokenizer") {
            args.extend(["--tokenizer", s(&tokenizer)]);
        }
        args.extend([
            "--out",
            s(&out),
            "--max-steps",
            steps,
            "--init-seed",
            init_seed,
            "--quiet",
        ]);
        args.extend(extra);
        let (ok, _, err) = mmkd(&args);
        assert!(ok, "{err}");
        out
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn weights(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn merge(args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["merge"];
    all.extend(args);
    mmkd(&all)
}

/// `mmkd merge --models A B --weights W.. --out OUT EXTRA..`.
fn merge_pair(
    a: &str,
    b: &str,
    weights: &[&str],
    out: &str,
    extra: &[&str],
) -> (bool, String, String) {
    let mut args = vec!["--models", a, b, "--weights"];
    args.extend(weights);
    args.extend(["--out", out]);
    args.extend(extra);
    merge(&args)
}

#[test]
fn merging_averages_with_the_given_weights_and_is_exact_at_the_ends() {
    let w = World::new();
    let a = w.model("a", "1", "3", &[]);
    let b = w.model("b", "7", "3", &[]);
    let out = |n: &str| w.root.join(n);

    // A model merged with itself: bit for bit.
    let (ok, _, err) = merge_pair(s(&a), s(&a), &["0.3", "0.7"], s(&out("aa")), &[]);
    assert!(ok, "{err}");
    assert!(
        std::fs::read(out("aa").join("model.safetensors")).unwrap()
            == std::fs::read(a.join("model.safetensors")).unwrap(),
        "a model merged with itself changed"
    );
    // Weights (1, 0): the first model.
    let (ok, _, err) = merge_pair(s(&a), s(&b), &["1", "0"], s(&out("a0")), &[]);
    assert!(ok, "{err}");
    let (wa, wb) = (weights(&a), weights(&b));
    for (name, t) in weights(&out("a0")) {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wa[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    // Weights 1 and 3 (normalised to 0.25, 0.75): the average, every tensor; the first
    // model's config, tokenizer and processor; the record.
    let (ok, stdout, err) = merge_pair(s(&a), s(&b), &["1", "3"], s(&out("ab")), &["--json"]);
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(record["weights"], serde_json::json!([0.25, 0.75]));
    assert_eq!(record["rule"], "given");
    let merged = weights(&out("ab"));
    assert_eq!(merged.len(), wa.len());
    for (name, t) in &merged {
        let want = ((wa[name].to_dtype(DType::F64).unwrap() * 0.25).unwrap()
            + (wb[name].to_dtype(DType::F64).unwrap() * 0.75).unwrap())
        .unwrap();
        let diff = common::max_abs_diff(t, &want.to_dtype(DType::F32).unwrap());
        assert!(diff < 1e-6, "{name}: {diff}");
    }
    for file in [
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "processor_config.json",
        "merge.json",
    ] {
        assert!(out("ab").join(file).exists(), "{file}");
    }
    // The merged model is a model: it answers.
    let (ok, _, err) = mmkd(&["inspect", s(&out("ab"))]);
    assert!(ok, "{err}");
}

#[test]
fn auto_weights_follow_each_models_loss_on_the_examples() {
    let w = World::new();
    // A trained model and an untrained one (0 steps are not allowed: 1 step at a tiny rate).
    let trained = w.model("trained", "1", "40", &[]);
    let raw = w.model("raw", "1", "1", &["--set", "lr=1e-9"]);
    let out = w.root.join("cocktail");
    let examples = w.data.join("val/pretrain.json");
    let (ok, stdout, err) = merge(&[
        "--models",
        s(&trained),
        s(&raw),
        "--auto-weights",
        "--examples",
        s(&examples),
        "--images",
        s(&w.data),
        "--tau",
        "0.5",
        "--out",
        s(&out),
        "--json",
    ]);
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(record["rule"], "auto");
    assert_eq!(record["tau"], 0.5);
    let losses: Vec<f64> = record["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["loss"].as_f64().unwrap())
        .collect();
    let weights: Vec<f64> = record["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(
        losses[0] < losses[1],
        "the trained model's loss is not lower: {losses:?}"
    );
    // w = softmax(−loss / τ), from the recorded losses.
    let e: Vec<f64> = losses.iter().map(|l| (-l / 0.5).exp()).collect();
    for (wi, ei) in weights.iter().zip(&e) {
        assert!(
            (wi - ei / e.iter().sum::<f64>()).abs() < 1e-9,
            "{weights:?} {losses:?}"
        );
    }
    assert_eq!(record["losses"][0]["examples"], 4);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merge.json")).unwrap()).unwrap();
    assert_eq!(written["weights"], record["weights"]);
}

#[test]
fn models_that_cannot_be_averaged_are_refused_naming_what_differs() {
    let w = World::new();
    let a = w.model("a", "1", "1", &[]);
    let wide = w.model("wide", "1", "1", &["--role", "teacher"]);
    let other_vocab = w.model(
        "v290",
        "1",
        "1",
        &["--tokenizer", s(&w.data.join("tokenizer-290.json"))],
    );
    let out = s(&w.root.join("m")).to_string();
    let (ok, _, err) = merge_pair(s(&a), s(&wide), &["1", "1"], &out, &[]);
    assert!(!ok);
    assert!(err.contains("tensor `") && err.contains("wide"), "{err}");
    let (ok, _, err) = merge_pair(s(&a), s(&other_vocab), &["1", "1"], &out, &[]);
    assert!(!ok);
    assert!(
        err.contains("has another vocabulary") && err.contains("300 vs 290 entries"),
        "{err}"
    );
    let (ok, _, err) = merge(&["--models", s(&a), s(&a), "--weights", "1", "--out", &out]);
    assert!(!ok && err.contains("2 models but 1 weights"), "{err}");
    let (ok, _, err) = merge_pair(s(&a), s(&a), &["1", "-1"], &out, &[]);
    assert!(!ok && err.contains("finite and ≥ 0"), "{err}");
    // A corrupt checkpoint names its file.
    let broken = w.root.join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(a.join(f), broken.join(f)).unwrap();
    }
    let bytes = std::fs::read(a.join("model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = merge_pair(s(&a), s(&broken), &["1", "1"], &out, &[]);
    assert!(
        !ok && err.contains("broken") && err.contains("model.safetensors"),
        "{err}"
    );
    // An existing output is kept without --force.
    let (ok, _, err) = merge_pair(s(&a), s(&a), &["1", "1"], &out, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = merge_pair(s(&a), s(&a), &["1", "1"], &out, &[]);
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let (ok, _, err) = merge_pair(s(&a), s(&a), &["1", "1"], &out, &["--force"]);
    assert!(ok, "{err}");
}
