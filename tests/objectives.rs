//! Objectives composed in a preset, through the CLI: an objective of `ce` alone is SFT, step
//! for step; a custom objective logs its terms by name; an objective that needs a teacher
//! refuses to start without one, naming the term; bad objectives list what is valid.

mod common;

use common::mmkd;
use std::path::Path;

use common::world::{checkpointed_dft, metrics, ok, resumes_bit_exactly, stage, stage_ok, world};

#[test]
fn an_objective_of_ce_alone_is_sft_step_for_step() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    stage_ok(
        &w.root,
        "sft",
        &["--init", &s("student"), "--out", &s("ce/sft")],
    );
    // DFT without a teacher: its objective reads none.
    stage_ok(
        &w.root,
        "dft",
        &[
            "--init",
            &s("student"),
            "--out",
            &s("ce/dft"),
            "--set",
            "objective=[{ term = \"ce\" }]",
        ],
    );
    let (sft, dft) = (
        metrics(&w.root.join("ce/sft")),
        metrics(&w.root.join("ce/dft")),
    );
    assert!(sft.len() >= 4);
    assert_eq!(sft.len(), dft.len());
    for (a, b) in sft.iter().zip(&dft) {
        assert_eq!(
            (
                a.step,
                a.loss,
                a.terms.clone(),
                a.grad_norm,
                a.lr,
                a.samples
            ),
            (
                b.step,
                b.loss,
                b.terms.clone(),
                b.grad_norm,
                b.lr,
                b.samples
            ),
            "step {}",
            a.step
        );
    }
    let weights = |p: &str| std::fs::read(w.root.join(p).join("model.safetensors")).unwrap();
    assert!(
        weights("ce/sft") == weights("ce/dft"),
        "the trained weights differ"
    );
}

#[test]
fn a_custom_objective_logs_its_terms_by_name() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let objective = "objective=[{ term = \"ce\" }, { term = \"mdist.response\", \
                     divergence = \"reverse_kl\", name = \"rkl\", weight = 0.5 }, \
                     { term = \"rdist\", weight = 0.25 }]";
    stage_ok(
        &w.root,
        "dft",
        &[
            "--init",
            &s("student"),
            "--teacher",
            &s("teacher"),
            "--out",
            &s("custom/dft"),
            "--set",
            objective,
        ],
    );
    let dir = w.root.join("custom/dft");
    let first = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let first = first.lines().next().unwrap();
    let keys: Vec<&str> = [
        "\"loss\"",
        "\"ce\"",
        "\"rkl\"",
        "\"l_rel\"",
        "\"grad_norm\"",
    ]
    .into_iter()
    .collect();
    let at: Vec<usize> = keys.iter().map(|k| first.find(k).unwrap()).collect();
    assert!(
        at.windows(2).all(|p| p[0] < p[1]),
        "terms out of order: {first}"
    );
    assert!(
        !first.contains("l_res") && !first.contains("l_vis"),
        "{first}"
    );
    for m in metrics(&dir) {
        let (ce, rkl) = (m.term("ce").unwrap(), m.term("rkl").unwrap());
        let rel = m.term("l_rel").unwrap_or(0.0);
        let total = ce + 0.5 * rkl + 0.25 * rel;
        assert!(
            (m.loss - total).abs() <= 1e-5 * total.abs().max(1.0),
            "{m:?}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let names: Vec<&str> = summary["final_terms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[0].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ce", "rkl", "l_rel"]);
    assert_eq!(
        summary["settings"]["objective"][1]["divergence"],
        "reverse_kl"
    );
    assert!(dir.join("loss.png").exists());
}

#[test]
fn teachers_are_asked_for_by_the_objective() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    // DFT's built-in objective distils: without a teacher it names its first teacher term.
    let (ok, _, err) = stage(
        &w.root,
        "dft",
        &["--init", &s("student"), "--out", &s("t/1")],
    );
    assert!(
        !ok && err.contains("objective term `mdist.response`") && err.contains("--teacher"),
        "{err}"
    );
    // SFT with a distillation term needs one too, and then runs.
    let rdist = "objective=[{ term = \"ce\" }, { term = \"rdist\" }]";
    let (ok, _, err) = stage(
        &w.root,
        "sft",
        &["--init", &s("student"), "--out", &s("t/2"), "--set", rdist],
    );
    assert!(!ok && err.contains("objective term `rdist`"), "{err}");
    let (ok, _, err) = stage(
        &w.root,
        "sft",
        &[
            "--init",
            &s("student"),
            "--out",
            &s("t/3"),
            "--set",
            rdist,
            "--teacher",
            &s("teacher"),
        ],
    );
    assert!(ok, "{err}");
    assert!(metrics(&w.root.join("t/3"))
        .iter()
        .any(|m| m.term("l_rel").is_some()));
    // A teacher the objective does not read is refused, not silently ignored.
    let (ok, _, err) = stage(
        &w.root,
        "sft",
        &[
            "--init",
            &s("student"),
            "--out",
            &s("t/4"),
            "--teacher",
            &s("teacher"),
        ],
    );
    assert!(!ok && err.contains("reads no teacher"), "{err}");
}

