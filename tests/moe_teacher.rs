//! A Mixture-of-Experts teacher everywhere a teacher goes (issue 21): pre-trained and
//! fine-tuned from scratch with the balancing term, then the teacher of DFT online and through a
//! teacher cache, evaluated, and inspected with its routers' load.

mod common;

use std::path::{Path, PathBuf};

use common::mmkd;
use common::world::{metrics, stage_args, world, World};
use mmkd::train::metrics::StepMetrics;

/// shapes-tiny with a Qwen2-MoE teacher (4 experts of width 32, top-2, a shared expert of
/// width 32) trained with the Switch balancing term.
const MOE_PRESET: &str = r#"
inherits = "shapes-tiny"
[models.teacher.text_config]
model_type = "qwen2_moe"
num_experts = 4
num_experts_per_tok = 2
moe_intermediate_size = 32
shared_expert_intermediate_size = 32
norm_topk_prob = true
[[stages.pretrain.objective]]
term = "ce"
[[stages.pretrain.objective]]
term = "moe.balance"
weight = 0.01
[[stages.sft.objective]]
term = "ce"
[[stages.sft.objective]]
term = "moe.balance"
weight = 0.01
"#;

fn run_ok(args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = mmkd(&refs);
    assert!(ok, "mmkd {args:?} failed: {err}");
    out
}

/// The MoE teacher (PT → SFT, 3 steps each) in `w`'s data world.
fn moe_teacher(w: &World, dir: &Path) -> PathBuf {
    let preset = dir.join("moe.toml");
    std::fs::write(&preset, MOE_PRESET).unwrap();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    for (stage, data, from) in [
        ("pretrain", "data/train/pretrain.json", None),
        ("sft", "data/train/instruct.json", Some(d("moe-pt"))),
    ] {
        let mut args: Vec<String> = [
            stage,
            "--config",
            preset.to_str().unwrap(),
            "--quiet",
            "--role",
            "teacher",
            "--data",
            &s(data),
            "--images",
            &s("data"),
            "--max-steps",
            "3",
        ]
        .map(String::from)
        .to_vec();
        match from {
            None => args.extend(["--tokenizer".into(), s("data/tokenizer.json")]),
            Some(init) => args.extend(["--init".into(), init]),
        }
        let out = if stage == "pretrain" {
            "moe-pt"
        } else {
            "moe-teacher"
        };
        args.extend(["--out".into(), d(out)]);
        run_ok(&args);
    }
    dir.join("moe-teacher")
}

fn term(m: &StepMetrics, name: &str) -> Option<f32> {
    m.terms
        .0
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| *v)
}

#[test]
fn a_moe_teacher_trains_teaches_online_with_and_without_augmentation_and_through_a_cache() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let teacher = moe_teacher(w, dir.path());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(teacher.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["text_config"]["model_type"], "qwen2_moe");
    assert_eq!(config["text_config"]["num_experts"], 4);
    let steps = metrics(&teacher);
    let balance = term(&steps[0], "l_balance").expect("the balancing term is logged");
    // Two sparse layers, top-2: an even load scores 2.
    assert!((1.9..4.0).contains(&balance), "{balance}");

    // Online DFT from the MoE teacher.
    let teacher_str = teacher.to_str().unwrap();
    let out_online = dir.path().join("dft-online");
    let mut args = stage_args(w, "dft", "student", out_online.to_str().unwrap(), 2, &[]);
    let at = args.iter().position(|a| a == "--teacher").unwrap();
    args[at + 1] = teacher_str.to_string();
    run_ok(&args);
    let l_res = term(&metrics(&out_online)[0], "l_res").unwrap();
    assert!(l_res.is_finite() && l_res > 0.0, "{l_res}");

    // The other objectives take it too: DPT on captions, GKD and MiniLLM on the student's own
    // answers (the MoE teacher scores them, and MiniLLM samples from it).
    for stage in ["dpt", "gkd", "minillm"] {
        let out = dir.path().join(stage);
        let mut args = stage_args(w, stage, "student", out.to_str().unwrap(), 1, &[]);
        args[at + 1] = teacher_str.to_string();
        if stage == "dpt" {
            let data = args.iter().position(|a| a == "--data").unwrap();
            args[data + 1] = w
                .root
                .join("data/train/pretrain.json")
                .to_str()
                .unwrap()
                .into();
        }
        run_ok(&args);
        assert_eq!(metrics(&out).len(), 1, "{stage}");
    }

    // Knowledge augmentation: the target averages three routings, so the loss moves.
    let out_ka = dir.path().join("dft-ka");
    let sets = ["train.teacher_routings=3"];
    let mut args = stage_args(w, "dft", "student", out_ka.to_str().unwrap(), 2, &sets);
    args[at + 1] = teacher_str.to_string();
    run_ok(&args);
    let ka = term(&metrics(&out_ka)[0], "l_res").unwrap();
    assert!(
        ka.is_finite() && (ka - l_res).abs() > 1e-6,
        "{ka} vs {l_res}"
    );
    // A dense teacher has no routing to augment.
    let args = stage_args(
        w,
        "dft",
        "teacher",
        dir.path().join("x").to_str().unwrap(),
        1,
        &sets,
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = mmkd(&refs);
    assert!(
        !ok && err.contains("teacher_routings = 3") && err.contains("no sparse layer"),
        "{err}"
    );

    // The same through a teacher cache.
    let cache = dir.path().join("cache");
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    run_ok(
        &[
            "teacher-cache",
            "--teacher",
            teacher_str,
            "--config",
            "shapes-tiny",
            "--data",
            &s("data/train/instruct.json"),
            "--images",
            &s("data"),
            "--out",
            cache.to_str().unwrap(),
            "--top-k",
            "400",
            "--quiet",
        ]
        .map(String::from),
    );
    let out_cached = dir.path().join("dft-cached");
    let mut args = stage_args(w, "dft", "student", out_cached.to_str().unwrap(), 2, &[]);
    args[at] = "--teacher-cache".into();
    args[at + 1] = cache.to_str().unwrap().into();
    run_ok(&args);
    // The cache keeps the whole vocabulary: the first step's loss is the online one.
    for name in ["l_res", "l_vis", "l_rel"] {
        let online = term(&metrics(&out_online)[0], name);
        let cached = term(&metrics(&out_cached)[0], name);
        let (Some(online), Some(cached)) = (online, cached) else {
            assert_eq!(online.is_some(), cached.is_some(), "{name}");
            continue;
        };
        assert!(
            (online - cached).abs() <= 1e-5 * online.abs().max(1.0),
            "{name}: online {online} vs cached {cached}"
        );
    }

    // Evaluated like any model.
    let eval = dir.path().join("eval");
    run_ok(
        &[
            "eval",
            "vqa",
            "--model",
            teacher_str,
            "--questions",
            &s("data/test/questions.jsonl"),
            "--answers",
            &s("data/test/answers.jsonl"),
            "--images",
            &s("data"),
            "--out",
            eval.to_str().unwrap(),
            "--max-new-tokens",
            "4",
            "--quiet",
        ]
        .map(String::from),
    );
    let preds = std::fs::read_to_string(eval.join("predictions.jsonl")).unwrap();
    let questions = std::fs::read_to_string(s("data/test/questions.jsonl")).unwrap();
    assert_eq!(
        preds.lines().count(),
        questions.lines().count(),
        "one answer per test question"
    );
}

