//! The demo's data-distillation rows. `--methods data`: a student trained only on data the
//! teacher wrote (`mmkd distill-data`, recipe `shapes-vqa`, on the unlabeled training images)
//! against the baseline trained on the ground truth with the same epochs, with the same teacher
//! behind `mmkd serve` writing part of the data again to check the black-box path gives the
//! same; and DFT on 10 % / 25 % of the instructions chosen by teacher–student divergence
//! (`mmkd data select`) against random subsets of the same size. `--self-improve N`: N rounds
//! of the baseline student writing data about the training images, keeping its confident
//! in-set answers, and fine-tuning on the union with the ground truth, against the same steps
//! of fine-tuning on the ground truth alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::methods::SeedRun;
use super::report::{describe_difference, difference_json, paired_differences, SeedResults};
use super::{run_plan, run_plan_on, say, StagePlan, TrainingFiles};
use crate::config::{Role, Stage, StageSettings};
use crate::datagen::client::ApiSettings;
use crate::datagen::{DataTeacher, JobRequest, Recipe, SpanCheck};
use crate::selection::{Budget, Criterion, SelectRequest};

/// The teacher-written row and the selection rows.
pub const ROWS: &[&str] = &[
    "pretrained",
    "written",
    "select-10",
    "random-10",
    "select-25",
    "random-25",
];
/// The self-improvement control and rounds (the first N + 1 are used).
const SELF_ROWS: [&str; 6] = ["sft-more", "self-1", "self-2", "self-3", "self-4", "self-5"];
/// The most self-improvement rounds.
pub const MAX_SELF_ROUNDS: usize = SELF_ROWS.len() - 1;
/// Images the served teacher writes data for (the local teacher's data for them must be the
/// same).
const SERVED_IMAGES: usize = 500;
/// The self-improving student keeps answers of at least this mean token log-probability.
const SELF_MIN_LOGPROB: f32 = -0.1;

/// The rows of `n` self-improvement rounds: the control, then the rounds.
pub fn self_improve_rows(n: usize) -> &'static [&'static str] {
    &SELF_ROWS[..if n == 0 {
        0
    } else {
        n.min(MAX_SELF_ROUNDS) + 1
    }]
}

/// The report's description of the `--methods data` rows.
pub const DESCRIBE_DATA: &str = "`pretrained`: the baseline student after its PT, before any \
     instruction (what `written` starts from), evaluated as it is. `written`: the baseline student's SFT (same epochs) on data the \
     teacher wrote — `mmkd distill-data` (the preset's `demo.data_recipe`, by default `shapes-vqa`) on the training images without their \
     labels (4 questions an image from the recipe's templates, greedy answers; answers outside \
     each template's set and duplicates dropped) — instead of the ground-truth instructions. \
     `select-P` / `random-P`: LLaVA-KD's DFT (same epochs) on the P % of the instructions with \
     the largest KL(teacher ‖ distilled SFT student) at the answer tokens (`mmkd data select \
     --criterion divergence`), or on a random P %; 100 % is `distilled`.";

/// The report's description of the self-improvement rows.
pub fn describe_self_improve(rounds: usize) -> String {
    format!(
        "`self-r`: self-improvement round r — the previous model (round 0: the baseline student) \
         answers the recipe's questions about the training images, answers outside the set or \
         below a mean token log-probability of {SELF_MIN_LOGPROB} are dropped, and the model is \
         fine-tuned (SFT, the DFT's epochs) on the ground truth ∪ what it kept. `sft-more`: the \
         baseline fine-tuned on the ground truth alone for the steps of all {rounds} rounds — \
         the control for training longer."
    )
}

/// Builds the teacher-written and selection rows of one seed.
pub fn run(run: &SeedRun<'_>) -> Result<Vec<(String, PathBuf, f64)>> {
    // What the written data starts from, evaluated as it is: the "nothing" it must beat.
    let pretrained = ("pretrained".into(), run.seed_dir.join("baseline/pt"), 0.0);
    let mut rows = vec![pretrained, written(run)?];
    rows.extend(selection(run)?);
    Ok(rows)
}