#[test]
fn bad_objectives_in_a_preset_are_named() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let refused = |set: &str| {
        let (ok, _, err) = stage(
            &w.root,
            "dft",
            &[
                "--init",
                &s("student"),
                "--teacher",
                &s("teacher"),
                "--out",
                &s("bad"),
                "--set",
                set,
            ],
        );
        assert!(!ok, "{set} was accepted");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = refused("objective=[{ term = \"kld\" }]");
    assert!(
        err.contains("unknown objective term `kld`") && err.contains("mdist.visual"),
        "{err}"
    );
    let err = refused("objective=[{ term = \"ce\", wieght = 2.0 }]");
    assert!(
        err.contains("wieght") && err.contains("stages.dft.objective"),
        "{err}"
    );
    let err = refused("objective=[{ term = \"ce\", divergence = \"reverse_kl\" }]");
    assert!(err.contains("takes no `divergence`"), "{err}");
    let err = refused("objective=\"ce\"");
    assert!(err.contains("stages.dft.objective"), "{err}");
}

#[test]
fn a_cached_teacher_serves_only_the_temperature_it_was_written_at() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let (data, images) = (s("data/train/instruct.json"), s("data"));
    ok(&[
        "teacher-cache",
        "--config",
        "shapes-tiny",
        "--quiet",
        "--teacher",
        &s("teacher"),
        "--data",
        &data,
        "--images",
        &images,
        "--stage",
        "dft",
        "--top-k",
        "8",
        "--out",
        &s("cache"),
    ]);
    let cached = |out: &str, objective: &str| {
        stage(
            &w.root,
            "dft",
            &[
                "--init",
                &s("student"),
                "--teacher-cache",
                &s("cache"),
                "--out",
                &s(out),
                "--set",
                objective,
            ],
        )
    };
    let (ok, _, err) = cached(
        "cache/t2",
        "objective=[{ term = \"ce\" }, { term = \"mdist.response\", temperature = 2.0 }]",
    );
    assert!(
        !ok && err.contains("`mdist.response` reads the teacher at temperature 2"),
        "{err}"
    );
    let (ok, _, err) = cached(
        "cache/mse",
        "objective=[{ term = \"ce\" }, { term = \"logits.mse\", weight = 0.1 }]",
    );
    assert!(
        !ok && err.contains("`logits.mse` reads the teacher's full output"),
        "{err}"
    );
    // Hidden states and DBiLD's student-led half are beyond a cache too.
    for (out, term, name) in [
        ("cache/hidden", "{ term = \"hidden\" }", "hidden"),
        (
            "cache/dbild",
            "{ term = \"mdist.response\", divergence = \"dbild\" }",
            "mdist.response",
        ),
    ] {
        let (ok, _, err) = cached(out, &format!("objective=[{{ term = \"ce\" }}, {term}]"));
        assert!(
            !ok && err.contains(&format!(
                "`{name}` reads the teacher's full output (its logits or hidden states)"
            )),
            "{err}"
        );
    }
    let (ok, _, err) = cached(
        "cache/t1",
        "objective=[{ term = \"ce\" }, { term = \"mdist.visual\", divergence = \"reverse_kl\" }]",
    );
    assert!(ok, "{err}");
    assert!(metrics(&w.root.join("cache/t1"))
        .iter()
        .any(|m| m.term("l_vis").is_some()));
}

