//! The model commands (`inspect`, `score`, `generate`) and their errors on bad checkpoints.

mod common;

use std::path::Path;

use common::{expected, fixture, mmkd};

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn inspect_reports_modules_parameters_and_image_tokens() {
    let dir = fixture("llava_clip_llama");
    let (ok, out, err) = mmkd(&["inspect", arg(&dir), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["image_tokens_per_image"], 16);
    assert_eq!(v["image_token_id"], 255);
    let modules = v["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 3);
    let total: u64 = modules
        .iter()
        .map(|m| m["parameters"].as_u64().unwrap())
        .sum();
    assert_eq!(v["total_parameters"].as_u64().unwrap(), total);
    // 64×64 + 64 (linear_2) + 64×64 + 64 (linear_1 from 2 layers × 32 features).
    assert_eq!(modules[1]["parameters"], 64 * 64 + 64 + 64 * 64 + 64);
    let (ok, table, _) = mmkd(&["inspect", arg(&dir)]);
    assert!(
        ok && table.contains("language_model") && table.contains("tied lm_head"),
        "{table}"
    );
}

#[test]
fn score_json_matches_transformers_log_probabilities() {
    let dir = fixture("llava_siglip_qwen2");
    let image = fixture("images/img0_circle_32x32.png");
    let (ok, out, err) = mmkd(&[
        "score",
        "--model",
        arg(&dir),
        "--image",
        arg(&image),
        "--prompt",
        "what is this",
        "--answer",
        "a red circle",
        "--template",
        "plain",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    let exp = expected("llava_siglip_qwen2");
    let want_ids: Vec<i64> = exp["score_answer_ids"].to_vec1().unwrap();
    let want_lp: Vec<f32> = exp["score_answer_logprobs"].to_vec1().unwrap();
    let ids: Vec<i64> = v["answer_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    assert_eq!(ids, want_ids);
    let lps: Vec<f64> = v["answer_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (a, b) in lps.iter().zip(&want_lp) {
        assert!((a - *b as f64).abs() < 1e-4, "{a} vs {b}");
    }
    let sum: f64 = lps.iter().sum();
    assert!((v["sum_logprob"].as_f64().unwrap() - sum).abs() < 1e-4);
}

#[test]
fn generate_is_deterministic_greedy_and_seeded_when_sampling() {
    let dir = fixture("llava_siglip_qwen2");
    let image = fixture("images/img0_circle_32x32.png");
    // Token-exact agreement with transformers is checked in llava_equivalence.rs; this checks
    // the command: it runs, respects the budget and is reproducible.
    let (ok, out, err) = mmkd(&[
        "generate",
        "--model",
        arg(&dir),
        "--image",
        arg(&image),
        "--prompt",
        "what is this",
        "--max-new-tokens",
        "5",
        "--show-ids",
    ]);
    assert!(ok, "{err}");
    let ids_line = out.lines().last().unwrap();
    let ids: Vec<u32> = serde_json::from_str(ids_line).unwrap();
    assert!(!ids.is_empty() && ids.len() <= 5, "{out}");
    let (ok2, out2, _) = mmkd(&[
        "generate",
        "--model",
        arg(&dir),
        "--image",
        arg(&image),
        "--prompt",
        "what is this",
        "--max-new-tokens",
        "5",
        "--show-ids",
    ]);
    assert!(ok2);
    assert_eq!(out, out2, "greedy generation is deterministic");
    let (ok, sampled, err) = mmkd(&[
        "generate",
        "--model",
        arg(&dir),
        "--image",
        arg(&image),
        "--prompt",
        "what is this",
        "--max-new-tokens",
        "5",
        "--temperature",
        "1.0",
        "--seed",
        "11",
    ]);
    assert!(ok, "{err}");
    let (_, sampled2, _) = mmkd(&[
        "generate",
        "--model",
        arg(&dir),
        "--image",
        arg(&image),
        "--prompt",
        "what is this",
        "--max-new-tokens",
        "5",
        "--temperature",
        "1.0",
        "--seed",
        "11",
    ]);
    assert_eq!(sampled, sampled2, "same seed, same sample");
}

/// A copy of the siglip fixture in a temp dir, modified by `edit`.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("llava_siglip_qwen2");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    edit(tmp.path());
    tmp
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn assert_fails_with(dir: &Path, needles: &[&str]) {
    let (ok, _, err) = mmkd(&["inspect", arg(dir)]);
    assert!(!ok, "expected failure");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}: {err}");
    }
}

#[test]
fn bad_checkpoints_give_clear_errors_and_a_nonzero_exit() {
    let missing = broken_copy(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    assert_fails_with(missing.path(), &["no weights found", "model.safetensors"]);

    let truncated = broken_copy(|d| {
        let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    });
    assert_fails_with(truncated.path(), &["model.safetensors", "truncated"]);

    let no_key = broken_copy(|d| {
        edit_config(d, |v| {
            v["text_config"]
                .as_object_mut()
                .unwrap()
                .remove("hidden_size");
        })
    });
    assert_fails_with(no_key.path(), &["config.json", "hidden_size"]);

    let unknown = broken_copy(|d| edit_config(d, |v| v["model_type"] = "blip_2".into()));
    assert_fails_with(
        unknown.path(),
        &["config.json", "blip_2", "unsupported architecture"],
    );

    let unknown_lm =
        broken_copy(|d| edit_config(d, |v| v["text_config"]["model_type"] = "mamba".into()));
    assert_fails_with(unknown_lm.path(), &["config.json", "mamba"]);

    let wrong_shape =
        broken_copy(|d| edit_config(d, |v| v["text_config"]["intermediate_size"] = 96.into()));
    assert_fails_with(
        wrong_shape.path(),
        &[
            "model.language_model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
            "model.safetensors",
        ],
    );

    let missing_tensor =
        broken_copy(|d| edit_config(d, |v| v["text_config"]["num_hidden_layers"] = 3.into()));
    assert_fails_with(
        missing_tensor.path(),
        &["model.language_model.layers.2", "missing"],
    );

    let (ok, _, err) = mmkd(&["inspect", "/no/such/dir"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
}

#[test]
fn a_missing_image_file_is_named() {
    let dir = fixture("llava_siglip_qwen2");
    let (ok, _, err) = mmkd(&[
        "score",
        "--model",
        arg(&dir),
        "--image",
        "/no/such.png",
        "--prompt",
        "p",
        "--answer",
        "a",
    ]);
    assert!(!ok && err.contains("/no/such.png"), "{err}");
}

/// Hub ids resolve through the Hugging Face cache under `HF_HOME`; offline, an uncached repo is
/// an error naming it.
#[test]
fn hub_ids_resolve_from_the_local_cache_and_name_the_repo_when_absent() {
    let home = tempfile::tempdir().unwrap();
    let home_str = home.path().to_str().unwrap();
    let (ok, _, err) = common::mmkd_with_env(
        &["inspect", "mmkd-test/not-cached"],
        &[("HF_HOME", home_str)],
    );
    assert!(
        !ok && err.contains("mmkd-test/not-cached") && err.contains("not in the local cache"),
        "{err}"
    );

    // Lay the fixture out as hf-hub's cache does: refs/main → snapshots/<commit>/files.
    let repo = home.path().join("hub/models--mmkd-test--tiny-llava");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(fixture("llava_clip_llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let (ok, out, err) = common::mmkd_with_env(
        &["inspect", "mmkd-test/tiny-llava", "--json"],
        &[("HF_HOME", home_str)],
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"image_tokens_per_image\":16"), "{out}");
}
