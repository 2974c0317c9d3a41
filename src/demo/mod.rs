//! `mmkd demo`: the whole of mmkd on built-in data. Makes the synthetic shapes data and a
//! tokenizer, pre-trains the shared vision tower ([`tower`]), trains a teacher (PT → SFT), a
//! baseline student (PT → SFT) and a distilled student of the same size and step budget
//! (DPT → SFT → DFT), evaluates all three on the held-out test split and writes `report.md` and
//! `report.json`. Finished stages are skipped on re-runs.

pub mod methods;
pub mod moe;
pub mod report;
pub mod settings;
pub mod speculation;
pub mod teacher_data;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::config::preset::apply_override;
use crate::config::tower::{TowerObjective, TowerSettings};
use crate::config::{load_document, Document, Role, Stage, StageSettings};
use crate::eval::run::{eval_captions, eval_pope, eval_vqa, EvalResults};
use crate::eval::Answerer;
use crate::stages::{run_stage, stage_finished, StageRun};
use crate::tower::{run_tower, TowerRun};
use settings::DemoSettings;

/// The three models the demo compares.
pub const MODELS: [&str; 3] = ["teacher", "baseline", "distilled"];

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Methods added as rows next to LLaVA-KD.
    pub methods: Vec<methods::DemoMethod>,
    /// Self-improvement rounds (0: none).
    pub self_improve: usize,
    pub preset: String,
    pub out: PathBuf,
    pub seeds: usize,
    pub first_seed: u64,
    pub overrides: Vec<String>,
    pub progress: bool,
}

/// One model's results for one seed.
#[derive(Clone, Debug, Serialize)]
pub struct ModelResult {
    pub vqa_accuracy: f64,
    pub vqa_by_category: std::collections::BTreeMap<String, f64>,
    pub caption_cider: f64,
    pub caption_bleu_4: f64,
    pub caption_rouge_l: f64,
    pub pope_f1: f64,
    pub params: usize,
    pub train_seconds: f64,
    /// Wall seconds per optimizer step of the model's DFT stage (`None`: it has none).
    pub dft_seconds_per_step: Option<f64>,
    /// Its proposals the teacher kept as its greedy speculative draft, in % (`None`: the
    /// teacher itself, and the rows of another teacher).
    pub draft_acceptance: Option<f64>,
    /// Wall seconds per optimizer step of the stage that wrote the model.
    pub seconds_per_step: Option<f64>,
    /// The process's peak resident memory during that stage, in MiB.
    pub peak_rss_mib: Option<f64>,
    pub dir: PathBuf,
}

