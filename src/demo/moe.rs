//! The demo's `moe` rows (issue 21): a Mixture-of-Experts teacher trained by the teacher's own
//! stages, and dense students of its size initialised from it by each knowledge-aggregation
//! method or at random, then distilled from it with one DFT epoch each, with and without
//! knowledge augmentation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use toml::Value;

use super::methods::SeedRun;
use super::report::{
    cell, collect, describe_difference, difference_json, paired_differences, SeedResults,
};
use super::ModelResult;
use super::{run_plan, say, StagePlan, TOWER_DIR};
use crate::config::{Document, Role, Stage};
use crate::experts::{moe_to_dense, Aggregation, ToDenseRequest, UsageData};

/// The teacher's stages' objective: the cross-entropy and the Switch balancing term.
pub const TEACHER_OBJECTIVE: &str =
    "[{ term = \"ce\" }, { term = \"moe.balance\", weight = 0.01 }]";
/// Knowledge augmentation's routings in the `-ka` rows.
pub const KA_ROUTINGS: &str = "train.teacher_routings=3";
/// Every dense student's distillation budget.
pub const DFT_EPOCHS: usize = 1;
/// The initialisations, as row suffixes (`dense-<init>`, `dense-<init>-ka`).
pub const INITS: [&str; 4] = ["random", "usage-avg", "top-k", "svd"];

/// The rows, in the report's order.
pub const ROWS: &[&str] = &[
    "moe-teacher",
    "dense-random",
    "dense-usage-avg",
    "dense-top-k",
    "dense-svd",
    "dense-random-ka",
    "dense-usage-avg-ka",
    "dense-top-k-ka",
    "dense-svd-ka",
];

/// `--set`s turning the preset's teacher LLM into Qwen2-MoE with the same active width:
/// 4 experts of 3/8 its MLP width, top-2 (renormalised), a shared expert of 1/4.
fn teacher_sets(doc: &Document) -> Result<Vec<String>> {
    let teacher = crate::config::StageSettings::resolve(doc, Stage::Pretrain, Role::Teacher)?;
    let width = teacher
        .model
        .text_config
        .as_ref()
        .and_then(|t| t.get("intermediate_size"))
        .and_then(Value::as_integer)
        .context("the preset's teacher has no text_config.intermediate_size")?
        as usize;
    let key = "models.teacher.text_config";
    Ok(vec![
        format!("{key}.model_type=\"qwen2_moe\""),
        format!("{key}.num_experts=4"),
        format!("{key}.num_experts_per_tok=2"),
        format!("{key}.norm_topk_prob=true"),
        format!("{key}.moe_intermediate_size={}", width * 3 / 8),
        format!("{key}.shared_expert_intermediate_size={}", width / 4),
    ])
}

/// The preset with the student's LLM made the (dense) teacher's: the random-init rows.
fn teacher_sized_student(doc: &Document) -> Result<Document> {
    let teacher = crate::config::StageSettings::resolve(doc, Stage::Pretrain, Role::Teacher)?;
    let text = teacher
        .model
        .text_config
        .context("the preset's teacher has no text_config")?;
    let mut doc = doc.clone();
    let models = doc
        .table
        .get_mut("models")
        .and_then(Value::as_table_mut)
        .context("the preset has no [models]")?;
    let student = models
        .entry("student")
        .or_insert_with(|| Value::Table(Default::default()))
        .as_table_mut()
        .context("[models.student] is not a table")?;
    student.insert("text_config".into(), Value::Table(text));
    Ok(doc)
}

