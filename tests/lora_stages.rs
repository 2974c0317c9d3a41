//! Stages with `train.lora`: only adapters (and the modules trained fully) learn, the stage
//! ships a PEFT adapter that every command takes and `mmkd merge --lora` folds, a killed run
//! resumes bit-exactly, DFT through adapters lowers the distillation terms, and bad settings
//! are refused before training.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use common::mmkd;
use mmkd::train::metrics::read_metrics;

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let w = World { _dir: dir, root };
        common::synth_data(&w.root.join("data"), (48, 8, 8), 400);
        let tokenizer = w.p("data/tokenizer.json");
        w.stage(
            "pretrain",
            &[
                "--role",
                "teacher",
                "--tokenizer",
                &tokenizer,
                "--out",
                &w.p("teacher/pt"),
            ],
        );
        w.stage(
            "sft",
            &[
                "--role",
                "teacher",
                "--init",
                &w.p("teacher/pt"),
                "--out",
                &w.p("teacher/sft"),
                "--set",
                "epochs=3",
            ],
        );
        w.stage(
            "pretrain",
            &["--tokenizer", &tokenizer, "--out", &w.p("student/pt")],
        );
        w
    })
}

impl World {
    fn p(&self, rel: &str) -> String {
        self.root.join(rel).to_str().unwrap().to_string()
    }