/// The `summary.json` of the stage whose output is `dir`.
fn stage_summary(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(crate::stages::SUMMARY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Wall seconds per step of the stage whose output is `dir`.
fn seconds_per_step(dir: &Path) -> Option<f64> {
    let summary = stage_summary(dir)?;
    let steps = summary["steps"].as_f64().filter(|s| *s > 0.0)?;
    Some(summary["wall_seconds"].as_f64()? / steps)
}

/// Wall seconds per step of the DFT stage (or the on-policy stage in its place) whose output
/// is `dir` (from its `summary.json`).
fn dft_seconds_per_step(dir: &Path) -> Option<f64> {
    let summary = stage_summary(dir)?;
    let fine_tuning = [Stage::Dft, Stage::Gkd, Stage::Minillm, Stage::Rl].map(Stage::name);
    if !fine_tuning.iter().any(|s| summary["stage"] == *s) {
        return None;
    }
    seconds_per_step(dir)
}

fn say(progress: bool, msg: &str) {
    if progress {
        eprintln!("{msg}");
    }
}

/// The seed's pre-trained vision tower (`tower/`): `mmkd tower` with the preset's `[tower]`,
/// trained unless finished earlier.
fn pretrain_tower(
    doc: &Document,
    demo: &DemoSettings,
    seed_dir: &Path,
    data: &Path,
    seed: u64,
    progress: bool,
) -> Result<()> {
    let out = seed_dir.join(TOWER_DIR);
    if stage_finished(&out) {
        say(progress, &format!("{TOWER_DIR}: done earlier, skipped"));
        return Ok(());
    }
    let mut settings = TowerSettings::resolve(doc)?;
    settings.epochs = demo.tower_epochs;
    settings.max_steps = None;
    let mut model = StageSettings::resolve(doc, Stage::Pretrain, Role::Teacher)?.model;
    // One seed per demo seed, for the initial weights and the data order alike.
    model.seed = model.seed.wrapping_add(1000 * seed);
    settings.seed = model.seed;
    let file = match settings.objective {
        TowerObjective::Labels => "scenes.jsonl",
        TowerObjective::Contrastive => "pretrain.json",
    };
    say(
        progress,
        &format!(
            "{TOWER_DIR}: vision pre-training, {} ({} epoch(s))",
            settings.objective.name(),
            settings.epochs
        ),
    );
    let summary = run_tower(&TowerRun {
        settings,
        model,
        data: data.join("train").join(file),
        images: data.to_path_buf(),
        val_data: Some(data.join("val").join(file)),
        tokenizer: Some(data.join("tokenizer.json")),
        resume: crate::train::state::latest_checkpoint(&out)?.is_some(),
        out,
        force: false,
        progress,
    })
    .context("demo stage tower")?;
    let figures: Vec<String> = summary
        .validation
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    say(
        progress,
        &format!(
            "{TOWER_DIR}: val {}; features rescaled by {:.3}",
            figures.join(", "),
            summary.scale
        ),
    );
    Ok(())
}

/// Where each seed's pre-trained vision tower goes.
pub const TOWER_DIR: &str = "tower";

/// The demo's data directory: synthetic data and tokenizer, made once.
fn prepare_data(out: &Path, demo: &DemoSettings, progress: bool) -> Result<PathBuf> {
    let data = out.join("data");
    if !data.join("manifest.json").exists() {
        say(
            progress,
            &format!(
                "data: synthesising {} train / {} val / {} test scenes",
                demo.train, demo.val, demo.test
            ),
        );
        let cfg = mmkd_datasets::SynthConfig {
            seed: demo.data_seed,
            train: demo.train,
            val: demo.val,
            test: demo.test,
            image_size: demo.image_size,
        };
        let bar: Box<dyn mmkd_datasets::Progress> = Box::new(mmkd_datasets::NoProgress);
        mmkd_datasets::generate_synth(&data, &cfg, bar.as_ref())?;
    }
    let tokenizer = data.join("tokenizer.json");
    if !tokenizer.exists() {
        say(progress, "data: training the tokenizer");
        let (texts, _) = mmkd_datasets::collect_training_text(&data.join("train"))?;
        let tok = mmkd_datasets::train_bpe(&texts, demo.vocab_size)?;
        mmkd_datasets::save_tokenizer(&tok, &tokenizer)?;
    }
    Ok(data)
}

struct StagePlan<'a> {
    stage: Stage,
    role: Role,
    dir: &'a str,
    init: Option<&'a str>,
    teacher: Option<&'a str>,
    /// A checkpoint whose vision tower a fresh model takes.
    tower: Option<&'a str>,
    epochs: usize,
    /// Train through LoRA adapters.
    lora: Option<crate::config::LoraSettings>,
    /// The stage's objective instead of the preset's (a TOML array of terms).
    objective: Option<&'a str>,
    /// The data's tokenizer file under the data directory (default `tokenizer.json`).
    tokenizer: Option<&'a str>,
    /// More `--set`s of the stage (`rollout.kl_coef=0.1`).
    sets: &'a [&'a str],
}

fn run_plan(
    doc: &Document,
    seed_dir: &Path,
    data: &Path,
    plan: &StagePlan<'_>,
    seed: u64,
    progress: bool,
) -> Result<f64> {
    let file = if plan.stage.is_pretraining() {
        "pretrain.json"
    } else {
        "instruct.json"
    };
    let files = TrainingFiles {
        data: &data.join("train").join(file),
        images: data,
        tokenizer: &data.join(plan.tokenizer.unwrap_or("tokenizer.json")),
    };
    run_plan_on(doc, seed_dir, &files, plan, seed, progress)
}