/// Builds the rows for one seed; returns each row's name, directory and seconds.
pub fn run(run: &SeedRun<'_>) -> Result<Vec<(String, PathBuf, f64)>> {
    let seed_dir = run.seed_dir;
    let tower = seed_dir.join(TOWER_DIR).exists().then_some(TOWER_DIR);
    let sets = teacher_sets(run.doc)?;
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let teacher = [
        StagePlan {
            stage: Stage::Pretrain,
            role: Role::Teacher,
            dir: "teacher-moe/pt",
            init: None,
            teacher: None,
            tower,
            epochs: run.teacher_epochs.0,
            lora: None,
            objective: Some(TEACHER_OBJECTIVE),
            tokenizer: None,
            sets: &sets,
        },
        StagePlan {
            stage: Stage::Sft,
            role: Role::Teacher,
            dir: "teacher-moe/sft",
            init: Some("teacher-moe/pt"),
            teacher: None,
            tower: None,
            epochs: run.teacher_epochs.1,
            lora: None,
            objective: Some(TEACHER_OBJECTIVE),
            tokenizer: None,
            sets: &sets,
        },
    ];
    let mut teacher_seconds = 0.0;
    for plan in &teacher {
        teacher_seconds += run_plan(run.doc, seed_dir, run.data, plan, run.seed, run.progress)?;
    }
    let mut rows = vec![(
        "moe-teacher".to_string(),
        seed_dir.join("teacher-moe/sft"),
        teacher_seconds,
    )];
    let random_doc = teacher_sized_student(run.doc)?;
    for ka in [false, true] {
        for init in INITS {
            let row = if ka {
                format!("dense-{init}-ka")
            } else {
                format!("dense-{init}")
            };
            let dir = format!("moe-dense/{row}");
            let init_dir = format!("moe-init/{init}");
            let mut seconds = if init == "random" {
                random_init(run, &random_doc, &seed_dir.join(&init_dir))?
            } else {
                aggregate(run, init, &seed_dir.join(&init_dir))?
            };
            let ka_sets = [KA_ROUTINGS];
            let plan = StagePlan {
                stage: Stage::Dft,
                role: Role::Student,
                dir: &dir,
                init: Some(&init_dir),
                teacher: Some("teacher-moe/sft"),
                tower: None,
                epochs: DFT_EPOCHS,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: if ka { &ka_sets } else { &[] },
            };
            seconds += run_plan(run.doc, seed_dir, run.data, &plan, run.seed, run.progress)?;
            rows.push((row, seed_dir.join(&dir), seconds));
        }
    }
    Ok(rows)
}

/// A fresh dense model of the (dense) teacher's LLM shape on the MoE teacher's tower, saved to
/// `out` (unless done earlier): the random-init rows' start.
fn random_init(run: &SeedRun<'_>, doc: &Document, out: &Path) -> Result<f64> {
    if out.join("config.json").exists() {
        return Ok(0.0);
    }
    say(run.progress, "moe-init/random: a fresh dense model");
    let started = Instant::now();
    let mut settings = crate::config::StageSettings::resolve(doc, Stage::Pretrain, Role::Student)?;
    settings.model.seed = settings.model.seed.wrapping_add(1000 * run.seed);
    settings.model.vision = Some(run.seed_dir.join("teacher-moe/pt").display().to_string());
    let fresh = crate::stages::init::from_spec(
        &settings.model,
        Some(&run.data.join("tokenizer.json")),
        crate::models::llava::Trainable::NONE,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    crate::checkpoint::save_llava(
        &fresh.model,
        out,
        crate::checkpoint::SaveAssets {
            tokenizer_dir: None,
            tokenizer: Some(&fresh.tokenizer),
            processor: Some(&fresh.processor),
            training: None,
        },
    )?;
    Ok(started.elapsed().as_secs_f64())
}

/// `moe-to-dense` of the seed's MoE teacher by `method` into `out` (unless done earlier),
/// with the router usage of the val split's instructions; the seconds it took.
fn aggregate(run: &SeedRun<'_>, method: &str, out: &Path) -> Result<f64> {
    if out.join(crate::experts::to_dense::RECORD_FILE).exists() {
        say(
            run.progress,
            &format!("{}: done earlier, skipped", out.display()),
        );
        return Ok(0.0);
    }
    let method = match method {
        "usage-avg" => Aggregation::UsageAvg,
        "top-k" => Aggregation::TopK,
        _ => Aggregation::Svd,
    };
    say(
        run.progress,
        &format!("moe-init/{}: moe-to-dense", method.name()),
    );
    let started = Instant::now();
    let data = run.data.join("val/instruct.json");
    moe_to_dense(&ToDenseRequest {
        teacher: run.seed_dir.join("teacher-moe/sft").display().to_string(),
        data: UsageData {
            data: &data,
            images: run.data,
            template: None,
            batch_size: 32,
            max_length: 2048,
        },
        method,
        width: None,
        out: out.to_path_buf(),
        force: true,
    })
    .with_context(|| format!("demo moe-to-dense {}", method.name()))?;
    Ok(started.elapsed().as_secs_f64())
}

/// Each initialisation against random init, and knowledge augmentation against none: the
/// pairs the report compares, as (a, b).
fn comparisons() -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for ka in ["", "-ka"] {
        for init in &INITS[1..] {
            pairs.push((format!("dense-{init}{ka}"), format!("dense-random{ka}")));
        }
    }
    for init in INITS {
        pairs.push((format!("dense-{init}-ka"), format!("dense-{init}")));
    }
    pairs
}