#[test]
fn the_validation_pass_measures_held_out_data_and_changes_no_trained_number() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let common = ["--init", &s("student"), "--teacher", &s("teacher")];
    let (val_data, questions, answers) = (
        s("data/val/instruct.json"),
        s("data/val/questions.jsonl"),
        s("data/val/answers.jsonl"),
    );
    let plain_out = s("val/plain");
    let mut plain = common.to_vec();
    plain.extend(["--out", &plain_out]);
    stage_ok(&w.root, "dft", &plain);
    let validated_out = s("val/validated");
    let mut validated = common.to_vec();
    validated.extend([
        "--out",
        &validated_out,
        "--val-data",
        &val_data,
        "--val-questions",
        &questions,
        "--val-answers",
        &answers,
        "--validate-every",
        "3",
    ]);
    stage_ok(&w.root, "dft", &validated);

    let (a, b) = (
        metrics(&w.root.join("val/plain")),
        metrics(&w.root.join("val/validated")),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.loss, x.terms.clone(), x.grad_norm),
            (y.loss, y.terms.clone(), y.grad_norm)
        );
    }
    let weights = |p: &str| std::fs::read(w.root.join(p).join("model.safetensors")).unwrap();
    assert!(weights("val/plain") == weights("val/validated"));

    let passes =
        mmkd::stages::validate::read_validation(&w.root.join("val/validated/validation.jsonl"))
            .unwrap();
    let total = b.len();
    let mut expected: Vec<usize> = (3..=total).step_by(3).collect();
    if expected.last() != Some(&total) {
        expected.push(total);
    }
    assert_eq!(passes.iter().map(|p| p.step).collect::<Vec<_>>(), expected);
    let held_out = std::fs::read_to_string(&val_data).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_str(&held_out).unwrap();
    let questions_in_file = std::fs::read_to_string(&questions).unwrap().lines().count();
    for p in &passes {
        let loss = p.loss.unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{p:?}");
        assert_eq!(p.samples, records.len());
        // With an online teacher the held-out objective is the whole objective.
        assert!(
            p.terms.get("ce").is_some() && p.terms.get("l_res").is_some(),
            "{p:?}"
        );
        assert_eq!(p.vqa_questions, questions_in_file.min(200));
        let acc = p.vqa_accuracy.unwrap();
        assert!((0.0..=100.0).contains(&acc), "{acc}");
    }
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.root.join("val/validated/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["validation"]["step"], total);

    // With the loss in chunks (the teacher's forward stopping at its hidden states) the
    // held-out objective is the same.
    let chunked_out = s("val/chunked");
    let mut chunked = validated.clone();
    chunked[validated.iter().position(|a| *a == validated_out).unwrap()] = chunked_out.as_str();
    chunked.extend(["--set", "loss_chunk_rows=4"]);
    stage_ok(&w.root, "dft", &chunked);
    let chunked_passes =
        mmkd::stages::validate::read_validation(&w.root.join("val/chunked/validation.jsonl"))
            .unwrap();
    assert_eq!(chunked_passes.len(), passes.len());
    for (p, q) in passes.iter().zip(&chunked_passes) {
        let (x, y) = (p.loss.unwrap(), q.loss.unwrap());
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "step {}: {x} vs {y}",
            p.step
        );
    }

    // Asking for validation without held-out data is refused up front.
    let (ok, _, err) = stage(
        &w.root,
        "dft",
        &[
            "--init",
            &s("student"),
            "--teacher",
            &s("teacher"),
            "--out",
            &s("val/none"),
            "--validate-every",
            "2",
        ],
    );
    assert!(!ok && err.contains("nothing to validate on"), "{err}");
}

#[test]
fn the_device_is_a_setting_and_a_missing_backend_is_named() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let (ok, _, err) = stage(
        &w.root,
        "sft",
        &[
            "--init",
            &s("student"),
            "--out",
            &s("dev/gpu"),
            "--device",
            "gpu",
        ],
    );
    assert!(
        !ok && err.contains("unknown device `gpu` (cpu, cuda, cuda:N)"),
        "{err}"
    );
    if !candle_core::utils::cuda_is_available() {
        let (ok, _, err) = stage(
            &w.root,
            "sft",
            &[
                "--init",
                &s("student"),
                "--out",
                &s("dev/cuda"),
                "--device",
                "cuda:0",
            ],
        );
        assert!(!ok && err.contains("built without CUDA"), "{err}");
        let (ok, _, err) = mmkd(&["inspect", &s("student")]);
        assert!(ok, "{err}");
        let (ok, _, err) = mmkd(&[
            "generate",
            "--model",
            &s("student"),
            "--prompt",
            "hi",
            "--device",
            "cuda",
        ]);
        assert!(!ok && err.contains("built without CUDA"), "{err}");
    }
    stage_ok(
        &w.root,
        "sft",
        &[
            "--init",
            &s("student"),
            "--out",
            &s("dev/cpu"),
            "--device",
            "cpu",
            "--max-steps",
            "1",
        ],
    );
}