/// The teacher's data (local, and served for the first images), and the SFT on it.
fn written(run: &SeedRun<'_>) -> Result<(String, PathBuf, f64)> {
    let started = Instant::now();
    let teacher = run.seed_dir.join("teacher/sft");
    let images = run.data.join("images/train");
    let local_dir = run.seed_dir.join("written-data/local");
    let recipe = Recipe::load(run.data_recipe)?;
    write_data(run, &teacher, &recipe, &local_dir, None)?;
    let served_dir = run.seed_dir.join("written-data/served");
    write_data(run, &teacher, &recipe, &served_dir, Some(SERVED_IMAGES))?;
    compare_served(&local_dir, &served_dir)?;
    let plan = student_plan(
        Stage::Sft,
        "written",
        "baseline/pt",
        None,
        run.baseline_sft_epochs,
        &[],
    );
    let files = TrainingFiles {
        data: &local_dir.join("data.json"),
        images: &images,
        tokenizer: &run.data.join("tokenizer.json"),
    };
    run_plan_on(run.doc, run.seed_dir, &files, &plan, run.seed, run.progress)?;
    Ok((
        "written".into(),
        run.seed_dir.join("written"),
        started.elapsed().as_secs_f64(),
    ))
}

/// `mmkd distill-data` of `model` into `out` (unless finished): local, or (`served`: the first
/// images) behind a server in this process.
fn write_data(
    run: &SeedRun<'_>,
    model: &Path,
    recipe: &Recipe,
    out: &Path,
    served: Option<usize>,
) -> Result<()> {
    if out.join(crate::datagen::job::MANIFEST_FILE).exists() {
        return Ok(());
    }
    let spec = model.to_str().context("non-UTF-8 path")?;
    let local = DataTeacher::local(
        spec,
        Some(run.template),
        64,
        crate::runtime::DeviceSpec::Cpu,
    )?;
    let (model_bundle, template) = local.local_model().context("a local teacher")?;
    let span = SpanCheck::new(model_bundle, template.clone(), 2048);
    let mut job = JobRequest {
        teacher: &local,
        recipe,
        images: run.data.join("images/train"),
        out: out.to_path_buf(),
        limit: served,
        chunk_images: 512,
        span_check: Some(&span),
        logprobs: recipe.filters.min_mean_logprob.is_some(),
        api_cache: None,
        after_data: None,
        // A self-improving model may be sure of nothing: its round trains on the ground truth.
        allow_empty: true,
        progress: run.progress,
    };
    say(
        run.progress,
        &format!(
            "{}: distill-data {} from {}",
            out.display(),
            recipe.name,
            model.display()
        ),
    );
    let summary = match served {
        None => crate::datagen::run(&job)?,
        Some(_) => {
            let bundle = crate::checkpoint::LoadedModel::load(
                spec,
                &crate::models::llava::BuildOptions::new(crate::models::llava::Trainable::NONE, 0),
            )?;
            let server =
                crate::serve::Server::new(bundle, Some(template.clone()), "teacher".into(), 256)
                    .spawn("127.0.0.1:0")?;
            let api = DataTeacher::api(ApiSettings {
                url: server.url(),
                model: "teacher".into(),
                api_key: None,
                concurrency: 1,
                retries: 2,
                timeout: Duration::from_secs(120),
                backoff: Duration::from_secs(1),
            })?;
            job.teacher = &api;
            crate::datagen::run(&job)?
        }
    };
    say(run.progress, &crate::datagen::describe(&summary));
    Ok(())
}

/// Records whether the served teacher wrote, for its images, what the local one wrote.
fn compare_served(local: &Path, served: &Path) -> Result<()> {
    let read = |dir: &Path| -> Result<(Vec<Value>, Value)> {
        let data: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("data.json"))?)?;
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
        Ok((data, manifest))
    };
    let (local_data, local_manifest) = read(local)?;
    let (served_data, served_manifest) = read(served)?;
    let images = served_manifest["summary"]["images"].as_u64().unwrap_or(0) as usize;
    let names = crate::datagen::job::list_images(
        Path::new(served_manifest["job"]["images"].as_str().unwrap_or("")),
        Some(images),
    )?;
    let served_images: std::collections::HashSet<String> = names
        .iter()
        .map(|p| p.to_string_lossy().to_string())
        .collect();
    let same_images: Vec<&Value> = local_data
        .iter()
        .filter(|r| {
            r["image"]
                .as_str()
                .is_some_and(|i| served_images.contains(i))
        })
        .collect();
    let identical = same_images.len() == served_data.len()
        && same_images.iter().zip(&served_data).all(|(a, b)| *a == b);
    let comparison = json!({
        "images": images,
        "identical": identical,
        "local_records": same_images.len(),
        "served_records": served_data.len(),
        "local_prompts_per_s": local_manifest["summary"]["prompts_per_s"],
        "served_prompts_per_s": served_manifest["summary"]["prompts_per_s"],
        "local": local_manifest["summary"],
    });
    std::fs::write(
        local.parent().context("a parent")?.join("comparison.json"),
        serde_json::to_string_pretty(&comparison)?,
    )?;
    Ok(())
}