/// What a demo stage trains on.
struct TrainingFiles<'a> {
    data: &'a Path,
    images: &'a Path,
    tokenizer: &'a Path,
}

/// [`run_plan`] on other data than the split's own file.
fn run_plan_on(
    doc: &Document,
    seed_dir: &Path,
    files: &TrainingFiles<'_>,
    plan: &StagePlan<'_>,
    seed: u64,
    progress: bool,
) -> Result<f64> {
    let out = seed_dir.join(plan.dir);
    if stage_finished(&out) {
        say(progress, &format!("{}: done earlier, skipped", plan.dir));
        return Ok(0.0);
    }
    let mut doc = doc.clone();
    apply_override(
        &mut doc.table,
        &format!("stages.{}.epochs={}", plan.stage.name(), plan.epochs),
    )?;
    if let Some(objective) = plan.objective {
        apply_override(
            &mut doc.table,
            &format!("stages.{}.objective={objective}", plan.stage.name()),
        )?;
    }
    for set in plan.sets {
        apply_override(
            &mut doc.table,
            &crate::config::settings::expand_override(set, plan.stage),
        )?;
    }
    let mut settings = StageSettings::resolve(&doc, plan.stage, plan.role)?;
    if let Some(lora) = &plan.lora {
        // The full fine-tune's learning rate: these tiny models already train at 3e-3, and
        // LLaVA-1.5's ×10 for adapters diverged here (seed 0: training CE 0.46 → 1.1,
        // VQA 32.7 %).
        settings.train.lora = Some(lora.clone());
    }
    settings.train.seed = seed;
    settings.model.seed = settings.model.seed.wrapping_add(1000 * seed);
    if let Some(tower) = plan.tower {
        // LLaVA-KD's teacher and students share one vision encoder: a fresh student gets the
        // teacher's (frozen) tower instead of a random one of its own.
        settings.model.vision = Some(seed_dir.join(tower).display().to_string());
    }
    say(
        progress,
        &format!(
            "{}: {} ({} epoch(s))",
            plan.dir,
            plan.stage.name(),
            plan.epochs
        ),
    );
    let started = Instant::now();
    run_stage(&StageRun {
        force: false,
        settings,
        init: plan.init.map(|d| seed_dir.join(d).display().to_string()),
        teacher: plan.teacher.map(|d| seed_dir.join(d).display().to_string()),
        teacher_cache: None,
        data: files.data.to_path_buf(),
        images: files.images.to_path_buf(),
        // A stage stopped part-way (Ctrl-C, a kill after a checkpoint) goes on from there.
        resume: crate::train::state::latest_checkpoint(&out)?.is_some(),
        out,
        tokenizer: Some(files.tokenizer.to_path_buf()),
        progress,
    })
    .with_context(|| format!("demo stage {}", plan.dir))?;
    Ok(started.elapsed().as_secs_f64())
}

/// Reads a finished evaluation's results, or runs it.
fn cached_or(dir: &Path, run: impl FnOnce() -> Result<EvalResults>) -> Result<EvalResults> {
    let path = dir.join("results.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{}: not an mmkd results file", path.display()));
    }
    run()
}