#[test]
fn finished_work_is_not_overwritten_without_force() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let out = s("done/sft");
    let args = ["--init", &s("student"), "--out", &out, "--max-steps", "2"];
    stage_ok(&w.root, "sft", &args);
    let before = std::fs::read(w.root.join("done/sft/model.safetensors")).unwrap();
    let (ok, _, err) = stage(&w.root, "sft", &[&args[..], &["--set", "lr=0.5"]].concat());
    assert!(
        !ok && err.contains("holds a finished stage") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(w.root.join("done/sft/model.safetensors")).unwrap(),
        before
    );
    // --force trains again from scratch and replaces it.
    stage_ok(
        &w.root,
        "sft",
        &[&args[..], &["--set", "lr=0.5", "--force"]].concat(),
    );
    assert_ne!(
        std::fs::read(w.root.join("done/sft/model.safetensors")).unwrap(),
        before
    );
    assert_eq!(metrics(&w.root.join("done/sft")).len(), 2);
}

#[test]
fn the_data_seed_and_the_init_seed_are_two_flags() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let tok = s("data/tokenizer.json");
    let run = |out: &str, flag: &str| -> serde_json::Value {
        let out = s(out);
        stage_ok(
            &w.root,
            "pretrain",
            &[
                "--tokenizer",
                &tok,
                "--out",
                &out,
                "--max-steps",
                "1",
                flag,
                "7",
            ],
        );
        serde_json::from_str(
            &std::fs::read_to_string(Path::new(&out).join("summary.json")).unwrap(),
        )
        .unwrap()
    };
    let data = run("seeds/data", "--seed");
    assert_eq!(data["settings"]["train"]["seed"], 7);
    assert_eq!(
        data["settings"]["model"]["seed"], 2,
        "the preset's student seed"
    );
    let init = run("seeds/init", "--init-seed");
    assert_eq!(init["settings"]["train"]["seed"], 0);
    assert_eq!(init["settings"]["model"]["seed"], 7);
}