/// Divergence-selected and random subsets, and a DFT on each.
fn selection(run: &SeedRun<'_>) -> Result<Vec<(String, PathBuf, f64)>> {
    let max_length = StageSettings::resolve(run.doc, Stage::Dft, Role::Student)?
        .data
        .max_length;
    let dir = run.seed_dir.join("selection");
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for (row, criterion, percent) in [
        ("select-10", Criterion::Divergence, 10.0),
        ("random-10", Criterion::Random, 10.0),
        ("select-25", Criterion::Divergence, 25.0),
        ("random-25", Criterion::Random, 25.0),
    ] {
        let started = Instant::now();
        let file = dir.join(format!("{row}.json"));
        if !file.exists() {
            say(
                run.progress,
                &format!("{row}: data select {criterion:?} {percent} %"),
            );
            crate::selection::select(&SelectRequest {
                teacher: criterion
                    .reads("teacher")
                    .then(|| run.seed_dir.join("teacher/sft").display().to_string()),
                student: criterion
                    .reads("student")
                    .then(|| run.seed_dir.join("distilled/sft").display().to_string()),
                data: run.data.join("train/instruct.json"),
                images: run.data.to_path_buf(),
                criterion,
                budget: Budget::Percent(percent),
                template: Some(run.template.to_string()),
                batch_size: 32,
                max_length,
                seed: run.seed,
                out: file.clone(),
                force: false,
                progress: run.progress,
            })?;
        }
        let plan = student_plan(
            Stage::Dft,
            row,
            "distilled/sft",
            Some("teacher/sft"),
            run.dft_epochs,
            &[],
        );
        let files = TrainingFiles {
            data: &file,
            images: run.data,
            tokenizer: &run.data.join("tokenizer.json"),
        };
        run_plan_on(run.doc, run.seed_dir, &files, &plan, run.seed, run.progress)?;
        rows.push((
            row.to_string(),
            run.seed_dir.join(row),
            started.elapsed().as_secs_f64(),
        ));
    }
    Ok(rows)
}

/// `rounds` rounds of self-improvement from the baseline student, and the control.
pub fn self_improve(run: &SeedRun<'_>, rounds: usize) -> Result<Vec<(String, PathBuf, f64)>> {
    ensure!(
        (1..=MAX_SELF_ROUNDS).contains(&rounds),
        "--self-improve takes 1 to {MAX_SELF_ROUNDS} rounds, got {rounds}"
    );
    let mut recipe = Recipe::load(run.data_recipe)?;
    recipe.filters.min_mean_logprob = Some(SELF_MIN_LOGPROB);
    let truth: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(run.data.join("train/instruct.json"))
            .context("reading the ground-truth instructions")?,
    )?;
    let mut out = Vec::new();
    let mut previous = "baseline/sft".to_string();
    let mut steps = 0usize;
    for (round, row) in SELF_ROWS
        .iter()
        .copied()
        .enumerate()
        .take(rounds + 1)
        .skip(1)
    {
        let started = Instant::now();
        let written = run.seed_dir.join(format!("self-improve/round-{round}"));
        write_data(run, &run.seed_dir.join(&previous), &recipe, &written, None)?;
        // The union, with the written data's image paths made relative to the data root.
        let union_file = run
            .seed_dir
            .join(format!("self-improve/union-{round}.json"));
        if !union_file.exists() {
            let mine: Vec<Value> =
                serde_json::from_str(&std::fs::read_to_string(written.join("data.json"))?)?;
            let mut union = truth.clone();
            union.extend(mine.into_iter().map(|mut r| {
                let image = format!("images/train/{}", r["image"].as_str().unwrap_or(""));
                r["image"] = json!(image);
                r
            }));
            mmkd_datasets::atomic::write_atomically(
                &union_file,
                serde_json::to_string(&union)?.as_bytes(),
            )?;
        }
        let plan = student_plan(Stage::Sft, row, &previous, None, run.dft_epochs, &[]);
        let files = TrainingFiles {
            data: &union_file,
            images: run.data,
            tokenizer: &run.data.join("tokenizer.json"),
        };
        run_plan_on(run.doc, run.seed_dir, &files, &plan, run.seed, run.progress)?;
        steps += super::stage_summary(&run.seed_dir.join(row))
            .and_then(|s| s["steps"].as_u64())
            .unwrap_or(0) as usize;
        out.push((
            row.to_string(),
            run.seed_dir.join(row),
            started.elapsed().as_secs_f64(),
        ));
        previous = row.to_string();
    }
    // The control: the same steps on the ground truth alone.
    let started = Instant::now();
    let max_steps = format!("max_steps={steps}");
    let sets = [max_steps.as_str()];
    let control = student_plan(
        Stage::Sft,
        SELF_ROWS[0],
        "baseline/sft",
        None,
        run.dft_epochs,
        &sets,
    );
    run_plan(
        run.doc,
        run.seed_dir,
        run.data,
        &control,
        run.seed,
        run.progress,
    )?;
    out.insert(
        0,
        (
            SELF_ROWS[0].to_string(),
            run.seed_dir.join(SELF_ROWS[0]),
            started.elapsed().as_secs_f64(),
        ),
    );
    Ok(out)
}

