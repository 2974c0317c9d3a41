//! The README's "Your own data" walk-through, run exactly as written (its bash block, with the
//! preset, data and output variables pointed at a tiny generated set), so the page cannot rot.

use std::path::{Path, PathBuf};
use std::process::Command;

fn mmkd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mmkd"))
}

/// The bash block under the README's "## Your own data".
fn walk_through() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Your own data\n")
        .nth(1)
        .expect("the README has a \"Your own data\" section");
    let block = section
        .split("```bash\n")
        .nth(1)
        .expect("the section has a bash block");
    block.split("\n```").next().unwrap().to_string()
}

/// The block with its `P=`, `D=` and `R=` lines set to this test's values; every other line
/// is kept as written.
fn with_variables(block: &str, values: &[(&str, String)]) -> String {
    let mut seen = Vec::new();
    let lines: Vec<String> = block
        .lines()
        .map(|line| {
            for (name, value) in values {
                if line.starts_with(&format!("{name}=")) {
                    seen.push(*name);
                    return format!("{name}={value}");
                }
            }
            line.to_string()
        })
        .collect();
    for (name, _) in values {
        assert!(seen.contains(name), "the walk-through sets no {name}=");
    }
    lines.join("\n")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// "Your own data": images plus LLaVA captions, instructions and held-out VQA files in one
/// folder, made from a small synthetic set.
fn user_data(dir: &Path) -> PathBuf {
    let generated = dir.join("generated");
    let status = Command::new(mmkd())
        .args([
            "data", "synth", "--seed", "5", "--train", "24", "--val", "4",
        ])
        .args(["--test", "6", "--image-size", "32", "--out"])
        .arg(&generated)
        .status()
        .unwrap();
    assert!(status.success());
    let data = dir.join("my-data");
    copy_dir(&generated.join("images"), &data.join("images"));
    for (from, to) in [
        ("train/pretrain.json", "pretrain.json"),
        ("train/instruct.json", "instruct.json"),
        ("test/questions.jsonl", "questions.jsonl"),
        ("test/answers.jsonl", "answers.jsonl"),
    ] {
        std::fs::copy(generated.join(from), data.join(to)).unwrap();
    }
    data
}

#[test]
fn the_readme_walk_through_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = user_data(dir.path());
    let runs = dir.path().join("runs");
    let script = with_variables(
        &walk_through(),
        &[
            ("P", "shapes-tiny".into()),
            ("D", data.display().to_string()),
            ("R", runs.display().to_string()),
        ],
    );
    let bin_dir = mmkd().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir.path())
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walk-through failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );

    // Every step left its work: the tower, three models and their evaluations.
    assert!(runs.join("tower").join("model.safetensors").exists());
    let tower: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs.join("tower").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tower["objective"], "contrastive");
    for stage in ["teacher/pt", "baseline/pt", "distilled/dpt"] {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(runs.join(stage).join("summary.json")).unwrap(),
        )
        .unwrap();
        let origin = summary["model_origin"].as_str().unwrap();
        assert!(
            origin.contains(&runs.join("tower").display().to_string()),
            "{stage} was not built on the pre-trained tower: {origin}"
        );
    }
    for model in ["teacher", "baseline", "distilled"] {
        let results = runs.join("eval").join(model).join("results.json");
        assert!(results.exists(), "no {}", results.display());
    }
    for model in ["teacher", "baseline", "distilled"] {
        assert!(
            stdout.contains(model),
            "`eval compare` lacks {model}:\n{stdout}"
        );
    }
    assert!(stdout.contains("tower (contrastive)"), "{stdout}");
}