#[test]
fn router_stats_and_moe_to_dense_by_each_method_give_students_every_stage_takes() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let teacher = moe_teacher(w, dir.path());
    let teacher_str = teacher.to_str().unwrap().to_string();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let data = s("data/val/instruct.json");

    // Per-layer expert load.
    let out = run_ok(
        &[
            "inspect",
            &teacher_str,
            "--router-stats",
            &data,
            "--images",
            &s("data"),
            "--json",
        ]
        .map(String::from),
    );
    let info: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let usage = &info["router_usage"];
    assert_eq!(usage["experts"], 4);
    let layers = usage["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "both decoder layers are sparse");
    for layer in layers {
        let assigned: u64 = layer["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_u64().unwrap())
            .sum();
        assert_eq!(
            assigned,
            2 * layer["tokens"].as_u64().unwrap(),
            "top-2 per token"
        );
    }
    let table = run_ok(
        &[
            "inspect",
            &teacher_str,
            "--router-stats",
            &data,
            "--images",
            &s("data"),
        ]
        .map(String::from),
    );
    assert!(
        table.contains("load per expert") && table.contains("4 experts (top-2)"),
        "{table}"
    );

    let to_dense = |method: &str, out: &Path, extra: &[&str]| -> (bool, String, String) {
        let mut args = vec![
            "moe-to-dense",
            "--teacher",
            &teacher_str,
            "--data",
            &data,
            "--images",
            w.root.join("data").to_str().unwrap(),
            "--method",
            method,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        mmkd(&refs)
    };
    // Experts 32 wide, top-2, a shared expert 32 wide; the teacher's dense width (128) is
    // not used by a fully sparse model.
    for (method, width, extra) in [
        ("usage-avg", 32 + 32, vec![]),
        ("top-k", 2 * 32 + 32, vec![]),
        ("svd", 48 + 32, vec!["--width", "48"]),
    ] {
        let out = dir.path().join(format!("dense-{method}"));
        let (ok, stdout, err) = to_dense(method, &out, &extra);
        assert!(ok, "{method}: {err}");
        let record: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(record["intermediate_size"], width, "{method}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["text_config"]["model_type"], "qwen2", "{method}");
        assert!(config["text_config"].get("num_experts").is_none());
        assert!(out.join("tokenizer.json").exists() && out.join("moe_to_dense.json").exists());
        assert!(
            record["dense_parameters"].as_u64() < record["teacher_parameters"].as_u64(),
            "{method}: {record}"
        );
        // Any stage takes it as --init: one DFT step against the MoE teacher.
        let student = dir.path().join(format!("dft-{method}"));
        let mut args = stage_args(w, "dft", "teacher", student.to_str().unwrap(), 1, &[]);
        let at = args.iter().position(|a| a == "--init").unwrap();
        args[at + 1] = out.to_str().unwrap().into();
        let at = args.iter().position(|a| a == "--teacher").unwrap();
        args[at + 1] = teacher_str.clone();
        run_ok(&args);
    }

    // Refusals: an existing --out, a dense model, an SVD width out of reach, --width elsewhere.
    let existing = dir.path().join("dense-usage-avg");
    let (ok, _, err) = to_dense("usage-avg", &existing, &[]);
    assert!(
        !ok && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let (ok, _, err) = to_dense("usage-avg", &existing, &["--force"]);
    assert!(ok, "{err}");
    let (ok, _, err) = mmkd(&[
        "moe-to-dense",
        "--teacher",
        &s("teacher"),
        "--data",
        &data,
        "--images",
        &s("data"),
        "--method",
        "svd",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("is a dense \"qwen2\" model"), "{err}");
    let (ok, _, err) = to_dense("svd", &dir.path().join("y"), &["--width", "1000"]);
    assert!(
        !ok && err.contains("reaches widths 1 to 128") && err.contains("--width 1000"),
        "{err}"
    );
    let (ok, _, err) = to_dense("top-k", &dir.path().join("z"), &["--width", "8"]);
    assert!(
        !ok && err.contains("--width sets the SVD's dense width"),
        "{err}"
    );
}