/// A student stage of these rows: its own data, no tower, adapters, objective or tokenizer of
/// its own.
fn student_plan<'a>(
    stage: Stage,
    dir: &'a str,
    init: &'a str,
    teacher: Option<&'a str>,
    epochs: usize,
    sets: &'a [&'a str],
) -> StagePlan<'a> {
    StagePlan {
        stage,
        role: Role::Student,
        dir,
        init: Some(init),
        teacher,
        tower: None,
        epochs,
        lora: None,
        objective: None,
        tokenizer: None,
        sets,
    }
}

/// The comparisons the section reports: (row, reference).
fn comparisons(data_rows: bool, self_rows: &[&str]) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    if data_rows {
        pairs.push(("written".into(), "baseline".into()));
        pairs.push(("written".into(), "pretrained".into()));
        for p in ["10", "25"] {
            pairs.push((format!("select-{p}"), format!("random-{p}")));
            pairs.push((format!("select-{p}"), "distilled".into()));
        }
    }
    if let Some((_, rounds)) = self_rows.split_first() {
        for r in rounds {
            pairs.push((r.to_string(), "baseline".into()));
            pairs.push((r.to_string(), "sft-more".into()));
        }
    }
    pairs
}

/// The paired VQA differences and the data counts, for `report.json`.
pub fn report_json(per_seed: &[SeedResults], data_rows: bool, self_rows: &[&str]) -> Value {
    let differences: serde_json::Map<String, Value> = comparisons(data_rows, self_rows)
        .into_iter()
        .map(|(a, b)| {
            let diffs = paired_differences(per_seed, &a, &b);
            (format!("{a} − {b}"), difference_json(&diffs))
        })
        .collect();
    let data: Vec<Value> = per_seed
        .iter()
        .map(|(seed, dir, _)| {
            let read = |p: &str| -> Value {
                std::fs::read_to_string(dir.join(p))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(Value::Null)
            };
            let rounds: Vec<Value> = (1..self_rows.len())
                .map(|r| read(&format!("self-improve/round-{r}/manifest.json"))["summary"].clone())
                .collect();
            json!({"seed": seed, "written": read("written-data/comparison.json"), "self_improve": rounds})
        })
        .collect();
    json!({"vqa_differences": differences, "data": data})
}

/// `{"empty": 5, "over_long": 8}` as `empty 5, over_long 8` (`none dropped` when empty).
fn counts(v: &Value) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "none dropped".into()
    } else {
        format!("dropped: {}", parts.join(", "))
    }
}

/// The data-distillation section of `report.md`.
pub fn report_section(per_seed: &[SeedResults], data_rows: bool, self_rows: &[&str]) -> String {
    let mut md = String::from("## Data distillation\n\n");
    let json = report_json(per_seed, data_rows, self_rows);
    for seed in json["data"].as_array().into_iter().flatten() {
        let w = &seed["written"];
        if !w.is_null() {
            md.push_str(&format!(
                "- seed {}: the teacher wrote {} records ({} of {} prompts kept; {}); behind `mmkd \
                 serve` it wrote {} for its first {} images, {} the local teacher's ({:.0} vs {:.0} \
                 prompts/s)\n",
                seed["seed"],
                w["local"]["records"],
                w["local"]["kept"],
                w["local"]["prompts"],
                counts(&w["local"]["filtered"]),
                w["served_records"],
                w["images"],
                if w["identical"].as_bool() == Some(true) { "identical to" } else { "NOT identical to" },
                w["local_prompts_per_s"].as_f64().unwrap_or(f64::NAN),
                w["served_prompts_per_s"].as_f64().unwrap_or(f64::NAN),
            ));
        }
        for (r, s) in seed["self_improve"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            md.push_str(&format!(
                "- seed {}, self-improvement round {}: kept {} of {} answers ({})\n",
                seed["seed"],
                r + 1,
                s["kept"],
                s["prompts"],
                counts(&s["filtered"])
            ));
        }
    }
    md.push('\n');
    for (a, b) in comparisons(data_rows, self_rows) {
        let diffs = paired_differences(per_seed, &a, &b);
        let text: Vec<String> = diffs.iter().map(|d| format!("{d:+.2}")).collect();
        md.push_str(&format!(
            "- {} (per seed: {})\n",
            describe_difference(&a, &b, &diffs),
            text.join(", ")
        ));
    }
    md.push('\n');
    md
}
