//! `mmkd demo` end to end on the tiny preset: every stage, evaluation and report, and a re-run
//! that skips finished work.

mod common;

use common::mmkd;

/// A tower tensor's name below the tower, whatever the checkpoint layout.
fn tower_key(name: &str) -> String {
    let below = name
        .rsplit_once("vision_tower.")
        .map_or(name, |(_, rest)| rest);
    below
        .strip_prefix("vision_model.")
        .unwrap_or(below)
        .to_string()
}

#[test]
fn tiny_demo_writes_both_reports_and_reruns_skip_finished_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let out_s = out.to_str().unwrap();
    let (ok, stdout, err) = mmkd(&["demo", "--preset", "shapes-tiny", "--out", out_s]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("| teacher |") && stdout.contains("Verdict"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["preset"], "shapes-tiny");
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0);
    for model in ["teacher", "baseline", "distilled"] {
        let r = &report["results"][model];
        for key in ["vqa_accuracy", "caption_cider", "pope_f1"] {
            let v = r[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v >= 0.0, "{model}.{key} = {v}");
        }
        assert!(r["params"].as_u64().unwrap() > 0);
    }
    // Same architecture and step budget for both students; the teacher is larger.
    assert_eq!(
        report["results"]["baseline"]["params"],
        report["results"]["distilled"]["params"]
    );
    assert!(
        report["results"]["teacher"]["params"].as_u64()
            > report["results"]["baseline"]["params"].as_u64()
    );
    let steps = |stage: &str| -> u64 {
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("seed-0").join(stage).join("summary.json")).unwrap(),
        )
        .unwrap();
        s["steps"].as_u64().unwrap()
    };
    assert_eq!(steps("baseline/pt"), steps("distilled/dpt"));
    assert_eq!(
        steps("baseline/sft"),
        steps("distilled/sft") + steps("distilled/dft")
    );
    // LLaVA-KD's models share one vision encoder: both students carry the teacher's tower.
    let tower = |model: &str| -> Vec<(String, Vec<u8>)> {
        let bytes =
            std::fs::read(out.join("seed-0").join(model).join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut weights: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .filter(|(name, _)| name.contains("vision_tower"))
            .map(|(name, view)| (tower_key(&name), view.data().to_vec()))
            .collect();
        weights.sort();
        weights
    };
    let teacher_tower = tower("teacher/sft");
    assert!(!teacher_tower.is_empty());
    // ... which is the tower pre-trained in the demo's first stage (saved standalone, with
    // transformers' `SiglipVisionModel` names).
    let pretrained = {
        let bytes = std::fs::read(out.join("seed-0/tower/model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut weights: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (tower_key(&name), view.data().to_vec()))
            .collect();
        weights.sort();
        weights
    };
    assert!(
        pretrained == teacher_tower,
        "the teacher's tower is not the pre-trained one"
    );
    let tower_summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("seed-0/tower/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tower_summary["settings"]["epochs"], 1, "{tower_summary}");
    assert_eq!(tower_summary["objective"], "labels", "{tower_summary}");
    assert!(tower_summary["scale"].as_f64().unwrap() > 0.0);
    assert!(
        tower("baseline/sft") == teacher_tower,
        "the baseline's tower differs"
    );
    assert!(
        tower("distilled/dft") == teacher_tower,
        "the distilled tower differs"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("loss.png") && md.contains("report_images/"),
        "report lacks curves or examples"
    );
    assert!(
        md.contains("`mmkd tower --objective labels`")
            && md.contains("val patches classified right"),
        "the report does not say how the tower was made"
    );
    for stage in [
        "teacher/pt",
        "teacher/sft",
        "baseline/pt",
        "baseline/sft",
        "distilled/dpt",
        "distilled/sft",
        "distilled/dft",
    ] {
        assert!(
            out.join("seed-0").join(stage).join("loss.png").exists(),
            "{stage}"
        );
    }

    let before = std::fs::metadata(out.join("seed-0/teacher/sft/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    // A rerun skips what is finished; opt-in methods add their rows next to LLaVA-KD's. The
    // tiny teacher answers nothing greedily: the data rows' recipe samples (and has no answer
    // set), so that it writes something to train on.
    let recipe = tmp.path().join("sampled.toml");
    std::fs::write(
        &recipe,
        "name = \"sampled\"\nseed_file = \"sampled.seed.jsonl\"\n\
         templates = [\"What color is the {shape}?\", \"How many shapes are there?\"]\n\
         [generation]\nn_per_image = 2\nmax_tokens = 24\ntemperature = 1.0\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("sampled.seed.jsonl"),
        "{\"shape\": \"circle\"}\n{\"shape\": \"star\"}\n",
    )
    .unwrap();
    let recipe_set = format!("demo.data_recipe={}", recipe.display());
    let (ok, _, err) = mmkd(&[
        "demo",
        "--preset",
        "shapes-tiny",
        "--out",
        out_s,
        "--methods",
        "lora,merge,switch,hidden,uld,gkd,minillm,rl,moe,data",
        "--self-improve",
        "1",
        "--set",
        &recipe_set,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("done earlier, skipped"), "{err}");
    assert!(err.contains("tower: done earlier, skipped"), "{err}");
    assert!(out
        .join("seed-0/distilled-lora/adapter_config.json")
        .exists());
    assert!(out.join("seed-0/merged/merge.json").exists());
    assert!(out.join("seed-0/merged-sft/merge.json").exists());
    // The ULD row's teacher learnt on another tokenizer; the others' DFTs kept their terms.
    assert!(out.join("data/tokenizer-other.json").exists());
    let other =
        std::fs::read_to_string(out.join("seed-0/teacher-other/sft/tokenizer.json")).unwrap();
    let own = std::fs::read_to_string(out.join("seed-0/teacher/sft/tokenizer.json")).unwrap();
    assert_ne!(other, own);
    for (row, term) in [
        ("switch-kd", "l_switch"),
        ("distilled-hidden", "l_hidden"),
        ("uld", "l_uld"),
        ("gkd", "l_gkd"),
        ("minillm", "l_single"),
        ("rl", "l_pg"),
        ("rl-kd", "l_pg"),
    ] {
        let metrics =
            std::fs::read_to_string(out.join("seed-0").join(row).join("metrics.jsonl")).unwrap();
        assert!(
            metrics.contains(&format!("\"{term}\":")),
            "{row}: {metrics}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for row in [
        "distilled-lora",
        "merged",
        "merged-sft",
        "switch-kd",
        "distilled-hidden",
        "uld",
        "gkd",
        "minillm",
        "rl",
        "rl-kd",
    ] {
        let acc = report["results"][row]["vqa_accuracy"].as_f64().unwrap();
        // Every student drafted for its teacher.
        let drafted = report["results"][row]["draft_acceptance_per_seed"][0]
            .as_f64()
            .unwrap();
        assert!((0.0..=100.0).contains(&drafted), "{row}: {drafted}");
        assert!((0.0..=100.0).contains(&acc), "{row}: {acc}");
        assert_eq!(
            report["results"][row]["params"], report["results"]["distilled"]["params"],
            "{row}"
        );
    }
    assert_eq!(report["methods"][0]["row"], "distilled-lora");
    // Data distillation: the teacher's data (the served teacher's the same), the selections,
    // the self-improvement round and its control, each evaluated.
    let comparison: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("seed-0/written-data/comparison.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(comparison["identical"], true, "{comparison}");
    assert!(comparison["served_records"].as_u64().unwrap() > 0);
    for row in [
        "pretrained",
        "written",
        "select-10",
        "random-10",
        "select-25",
        "random-25",
        "sft-more",
        "self-1",
    ] {
        let acc = report["results"][row]["vqa_accuracy"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&acc), "{row}: {acc}");
    }
    let selected: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(out.join("seed-0/selection/select-10.json")).unwrap(),
    )
    .unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(out.join("data/train/instruct.json")).unwrap(),
    )
    .unwrap();
    assert!(!selected.is_empty() && selected.len() * 5 < all.len());
    assert!(
        report["data_distillation"]["vqa_differences"]["self-1 − sft-more"]["per_seed"].is_array()
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| distilled-lora |")
            && md.contains("**merged:** merged − distilled")
            && md.contains("| uld |")
            && md.contains("DFT s/step")
            && md.contains("draft acc. (%)")
            && md.contains("| rl-kd |")
            && md.contains("## Data distillation")
            && md.contains("| self-1 |")
            && md.contains("identical to the local teacher's"),
        "{md}"
    );
    // The MoE rows: a Qwen2-MoE teacher, dense students from each aggregation and at random,
    // with and without knowledge augmentation, each with its step time and memory.
    let moe_config =
        std::fs::read_to_string(out.join("seed-0/teacher-moe/sft/config.json")).unwrap();
    assert!(moe_config.contains("\"qwen2_moe\""), "{moe_config}");
    for row in mmkd::demo::moe::ROWS {
        let r = &report["results"][row];
        assert!(
            (0.0..=100.0).contains(&r["vqa_accuracy"].as_f64().unwrap()),
            "{row}"
        );
        let cost = &report["moe"]["cost"][row];
        assert!(
            cost["seconds_per_step_per_seed"][0].as_f64().unwrap() > 0.0,
            "{row}"
        );
        assert!(
            cost["peak_rss_mib_per_seed"][0].as_f64().unwrap() > 1.0,
            "{row}"
        );
    }
    for init in ["usage-avg", "top-k", "svd"] {
        let record = out.join(format!("seed-0/moe-init/{init}/moe_to_dense.json"));
        assert!(record.exists(), "{init}");
        let ka = std::fs::read_to_string(
            out.join(format!("seed-0/moe-dense/dense-{init}-ka/summary.json")),
        )
        .unwrap();
        assert!(ka.contains("\"teacher_routings\": 3"), "{init}");
    }
    assert!(
        md.contains("## Sparse → dense")
            && md.contains("dense-svd-ka − dense-svd")
            && md.contains("peak RSS (MiB)"),
        "{md}"
    );
    let after = std::fs::metadata(out.join("seed-0/teacher/sft/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "a finished stage was trained again");
}

#[test]
fn first_seed_runs_only_the_seeds_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let args = [
        "demo",
        "--preset",
        "shapes-tiny",
        "--quiet",
        "--first-seed",
        "2",
    ];
    let (ok, _, err) = mmkd(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    assert!(out.join("seed-2/distilled/dft/model.safetensors").exists());
    assert!(!out.join("seed-0").exists() && !out.join("seed-1").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["per_seed"][0]["seed"], 2, "{}", report["per_seed"]);
}

#[test]
fn an_interrupted_demo_goes_on_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let args = [
        "demo",
        "--preset",
        "shapes-tiny",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, _, err) = common::mmkd_with_env(&args, &[("MMKD_FAULT_SIGNAL_AT_STEP", "2")]);
    assert!(
        !ok && err.contains("interrupted by SIGTERM after step 2"),
        "{err}"
    );
    let (ok, _, err) = mmkd(&args);
    assert!(ok, "{err}");
    assert!(out.join("report.json").exists());
}