/// The rows' step time and memory, and the paired VQA differences, for `report.json`.
pub fn report_json(per_seed: &[SeedResults]) -> serde_json::Value {
    let differences: serde_json::Map<String, serde_json::Value> = comparisons()
        .into_iter()
        .map(|(a, b)| {
            let diffs = paired_differences(per_seed, &a, &b);
            (format!("{a} − {b}"), difference_json(&diffs))
        })
        .collect();
    let cost: serde_json::Map<String, serde_json::Value> = ROWS
        .iter()
        .map(|row| {
            let step = collect(per_seed, row, |r| r.seconds_per_step.unwrap_or(f64::NAN));
            let rss = collect(per_seed, row, |r| r.peak_rss_mib.unwrap_or(f64::NAN));
            (
                row.to_string(),
                serde_json::json!({"seconds_per_step_per_seed": step, "peak_rss_mib_per_seed": rss}),
            )
        })
        .collect();
    serde_json::json!({"vqa_differences": differences, "cost": cost})
}

/// The MoE section of `report.md`: each row with its step time and memory, then the paired
/// VQA differences.
pub fn report_section(per_seed: &[SeedResults]) -> String {
    let mut md = String::from(
        "## Sparse → dense: a Mixture-of-Experts teacher\n\n| row | params | VQA acc (%) | \
         CIDEr-D | POPE F1 | s/step | peak RSS (MiB) |\n| --- | ---: | ---: | ---: | ---: | ---: \
         | ---: |\n",
    );
    for &row in ROWS {
        let params = per_seed
            .first()
            .and_then(|(_, _, r)| r.get(row))
            .map_or(0, |r| r.params);
        let v = |f: &dyn Fn(&ModelResult) -> f64, d| cell(&collect(per_seed, row, f), d);
        md.push_str(&format!(
            "| {row} | {params} | {} | {} | {} | {} | {} |\n",
            v(&|r| r.vqa_accuracy, 2),
            v(&|r| r.caption_cider, 3),
            v(&|r| r.pope_f1, 2),
            v(&|r| r.seconds_per_step.unwrap_or(f64::NAN), 3),
            v(&|r| r.peak_rss_mib.unwrap_or(f64::NAN), 0),
        ));
    }
    md.push_str(
        "\n`s/step` and `peak RSS`: the stage that wrote the model (the teacher's SFT, each \
         student's DFT with the MoE teacher online), wall seconds per optimizer step and the \
         process's peak resident memory during it.\n\n",
    );
    for (a, b) in comparisons() {
        let diffs = paired_differences(per_seed, &a, &b);
        let per_seed_text: Vec<String> = diffs.iter().map(|d| format!("{d:+.2}")).collect();
        md.push_str(&format!(
            "- {} (per seed: {})\n",
            describe_difference(&a, &b, &diffs),
            per_seed_text.join(", ")
        ));
    }
    md.push('\n');
    md
}