fn evaluate(
    model_dir: &Path,
    eval_dir: &Path,
    data: &Path,
    demo: &DemoSettings,
    template: &str,
    progress: bool,
) -> Result<Vec<EvalResults>> {
    let mut answerer = Answerer::load(
        model_dir.to_str().context("non-UTF-8 path")?,
        Some(template),
        demo.eval_batch_size,
        demo.max_new_tokens,
        crate::runtime::DeviceSpec::Cpu,
    )?;
    let test = data.join(demo.eval_split.name());
    let vqa = cached_or(&eval_dir.join("vqa"), || {
        eval_vqa(
            &answerer,
            &test.join("questions.jsonl"),
            data,
            Some(&test.join("answers.jsonl")),
            "",
            &eval_dir.join("vqa"),
            progress,
        )
    })?;
    let pope = cached_or(&eval_dir.join("pope"), || {
        let files: Vec<PathBuf> = ["random", "popular", "adversarial"]
            .iter()
            .map(|s| test.join(format!("pope_{s}.jsonl")))
            .collect();
        eval_pope(&answerer, &files, data, &eval_dir.join("pope"), progress)
    })?;
    // Captions are longer than short answers.
    answerer.generation.max_new_tokens = demo.caption_max_new_tokens;
    let caption = cached_or(&eval_dir.join("caption"), || {
        eval_captions(
            &answerer,
            &test.join("captions.jsonl"),
            data,
            None,
            &eval_dir.join("caption"),
            progress,
        )
    })?;
    Ok(vec![vqa, caption, pope])
}

fn model_result(
    results: &[EvalResults],
    params: usize,
    train_seconds: f64,
    dir: &Path,
) -> ModelResult {
    let get = |k: &str| {
        results
            .iter()
            .find_map(|r| r.headline.get(k).copied())
            .unwrap_or(f64::NAN)
    };
    let vqa_by_category = results[0]
        .headline
        .iter()
        .filter(|(k, _)| k.starts_with("vqa_") && *k != "vqa_accuracy")
        .map(|(k, v)| (k.trim_start_matches("vqa_").to_string(), *v))
        .collect();
    ModelResult {
        vqa_accuracy: get("vqa_accuracy"),
        vqa_by_category,
        caption_cider: get("caption_cider"),
        caption_bleu_4: get("caption_bleu_4"),
        caption_rouge_l: get("caption_rouge_l"),
        pope_f1: get("pope_f1"),
        params,
        train_seconds,
        dft_seconds_per_step: dft_seconds_per_step(dir),
        draft_acceptance: None,
        seconds_per_step: seconds_per_step(dir),
        peak_rss_mib: stage_summary(dir)
            .and_then(|s| s["peak_rss_bytes"].as_f64())
            .map(|b| b / (1 << 20) as f64),
        dir: dir.to_path_buf(),
    }
}