    fn stage_args(&self, stage: &str, extra: &[&str]) -> Vec<String> {
        let data = if stage == "pretrain" || stage == "dpt" {
            "data/train/pretrain.json"
        } else {
            "data/train/instruct.json"
        };
        let mut args: Vec<String> = [
            stage,
            "--config",
            "shapes-tiny",
            "--quiet",
            "--data",
            &self.p(data),
            "--images",
            &self.p("data"),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn stage(&self, stage: &str, extra: &[&str]) {
        let args = self.stage_args(stage, extra);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

fn run(args: &[&str]) -> String {
    let (ok, out, err) = mmkd(args);
    assert!(ok, "mmkd {args:?} failed: {err}");
    out
}

fn tensors(file: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

const LORA: [&str; 4] = [
    "--set",
    "train.lora.rank=4",
    "--set",
    "train.lora.targets=[\"q_proj\", \"v_proj\", \"down_proj\"]",
];

#[test]
fn a_lora_sft_trains_adapters_and_the_projector_and_ships_a_peft_adapter() {
    let w = world();
    let out = w.p("lora/sft");
    let mut extra: Vec<String> = vec!["--init".into(), w.p("student/pt")];
    extra.extend([
        "--out".into(),
        out.clone(),
        "--max-steps".into(),
        "8".into(),
    ]);
    extra.extend(LORA.map(String::from));
    w.stage("sft", &extra.iter().map(String::as_str).collect::<Vec<_>>());
    let out = PathBuf::from(out);
    // A PEFT adapter directory: no config, no full weights.
    assert!(out.join("adapter_config.json").exists() && !out.join("config.json").exists());
    let adapter = tensors(&out.join("adapter_model.safetensors"));
    let (lora, rest): (Vec<&String>, Vec<&String>) =
        adapter.keys().partition(|k| k.contains(".lora_"));
    // The student has 1 LLM layer: 3 adapted layers × (A, B); the projector's 4 tensors.
    assert_eq!(lora.len(), 6, "{lora:?}");
    assert!(
        rest.iter()
            .all(|k| k.starts_with("base_model.model.model.multi_modal_projector.")),
        "{rest:?}"
    );
    assert_eq!(rest.len(), 4);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let trained: usize = adapter.values().map(|t| t.elem_count()).sum();
    assert_eq!(summary["parameters_trained"], trained as u64);

    // Folded: the LLM's other weights are the base's, bit for bit; adapted ones moved.
    let full = w.root.join("lora/sft-full");
    run(&[
        "merge",
        "--lora",
        out.to_str().unwrap(),
        "--out",
        full.to_str().unwrap(),
    ]);
    let base = tensors(&w.root.join("student/pt/model.safetensors"));
    let folded = tensors(&full.join("model.safetensors"));
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        folded.keys().collect::<Vec<_>>()
    );
    for (name, t) in &base {
        // Adapters change weights, never biases; the projector trains fully.
        let adapted = (name.starts_with("language_model.")
            && ["q_proj.weight", "v_proj.weight", "down_proj.weight"]
                .iter()
                .any(|l| name.ends_with(l)))
            || name.starts_with("multi_modal_projector");
        assert_eq!(same(t, &folded[name]), !adapted, "{name}");
    }
    // Every command takes the adapter: eval answers with it as with the folded model.
    let answer = |model: &Path| {
        run(&[
            "eval",
            "vqa",
            "--model",
            model.to_str().unwrap(),
            "--questions",
            &w.p("data/test/questions.jsonl"),
            "--answers",
            &w.p("data/test/answers.jsonl"),
            "--images",
            &w.p("data"),
            "--quiet",
            "--out",
            &w.p(&format!(
                "eval-{}",
                model.file_name().unwrap().to_string_lossy()
            )),
        ])
    };
    let (a, b) = (answer(&out), answer(&full));
    let accuracy = |s: &str| {
        s.lines()
            .find(|l| l.contains("VQA accuracy:"))
            .map(str::to_string)
    };
    assert!(accuracy(&a).is_some(), "{a}");
    assert_eq!(accuracy(&a), accuracy(&b), "{a}\n{b}");
    // score: the same log-probabilities (to float noise) from the adapter and the folded model.
    let score = |model: &Path| -> Vec<f64> {
        let json = run(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--image",
            &w.p("data/images/test/000000.png"),
            "--prompt",
            "What shape is in the top left cell?",
            "--answer",
            "a red circle",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        v["answer_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (sa, sb) = (score(&out), score(&full));
    assert_eq!(sa.len(), sb.len());
    assert!(
        sa.iter().zip(&sb).all(|(x, y)| (x - y).abs() < 1e-4),
        "{sa:?} {sb:?}"
    );
    // A teacher given as an adapter.
    w.stage(
        "dft",
        &[
            "--init",
            &w.p("student/pt"),
            "--teacher",
            out.to_str().unwrap(),
            "--out",
            &w.p("lora/taught-by-adapter"),
            "--max-steps",
            "2",
        ],
    );
}

#[test]
fn a_killed_lora_stage_with_dropout_resumes_to_the_same_adapter() {
    let w = world();
    // Dropout draws masks every step: resuming must draw the same ones.
    let args = |out: &str| -> Vec<String> {
        let mut extra: Vec<String> = [
            "--init",
            &w.p("student/pt"),
            "--teacher",
            &w.p("teacher/sft"),
            "--out",
            out,
            "--max-steps",
            "30",
            "--save-every",
            "3",
        ]
        .map(String::from)
        .to_vec();
        extra.extend(LORA.map(String::from));
        extra.extend(["--set".into(), "train.lora.dropout=0.1".into()]);
        w.stage_args("dft", &extra.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let full = w.p("lora/dft-full");
    run(&args(&full).iter().map(String::as_str).collect::<Vec<_>>());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&full).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["lora_dropout"], 0.1);
    // Without dropout the same run ends elsewhere: the masks did something.
    let plain = w.p("lora/dft-no-dropout");
    let mut no_dropout = args(&plain);
    no_dropout.truncate(no_dropout.len() - 2);
    run(&no_dropout.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = w.p("lora/dft-killed");
    let killed_dir = PathBuf::from(&killed);
    let interrupted = common::kill_after_first_checkpoint(&args(&killed), &killed_dir);
    assert!(
        interrupted,
        "the run finished before it could be killed; the test needs a longer run"
    );
    let mut resume = args(&killed);
    resume.push("--resume".into());
    run(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    let bytes = |d: &str| std::fs::read(Path::new(d).join("adapter_model.safetensors")).unwrap();
    assert!(
        bytes(&full) == bytes(&killed),
        "the resumed adapter differs"
    );

    // Distilling through adapters lowers the distillation terms.
    let ms = read_metrics(&Path::new(&full).join("metrics.jsonl")).unwrap();
    let term = |m: &mmkd::train::metrics::StepMetrics| m.terms.get("l_res");
    let first: f32 = ms[..5].iter().filter_map(term).sum::<f32>() / 5.0;
    let last: f32 = ms[ms.len() - 5..].iter().filter_map(term).sum::<f32>() / 5.0;
    assert!(last < first, "L_res {first} → {last}");
}

#[test]
fn bad_lora_settings_are_refused_before_training() {
    let w = world();
    let try_stage = |stage: &str, extra: &[&str]| {
        let args = w.stage_args(stage, extra);
        mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let init = w.p("student/pt");
    let (ok, _, err) = try_stage(
        "sft",
        &[
            "--init",
            &init,
            "--out",
            &w.p("lora/bad1"),
            "--set",
            "train.lora.targets=[\"qproj\"]",
        ],
    );
    assert!(
        !ok && err.contains("`qproj` names no linear layer") && err.contains("q_proj"),
        "{err}"
    );
    let (ok, _, err) = try_stage(
        "pretrain",
        &[
            "--tokenizer",
            &w.p("data/tokenizer.json"),
            "--out",
            &w.p("lora/bad2"),
            "--set",
            "train.lora.rank=4",
        ],
    );
    assert!(!ok && err.contains("pass --init DIR"), "{err}");
    let (ok, _, err) = try_stage(
        "sft",
        &[
            "--init",
            &init,
            "--out",
            &w.p("lora/bad3"),
            "--set",
            "train.lora.rank=0",
        ],
    );
    assert!(
        !ok && err.contains("train.lora.rank must be at least 1"),
        "{err}"
    );
    let (ok, _, err) = try_stage(
        "sft",
        &[
            "--init",
            &init,
            "--out",
            &w.p("lora/bad4"),
            "--set",
            "train.lora.dropout=1.0",
        ],
    );
    assert!(
        !ok && err.contains("train.lora.dropout must be in [0, 1)"),
        "{err}"
    );
}