#[test]
fn a_model_carries_its_template_and_a_different_one_is_named() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.root.join("teacher/mmkd_training.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["template_name"], "compact");
    assert_eq!(
        (record["stage"].as_str(), record["chat"].as_bool()),
        (Some("sft"), Some(true))
    );
    assert_eq!(record["max_length"], 160);

    // eval without --template answers in the model's template (compact: no system prompt).
    let eval = |out: &str, extra: &[&str]| {
        let (out, questions, images) = (s(out), s("data/val/questions.jsonl"), s("data"));
        let model = s("teacher");
        let mut args = vec![
            "eval",
            "vqa",
            "--model",
            &model,
            "--images",
            &images,
            "--questions",
            &questions,
            "--out",
            &out,
            "--max-new-tokens",
            "3",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = mmkd(&args);
        assert!(ok, "{err}");
        let first = std::fs::read_to_string(Path::new(&out).join("predictions.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        (line["prompt"].as_str().unwrap().to_string(), err)
    };
    let (prompt, err) = eval("tmpl/own", &[]);
    assert!(prompt.starts_with("USER: "), "{prompt}");
    assert!(!err.contains("warning"), "{err}");
    let (prompt, err) = eval("tmpl/phi", &["--template", "phi"]);
    assert!(prompt.starts_with("A chat between"), "{prompt}");
    assert!(
        err.contains("warning: --template phi differs") && err.contains("compact"),
        "{err}"
    );

    // generate and score take it too; `plain` against a chat model is named.
    let (ok, _, err) = mmkd(&[
        "generate",
        "--model",
        &s("teacher"),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok && !err.contains("warning"), "{err}");
    let (ok, _, err) = mmkd(&[
        "generate",
        "--model",
        &s("teacher"),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--template",
        "plain",
    ]);
    assert!(
        ok && err.contains("warning: --template plain") && err.contains("compact"),
        "{err}"
    );

    // A stage that continues the model with another chat template says so.
    let (ok, _, err) = stage(
        &w.root,
        "sft",
        &[
            "--init",
            &s("teacher"),
            "--out",
            &s("tmpl/sft"),
            "--max-steps",
            "1",
            "--set",
            "data.chat_template=\"phi\"",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("trains with template phi, the model was trained with compact"),
        "{err}"
    );
}

#[test]
fn config_keys_and_show_print_what_a_stage_resolves_to() {
    let (ok, out, err) = mmkd(&["config", "keys", "shapes-small", "--stage", "dft"]);
    assert!(ok, "{err}");
    for key in mmkd::config::keys::KEYS {
        assert!(
            out.contains(&format!("`{}`", key.key)),
            "{} missing",
            key.key
        );
    }
    assert!(
        out.contains("| `distill.gamma_rel` | float | `0.5` |"),
        "{out}"
    );
    // The role table sets the teacher's SFT lr; a --set wins over it.
    let show = |extra: &[&str]| {
        let mut args = vec![
            "config",
            "show",
            "shapes-small",
            "--stage",
            "sft",
            "--role",
            "teacher",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = mmkd(&args);
        assert!(ok, "{err}");
        let settings: toml::Table = toml::from_str(&out).unwrap();
        settings["train"]["lr"].as_float().unwrap()
    };
    assert_eq!(show(&[]), 1e-3);
    assert_eq!(show(&["--set", "lr=0.5"]), 0.5);
    let (ok, _, err) = mmkd(&[
        "config",
        "show",
        "shapes-small",
        "--set",
        "train.bacth_size=2",
    ]);
    assert!(!ok && err.contains("bacth_size"), "{err}");
}

#[test]
fn data_check_reads_its_settings_from_a_model_or_preset_and_groups_problems() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let (data, images) = (s("data/train/instruct.json"), s("data"));
    // From the model: template, tokenizer, tokens per image and max length.
    let (ok, out, err) = mmkd(&[
        "data",
        "check",
        "--data",
        &data,
        "--images",
        &images,
        "--model",
        &s("teacher"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tokens per sample: min "), "{out}");
    let tokens_line = |out: &str| {
        out.lines()
            .find(|l| l.contains("tokens per sample"))
            .unwrap_or_default()
            .to_string()
    };
    let from_model = tokens_line(&out);
    // From the preset's stage (the tokenizer given): the same counts, the image blocks sized
    // by the preset's fresh tower.
    let tok = s("data/tokenizer.json");
    let (ok, out, err) = mmkd(&[
        "data",
        "check",
        "--data",
        &data,
        "--images",
        &images,
        "--config",
        "shapes-tiny",
        "--stage",
        "dft",
        "--tokenizer",
        &tok,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tokens per sample: min "), "{out}");
    assert_eq!(tokens_line(&out), from_model);
    // A file that is not LLaVA data: every record has the same problem; a few are shown by
    // their question ids, the rest counted.
    let questions = s("data/val/questions.jsonl");
    let (ok, out, _) = mmkd(&[
        "data", "check", "--data", &questions, "--images", &images, "--show", "3",
    ]);
    assert!(!ok);
    assert!(!out.contains("(no id)"), "{out}");
    assert!(out.contains("sample \"0\""), "{out}");
    let records = std::fs::read_to_string(&questions).unwrap().lines().count();
    assert!(
        out.contains(&format!("… and {} more", records - 3)),
        "{out}"
    );
    assert!(out.lines().count() < 20, "{out}");
}

#[test]
fn a_stage_says_where_each_setting_came_from() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let (data, images, init, out) = (
        s("data/train/instruct.json"),
        s("data"),
        s("student"),
        s("sources/sft"),
    );
    let (ok, _, err) = mmkd(&[
        "sft",
        "--config",
        "shapes-tiny",
        "--data",
        &data,
        "--images",
        &images,
        "--init",
        &init,
        "--out",
        &out,
        "--max-steps",
        "1",
        "--set",
        "lr=0.5",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("train.lr = 0.5  (--set)"), "{err}");
    assert!(
        err.contains("train.batch_size = 4  (preset `shapes-tiny` [train])"),
        "{err}"
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["settings_source"]["train.lr"], "--set");
    assert_eq!(
        summary["settings_source"]["train.validate_every"],
        "default"
    );
    assert_eq!(
        summary["settings_source"]["data.chat_template"],
        "preset `shapes-tiny` [data]"
    );
}

#[test]
fn a_second_run_on_the_same_out_is_refused_and_the_first_runs_work_is_untouched() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let out = s("locked/sft");
    std::fs::create_dir_all(&out).unwrap();
    // A run in progress on `out` (this test process stands in for it).
    let lock = Path::new(&out).join(".mmkd-lock");
    std::fs::write(
        &lock,
        format!("{}\nmmkd sft --out {out}\n", std::process::id()),
    )
    .unwrap();
    std::fs::write(Path::new(&out).join("metrics.jsonl"), "the first run's\n").unwrap();
    let (data, images, init) = (s("data/train/instruct.json"), s("data"), s("student"));
    let args = [
        "sft",
        "--config",
        "shapes-tiny",
        "--data",
        &data,
        "--images",
        &images,
        "--init",
        &init,
        "--out",
        &out,
        "--max-steps",
        "1",
        "--quiet",
    ];
    let (ok, _, err) = mmkd(&args);
    assert!(!ok);
    assert!(
        err.contains("in use by another mmkd run")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(Path::new(&out).join("metrics.jsonl")).unwrap(),
        "the first run's\n"
    );
    // Once that run is gone, its lock is stale and the stage runs.
    std::fs::remove_file(Path::new(&out).join("metrics.jsonl")).unwrap();
    std::fs::write(&lock, "999999999\nmmkd sft\n").unwrap();
    let (ok, _, err) = mmkd(&args);
    assert!(ok, "{err}");
    assert!(!lock.exists(), "the lock outlived its run");
}

#[test]
fn hidden_state_distillation_trains_its_projections_resumes_bit_exactly_and_ships_none() {
    let w = world();
    // With the visual switch too: its bridge is training state as well.
    let objective =
        "objective=[{ term = \"ce\" }, { term = \"hidden\", layers = [[0, 0], [1, 2]], \
                     positions = \"both\", dynamic = true, weight = 0.5 }, \
                     { term = \"mdist.response\", divergence = { kind = \"dbild\", max_k = 8 } }, \
                     { term = \"switch\" }]";
    let args = |out: &str| checkpointed_dft(w, "teacher", out, objective);
    resumes_bit_exactly(args, "hidden/full", "hidden/killed");
    let dir = w.root.join("hidden/full");
    let logged = metrics(&dir);
    assert!(logged
        .iter()
        .all(|m| m.terms.get("l_hidden").is_some_and(f32::is_finite)
            && m.terms.get("l_res").is_some_and(f32::is_finite)));
    // The projections are training state: in every checkpoint, never in the student.
    let state = candle_core::safetensors::load(
        dir.join("checkpoints/step-00000002/objective.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = state.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "objective.l_hidden.proj_0_0.weight",
            "objective.l_hidden.proj_1_2.weight",
            "objective.l_switch.bridge.weight"
        ]
    );
    assert_eq!(state[names[0]].dims(), [64, 32]);
    let shipped =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(shipped.keys().all(|k| !k.starts_with("objective")));
    // The projections moved from their first checkpoint to the next.
    let later = candle_core::safetensors::load(
        dir.join("checkpoints/step-00000004/objective.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(values(&state[names[1]]), values(&later[names[1]]));

    // A layer the student does not have is named before training.
    let mut bad = args("hidden/bad");
    *bad.last_mut().unwrap() =
        "objective=[{ term = \"ce\" }, { term = \"hidden\", layers = [[3, 1]] }]".into();
    let (ok, _, err) = mmkd(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    assert!(
        err.contains("`layers` entry 0 ([3, 1]) names student layer 3; the student has 1 layers"),
        "{err}"
    );
}

#[test]
fn switch_kd_from_the_cli_logs_its_terms_and_keeps_the_bridge_in_the_training_state() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    // The `switch-kd` preset's DFT objective on the tiny world.
    let objective = "objective=[{ term = \"ce\" }, { term = \"mdist.response\", divergence = \
                     { kind = \"dbild\", max_k = 16 } }, { term = \"switch\", divergence = \
                     { kind = \"dbild\", max_k = 16 } }]";
    stage_ok(
        &w.root,
        "dft",
        &[
            "--init",
            &s("student"),
            "--teacher",
            &s("teacher"),
            "--out",
            &s("switch/dft"),
            "--max-steps",
            "4",
            "--set",
            "train.save_every=2",
            "--set",
            objective,
        ],
    );
    let dir = w.root.join("switch/dft");
    let logged = metrics(&dir);
    assert_eq!(logged.len(), 4);
    for m in &logged {
        for term in ["ce", "l_res"] {
            assert!(
                m.terms.get(term).is_some_and(|v| v.is_finite() && v >= 0.0),
                "step {}: {term} = {:?}",
                m.step,
                m.terms.get(term)
            );
        }
    }
    // Batches of text-only samples have no visual token to switch.
    let switched: Vec<f32> = logged
        .iter()
        .filter_map(|m| m.terms.get("l_switch"))
        .collect();
    assert!(switched.len() >= 2, "{logged:?}");
    assert!(switched.iter().all(|v| v.is_finite() && *v >= 0.0));
    let state = candle_core::safetensors::load(
        dir.join("checkpoints/step-00000002/objective.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // Student width 32 → teacher width 64.
    assert_eq!(
        state["objective.l_switch.bridge.weight"].dims(),
        [64, 32],
        "{:?}",
        state.keys()
    );
}

#[test]
fn a_teacher_with_another_tokenizer_is_distilled_by_uld_and_refused_by_one_vocabulary_terms() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let dft = |out: &str, objective: &str| {
        stage(
            &w.root,
            "dft",
            &[
                "--init",
                &s("student"),
                "--teacher",
                &s("teacher-b"),
                "--out",
                &s(out),
                "--max-steps",
                "4",
                "--set",
                objective,
            ],
        )
    };
    // LLaVA-KD's terms compare token by token: refused, naming the first.
    let (ok, _, err) = dft(
        "uld/llava-kd",
        "objective=[{ term = \"ce\" }, { term = \"mdist.response\" }]",
    );
    assert!(!ok);
    assert!(
        err.contains("the teacher's tokenizer is not the student's (")
            && err.contains("objective term `mdist.response` compares the two token by token"),
        "{err}"
    );
    for (out, uld) in [
        ("uld/sorted", "{ term = \"uld\" }"),
        (
            "uld/exact",
            "{ term = \"uld\", vocab_match = \"exact\", divergence = \"reverse_kl\" }",
        ),
        (
            "uld/position",
            "{ term = \"uld\", alignment = \"position\", temperature = 2.0 }",
        ),
    ] {
        let (ok, _, err) = dft(out, &format!("objective=[{{ term = \"ce\" }}, {uld}]"));
        assert!(ok, "{out}: {err}");
        let logged = metrics(&w.root.join(out));
        assert_eq!(logged.len(), 4);
        assert!(
            logged.iter().all(|m| m
                .terms
                .get("l_uld")
                .is_some_and(|v| v.is_finite() && v > 0.0)),
            "{out}: {logged:?}"
        );
    }
    // Killed after its first checkpoint and resumed: the same student as an uninterrupted run.
    let objective = "objective=[{ term = \"ce\" }, { term = \"uld\" }]";
    resumes_bit_exactly(
        |out| checkpointed_dft(w, "teacher-b", out, objective),
        "uld/full",
        "uld/killed",
    );

    // With the student's own teacher (one tokenizer) ULD runs on the response rows.
    let (ok, _, err) = stage(
        &w.root,
        "dft",
        &[
            "--init",
            &s("student"),
            "--teacher",
            &s("teacher"),
            "--out",
            &s("uld/same"),
            "--max-steps",
            "2",
            "--set",
            "objective=[{ term = \"ce\" }, { term = \"uld\" }]",
        ],
    );
    assert!(ok, "{err}");
}

#[test]
fn two_tokenizations_of_a_response_line_up_where_their_tokens_start_together() {
    use mmkd::distill::align::{align, Alignment};
    use mmkd_datasets::{
        load_tokenizer, tokenize_sample, LlavaDataset, Template, TokenizeConfig, Truncation,
    };
    let w = world();
    let dataset = LlavaDataset::read(
        &w.root.join("data/train/instruct.json"),
        &w.root.join("data"),
    )
    .unwrap();
    let template = Template::by_name_or_path("compact").unwrap();
    let student = load_tokenizer(&w.root.join("data/tokenizer.json")).unwrap();
    let mut teacher = load_tokenizer(&w.root.join("data/tokenizer-b.json")).unwrap();
    // Other merges (another vocabulary size) and other special tokens: one more, which shifts
    // nothing in the text but gives the teacher ids the student does not have.
    teacher.add_special_tokens(&[tokenizers::AddedToken::from("<|teacher_only|>", true)]);
    assert_ne!(student.get_vocab(true), teacher.get_vocab(true));
    let cfg = |tok: &tokenizers::Tokenizer| TokenizeConfig {
        image_token_id: tok.token_to_id("<image>").unwrap(),
        tokens_per_image: 4,
        max_length: 4096,
        truncation: Truncation::Truncate,
    };
    let mut differing = 0;
    for sample in dataset.samples.iter().take(12) {
        let a = tokenize_sample(sample, &student, &template, &cfg(&student)).unwrap();
        let b = tokenize_sample(sample, &teacher, &template, &cfg(&teacher)).unwrap();
        let answer = |t: &mmkd_datasets::TokenizedSample| -> Vec<u32> {
            t.labels
                .iter()
                .filter(|&&l| l >= 0)
                .map(|&l| l as u32)
                .collect()
        };
        let (ta, tb) = (answer(&a), answer(&b));
        if ta.len() != tb.len() {
            differing += 1;
        }
        let pairs = align(&a.answer_offsets, &b.answer_offsets, Alignment::Text);
        assert!(!pairs.is_empty(), "{}", a.id);
        assert_eq!(pairs[0], (0, 0), "both answers start together");
        // Every pair predicts the same text: what each has decoded before it is the same.
        for (i, j) in pairs {
            let before_a = student.decode(&ta[..i], false).unwrap();
            let before_b = teacher.decode(&tb[..j], false).unwrap();
            assert_eq!(
                before_a.replace(' ', ""),
                before_b.replace(' ', ""),
                "{}: pair ({i}, {j})",
                a.id
            );
            assert_eq!(a.answer_offsets[i], b.answer_offsets[j]);
        }
    }
    assert!(differing > 0, "the two tokenizers split the answers alike");
}

#[test]
fn a_student_drafts_for_its_teacher_without_changing_the_teachers_answer() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let records: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(w.root.join("data/train/instruct.json")).unwrap(),
    )
    .unwrap();
    let image = records
        .iter()
        .find_map(|r| r["image"].as_str())
        .expect("an instruction with an image");
    let generate = |extra: &[&str]| {
        let image = s(&format!("data/{image}"));
        let teacher = s("teacher");
        let mut args = vec![
            "generate",
            "--model",
            &teacher,
            "--template",
            "compact",
            "--image",
            &image,
            "--prompt",
            "What shape is in the top left cell?",
            "--max-new-tokens",
            "12",
            "--show-ids",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = mmkd(&args);
        assert!(ok, "{err}");
        (out, err)
    };
    let (alone, _) = generate(&[]);
    let (drafted, err) = generate(&["--draft", &s("student"), "--gamma", "3"]);
    assert_eq!(drafted, alone, "the draft changed the answer");
    assert!(
        err.contains("speculative: γ 3, ") && err.contains("proposals accepted"),
        "{err}"
    );
    // A draft with another tokenizer cannot draft.
    let (ok, _, err) = mmkd(&[
        "generate",
        "--model",
        &s("teacher"),
        "--template",
        "compact",
        "--prompt",
        "Hello",
        "--draft",
        &s("teacher-b"),
    ]);
    assert!(
        !ok && err.contains("its tokenizer or prompt layout is not the model's"),
        "{err}"
    );
}

#[test]
fn eval_records_how_often_a_draft_proposes_what_the_model_answers() {
    let w = world();
    let s = |p: &str| w.root.join(p).to_str().unwrap().to_string();
    let out = s("eval-drafted");
    let (ok, stdout, err) = mmkd(&[
        "eval",
        "vqa",
        // The world's briefly trained teacher stops at once on these questions; the
        // pre-trained student answers at length, so it is the model here, the teacher its
        // draft (any model of the same tokenizer can draft).
        "--model",
        &s("student"),
        "--images",
        &s("data"),
        "--questions",
        &s("data/test/questions.jsonl"),
        "--answers",
        &s("data/test/answers.jsonl"),
        "--max-new-tokens",
        "6",
        "--out",
        &out,
        "--quiet",
        "--draft",
        &s("teacher"),
        "--gamma",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("speculative with"), "{stdout}");
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("speculative.json")).unwrap(),
    )
    .unwrap();
    let (proposed, accepted) = (
        record["proposed"].as_u64().unwrap(),
        record["accepted"].as_u64().unwrap(),
    );
    assert!(proposed > 0 && accepted <= proposed, "{record}");
    assert_eq!(record["gamma"], 3);
    let rate = record["acceptance_rate"].as_f64().unwrap();
    assert!((rate - accepted as f64 / proposed as f64).abs() < 1e-12);
}