/// Runs the demo; returns the path of `report.md`.
pub fn run_demo(options: &DemoOptions) -> Result<PathBuf> {
    let started = Instant::now();
    let mut doc = load_document(&options.preset)?;
    for set in &options.overrides {
        doc.set(set)?;
    }
    let demo = DemoSettings::from_document(&doc)?;
    let _lock = crate::checkpoint::lock::OutputLock::acquire(&options.out)?;
    let data = prepare_data(&options.out, &demo, options.progress)?;
    let chat_template = StageSettings::resolve(&doc, Stage::Sft, Role::Student)?.template();

    let mut per_seed = Vec::new();
    let first = options.first_seed;
    for seed in first..first + options.seeds.max(1) as u64 {
        let seed_dir = options.out.join(format!("seed-{seed}"));
        // The teacher composes its LLM with the pre-trained tower when there is one; the
        // students take the teacher's tower either way.
        let teacher_tower = if demo.tower_epochs > 0 {
            pretrain_tower(&doc, &demo, &seed_dir, &data, seed, options.progress)?;
            Some(TOWER_DIR)
        } else {
            None
        };
        let plans = [
            StagePlan {
                stage: Stage::Pretrain,
                role: Role::Teacher,
                dir: "teacher/pt",
                init: None,
                teacher: None,
                tower: teacher_tower,
                epochs: demo.teacher_pt_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
            StagePlan {
                stage: Stage::Sft,
                role: Role::Teacher,
                dir: "teacher/sft",
                init: Some("teacher/pt"),
                teacher: None,
                tower: None,
                epochs: demo.teacher_sft_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
            StagePlan {
                stage: Stage::Pretrain,
                role: Role::Student,
                dir: "baseline/pt",
                init: None,
                teacher: None,
                tower: Some("teacher/pt"),
                epochs: demo.student_pt_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
            // Same step budget as the distilled student: its SFT gets the DFT epochs too.
            StagePlan {
                stage: Stage::Sft,
                role: Role::Student,
                dir: "baseline/sft",
                init: Some("baseline/pt"),
                teacher: None,
                tower: None,
                epochs: demo.student_sft_epochs + demo.student_dft_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
            StagePlan {
                stage: Stage::Dpt,
                role: Role::Student,
                dir: "distilled/dpt",
                init: None,
                teacher: Some("teacher/sft"),
                tower: Some("teacher/pt"),
                epochs: demo.student_pt_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
            StagePlan {
                stage: Stage::Sft,
                role: Role::Student,
                dir: "distilled/sft",
                init: Some("distilled/dpt"),
                teacher: None,
                tower: None,
                epochs: demo.student_sft_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
            StagePlan {
                stage: Stage::Dft,
                role: Role::Student,
                dir: "distilled/dft",
                init: Some("distilled/sft"),
                teacher: Some("teacher/sft"),
                tower: None,
                epochs: demo.student_dft_epochs,
                lora: None,
                objective: None,
                tokenizer: None,
                sets: &[],
            },
        ];
        let mut seconds: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
        for plan in &plans {
            let s = run_plan(&doc, &seed_dir, &data, plan, seed, options.progress)?;
            *seconds
                .entry(plan.dir.split('/').next().unwrap_or("").to_string())
                .or_insert(0.0) += s;
        }
        let mut finals: Vec<(String, PathBuf)> = [
            ("teacher", "teacher/sft"),
            ("baseline", "baseline/sft"),
            ("distilled", "distilled/dft"),
        ]
        .iter()
        .map(|(name, dir)| (name.to_string(), seed_dir.join(dir)))
        .collect();
        let seed_run = methods::SeedRun {
            doc: &doc,
            seed_dir: &seed_dir,
            data: &data,
            template: &chat_template,
            dft_epochs: demo.student_dft_epochs,
            baseline_sft_epochs: demo.student_sft_epochs + demo.student_dft_epochs,
            data_recipe: &demo.data_recipe,
            teacher_epochs: (demo.teacher_pt_epochs, demo.teacher_sft_epochs),
            seed,
            progress: options.progress,
        };
        let mut extra_rows = Vec::new();
        for method in &options.methods {
            extra_rows.extend(methods::run_method(*method, &seed_run)?);
        }
        if options.self_improve > 0 {
            extra_rows.extend(teacher_data::self_improve(&seed_run, options.self_improve)?);
        }
        for (row, dir, s) in extra_rows {
            seconds.insert(row.clone(), s);
            finals.push((row, dir));
        }
        let teacher_dir = seed_dir.join("teacher/sft");
        let drafts = speculation::Drafts::new(&teacher_dir, &data, &demo, &chat_template);
        let mut results = std::collections::BTreeMap::new();
        for (name, model_dir) in &finals {
            say(options.progress, &format!("eval: {name} (seed {seed})"));
            let evals = evaluate(
                model_dir,
                &seed_dir.join("eval").join(name),
                &data,
                &demo,
                &chat_template,
                options.progress,
            )?;
            let count = methods::parameter_count(model_dir)?;
            let mut result = model_result(
                &evals,
                count,
                *seconds.get(name.as_str()).unwrap_or(&0.0),
                model_dir,
            );
            // The students of another teacher do not draft for this one.
            let own_teacher = !methods::DemoMethod::Moe.rows().contains(&name.as_str());
            if name != "teacher" && own_teacher {
                let drafting = drafts.drafting(model_dir, &seed_dir.join("eval").join(name))?;
                result.draft_acceptance = Some(drafting.acceptance_rate);
            }
            results.insert(name.clone(), result);
        }
        per_seed.push((seed, seed_dir, results));
    }
    report::write(
        &report::RunContext {
            out: &options.out,
            methods: &options.methods,
            self_improve: options.self_improve,
            preset: &options.preset,
            demo: &demo,
            data: &data,
            template: &chat_template,
        },
        &per_seed,
        started.elapsed().as_secs_f64(),
    )
}
