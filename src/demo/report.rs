//! `report.json` (for machines) and `report.md` (for people) of a demo run.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::methods::DemoMethod;
use super::settings::{DemoSettings, EvalSplit};
use super::{ModelResult, MODELS};
use crate::config::tower::TowerObjective;
use crate::eval::files::{read_records, AnswerLine, PredictionLine, QuestionLine};

pub(super) type SeedResults = (u64, PathBuf, BTreeMap<String, ModelResult>);
/// A named metric read from one model's results.
type MetricFn = (&'static str, Box<dyn Fn(&ModelResult) -> f64>);

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64
    } else {
        0.0
    };
    (mean, var.sqrt())
}

pub(super) fn collect(
    per_seed: &[SeedResults],
    model: &str,
    f: impl Fn(&ModelResult) -> f64,
) -> Vec<f64> {
    per_seed
        .iter()
        .filter_map(|(_, _, r)| r.get(model).map(&f))
        .collect()
}

/// Paired per-seed differences `a − b` of VQA accuracy.
pub(super) fn paired_differences(per_seed: &[SeedResults], a: &str, b: &str) -> Vec<f64> {
    per_seed
        .iter()
        .filter_map(|(_, _, r)| Some(r.get(a)?.vqa_accuracy - r.get(b)?.vqa_accuracy))
        .collect()
}

pub(super) fn difference_json(diffs: &[f64]) -> Value {
    let (mean, std) = mean_std(diffs);
    json!({"mean": mean, "std": std, "per_seed": diffs})
}

pub(super) fn describe_difference(name_a: &str, name_b: &str, diffs: &[f64]) -> String {
    let (mean, std) = mean_std(diffs);
    let wins = diffs.iter().filter(|d| **d > 0.0).count();
    let spread = if diffs.len() > 1 {
        format!(" ± {std:.2} (paired over {} seeds)", diffs.len())
    } else {
        String::new()
    };
    format!(
        "{name_a} − {name_b} = {mean:+.2}{spread} points, {name_a} ahead in {wins} of {} seed(s)",
        diffs.len()
    )
}

/// The demo's question in one line: does the distilled student beat the baseline, and the
/// teacher both? Differences are paired by seed, with their spread, so noise reads as noise.
fn verdict(per_seed: &[SeedResults], methods: &[DemoMethod]) -> String {
    let mut text = format!(
        "**Verdict (VQA accuracy):** {}; {}; {}.\n\n",
        describe_difference(
            "distilled",
            "baseline",
            &paired_differences(per_seed, "distilled", "baseline")
        ),
        describe_difference(
            "teacher",
            "distilled",
            &paired_differences(per_seed, "teacher", "distilled")
        ),
        describe_difference(
            "teacher",
            "baseline",
            &paired_differences(per_seed, "teacher", "baseline")
        ),
    );
    // The MoE rows have another teacher: their comparisons are in their own section.
    let rows = methods
        .iter()
        .filter(|m| **m != DemoMethod::Moe)
        .flat_map(|m| m.rows());
    for row in rows {
        text.push_str(&format!(
            "**{row}:** {}; {}.\n\n",
            describe_difference(
                row,
                "distilled",
                &paired_differences(per_seed, row, "distilled")
            ),
            describe_difference(
                row,
                "baseline",
                &paired_differences(per_seed, row, "baseline")
            ),
        ));
    }
    text
}

pub(super) fn cell(values: &[f64], decimals: usize) -> String {
    let (m, s) = mean_std(values);
    if values.len() > 1 {
        format!("{m:.decimals$} ± {s:.decimals$}")
    } else {
        format!("{m:.decimals$}")
    }
}

/// How the shared vision tower came to be, with its held-out figures (seed 0).
fn tower_sentence(demo: &DemoSettings, per_seed: &[SeedResults]) -> String {
    if demo.tower_epochs == 0 {
        return "All three models share one frozen, randomly initialised vision tower.\n\n".into();
    }
    let summary = per_seed.first().and_then(|(_, dir, _)| {
        let text = std::fs::read_to_string(dir.join(super::TOWER_DIR).join("summary.json")).ok()?;
        serde_json::from_str::<crate::tower::TowerSummary>(&text).ok()
    });
    let Some(summary) = summary else {
        return format!(
            "All three models share one frozen vision tower, pre-trained first for {} epoch(s) \
             (`mmkd tower`).\n\n",
            demo.tower_epochs
        );
    };
    let v = &summary.validation;
    let how = match summary.objective {
        TowerObjective::Labels => {
            let parts: Vec<String> = v
                .iter()
                .map(|(k, v)| format!("{} {v:.1} %", k.trim_end_matches("_accuracy")))
                .collect();
            format!(
                "to name the shape, colour and size in each patch's grid cell from the train \
                 split's ground truth (seed 0: val patches classified right: {})",
                parts.join(", ")
            )
        }
        TowerObjective::Contrastive => format!(
            "with SigLIP's sigmoid loss against a small text encoder on the train split's \
             captions (seed 0: val image→text top-1 {:.1} % within batches, chance {:.1} %)",
            v.get("image_to_text_top1").copied().unwrap_or(f64::NAN),
            v.get("image_to_text_chance").copied().unwrap_or(f64::NAN)
        ),
    };
    format!(
        "All three models share one frozen vision tower, pre-trained first for {} epoch(s) {how} \
         (`mmkd tower --objective {}`): the synthetic world's stand-in for SigLIP.\n\n",
        demo.tower_epochs,
        summary.objective.name()
    )
}

/// What a demo run was: where it wrote, which rows it has, on what data.
pub struct RunContext<'a> {
    pub out: &'a Path,
    pub methods: &'a [DemoMethod],
    /// Self-improvement rounds (0: none).
    pub self_improve: usize,
    pub preset: &'a str,
    pub demo: &'a DemoSettings,
    pub data: &'a Path,
    pub template: &'a str,
}

/// Writes both reports; returns the path of `report.md`.
pub fn write(ctx: &RunContext<'_>, per_seed: &[SeedResults], wall_seconds: f64) -> Result<PathBuf> {
    let RunContext {
        out,
        methods,
        self_improve,
        preset,
        demo,
        data,
        template,
    } = *ctx;
    let metric_fns: Vec<MetricFn> = vec![
        ("vqa_accuracy", Box::new(|r: &ModelResult| r.vqa_accuracy)),
        ("caption_cider", Box::new(|r: &ModelResult| r.caption_cider)),
        (
            "caption_bleu_4",
            Box::new(|r: &ModelResult| r.caption_bleu_4),
        ),
        (
            "caption_rouge_l",
            Box::new(|r: &ModelResult| r.caption_rouge_l),
        ),
        ("pope_f1", Box::new(|r: &ModelResult| r.pope_f1)),
    ];
    let models: Vec<&str> = MODELS
        .iter()
        .copied()
        .chain(methods.iter().flat_map(|m| m.rows().iter().copied()))
        .chain(
            super::teacher_data::self_improve_rows(self_improve)
                .iter()
                .copied(),
        )
        .collect();
    let self_rows = super::teacher_data::self_improve_rows(self_improve);
    let data_rows = methods.contains(&DemoMethod::Data);
    let mut results = serde_json::Map::new();
    for &model in &models {
        let mut obj = serde_json::Map::new();
        for (name, f) in &metric_fns {
            let values = collect(per_seed, model, f);
            let (m, s) = mean_std(&values);
            obj.insert(name.to_string(), json!(m));
            obj.insert(format!("{name}_std"), json!(s));
            obj.insert(format!("{name}_per_seed"), json!(values));
        }
        let per_step: Vec<f64> = per_seed
            .iter()
            .filter_map(|(_, _, r)| r.get(model)?.dft_seconds_per_step)
            .collect();
        obj.insert("dft_seconds_per_step_per_seed".into(), json!(per_step));
        let acceptance: Vec<f64> = per_seed
            .iter()
            .filter_map(|(_, _, r)| r.get(model)?.draft_acceptance)
            .collect();
        obj.insert("draft_acceptance_per_seed".into(), json!(acceptance));
        let params = per_seed
            .first()
            .and_then(|(_, _, r)| r.get(model))
            .map(|r| r.params)
            .unwrap_or(0);
        obj.insert("params".into(), json!(params));
        let mut categories: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (_, _, r) in per_seed {
            if let Some(m) = r.get(model) {
                for (k, v) in &m.vqa_by_category {
                    categories.entry(k.clone()).or_default().push(*v);
                }
            }
        }
        obj.insert(
            "vqa_by_category".into(),
            json!(categories
                .iter()
                .map(|(k, v)| (k.clone(), mean_std(v).0))
                .collect::<BTreeMap<_, _>>()),
        );
        results.insert(model.to_string(), Value::Object(obj));
    }
    let report = json!({
        "preset": preset,
        "wall_seconds": wall_seconds,
        "seeds": per_seed.len(),
        "template": template,
        "data": {"dir": data, "train": demo.train, "val": demo.val, "test": demo.test, "image_size": demo.image_size},
        "demo": demo,
        "results": results,
        "vqa_differences": {
            "distilled_minus_baseline": difference_json(&paired_differences(per_seed, "distilled", "baseline")),
            "teacher_minus_distilled": difference_json(&paired_differences(per_seed, "teacher", "distilled")),
            "teacher_minus_baseline": difference_json(&paired_differences(per_seed, "teacher", "baseline")),
        },
        "methods": methods.iter().flat_map(|m| m.rows()).map(|row| json!({
            "row": row,
            "minus_distilled": difference_json(&paired_differences(per_seed, row, "distilled")),
            "minus_baseline": difference_json(&paired_differences(per_seed, row, "baseline")),
        })).collect::<Vec<_>>(),
        "moe": methods.contains(&DemoMethod::Moe).then(|| super::moe::report_json(per_seed)),
        "data_distillation": (data_rows || self_improve > 0)
            .then(|| super::teacher_data::report_json(per_seed, data_rows, self_rows)),
        "per_seed": per_seed.iter().map(|(s, dir, r)| json!({"seed": s, "dir": dir, "results": r})).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;

    let mut md = String::new();
    md.push_str("# mmkd demo: does distillation help a small vision-language model?\n\n");
    md.push_str(&format!(
        "Preset `{preset}`, {} seed(s), {:.0} s wall time. Synthetic shapes data: {} train scenes, evaluated on {} {} scenes, at {} px; \
         chat template `{template}`. The baseline student (PT → SFT) and the distilled student (DPT → SFT → DFT) have the \
         same architecture and the same number of optimizer steps; the teacher is larger.\n\n",
        per_seed.len(), wall_seconds, demo.train, if demo.eval_split == EvalSplit::Val { demo.val } else { demo.test }, demo.eval_split.name(), demo.image_size
    ));
    md.push_str(&tower_sentence(demo, per_seed));
    for method in methods {
        md.push_str(&format!("{}\n\n", method.describe()));
    }
    if self_improve > 0 {
        md.push_str(&format!(
            "{}\n\n",
            super::teacher_data::describe_self_improve(self_improve)
        ));
    }
    md.push_str("| model | params | VQA acc (%) | CIDEr-D | BLEU-4 | ROUGE-L | POPE F1 | DFT s/step | draft acc. (%) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for &model in &models {
        let params = per_seed
            .first()
            .and_then(|(_, _, r)| r.get(model))
            .map(|r| r.params)
            .unwrap_or(0);
        let v = |f: &dyn Fn(&ModelResult) -> f64, d| cell(&collect(per_seed, model, f), d);
        let per_step: Vec<f64> = per_seed
            .iter()
            .filter_map(|(_, _, r)| r.get(model)?.dft_seconds_per_step)
            .collect();
        let acceptance: Vec<f64> = per_seed
            .iter()
            .filter_map(|(_, _, r)| r.get(model)?.draft_acceptance)
            .collect();
        let dash_or = |values: &[f64], d| {
            if values.is_empty() {
                "–".to_string()
            } else {
                cell(values, d)
            }
        };
        md.push_str(&format!(
            "| {model} | {params} | {} | {} | {} | {} | {} | {} | {} |\n",
            v(&|r| r.vqa_accuracy, 2),
            v(&|r| r.caption_cider, 3),
            v(&|r| r.caption_bleu_4, 3),
            v(&|r| r.caption_rouge_l, 3),
            v(&|r| r.pope_f1, 2),
            dash_or(&per_step, 3),
            dash_or(&acceptance, 1),
        ));
    }
    md.push_str(&format!(
        "\n`draft acc.`: the share of a student's proposals its teacher kept with the student as \
         its draft (greedy speculative decoding, γ {}, the first {} {} questions; the answers are \
         the teacher's own).\n\n",
        super::speculation::GAMMA,
        super::speculation::QUESTIONS,
        demo.eval_split.name()
    ));
    md.push_str(&verdict(per_seed, methods));
    if methods.contains(&DemoMethod::Moe) {
        md.push_str(&super::moe::report_section(per_seed));
    }
    if data_rows || self_improve > 0 {
        md.push_str(&super::teacher_data::report_section(
            per_seed, data_rows, self_rows,
        ));
    }
    // Per-category accuracy.
    let mut cats: Vec<String> = per_seed
        .first()
        .and_then(|(_, _, r)| r.get("teacher"))
        .map(|r| r.vqa_by_category.keys().cloned().collect())
        .unwrap_or_default();
    cats.sort();
    if !cats.is_empty() {
        md.push_str(&format!(
            "| VQA category | {} |\n| --- |{}\n",
            models.join(" | "),
            " ---: |".repeat(models.len())
        ));
        for c in &cats {
            let cells: Vec<String> = models
                .iter()
                .map(|m| {
                    cell(
                        &collect(per_seed, m, |r| {
                            r.vqa_by_category.get(c).copied().unwrap_or(f64::NAN)
                        }),
                        1,
                    )
                })
                .collect();
            md.push_str(&format!("| {c} | {} |\n", cells.join(" | ")));
        }
        md.push('\n');
    }
    if let Some((_, seed_dir, _)) = per_seed.first() {
        let rel = |p: &Path| p.strip_prefix(out).unwrap_or(p).display().to_string();
        md.push_str("## Loss curves (seed 0)\n\nBlack: total loss; blue: CE; orange: L_res; green: L_vis; red: L_rel (log scale, smoothed).\n\n");
        for stage in [
            "teacher/pt",
            "teacher/sft",
            "baseline/pt",
            "baseline/sft",
            "distilled/dpt",
            "distilled/sft",
            "distilled/dft",
        ] {
            md.push_str(&format!(
                "**{stage}**\n\n![{stage}]({})\n\n",
                rel(&seed_dir.join(stage).join("loss.png"))
            ));
        }
        md.push_str(&examples_section(
            out,
            seed_dir,
            data,
            demo.examples,
            demo.eval_split,
        )?);
    }
    let path = out.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

/// A few test images with the question, the truth and each model's answer.
fn examples_section(
    out: &Path,
    seed_dir: &Path,
    data: &Path,
    n: usize,
    split: EvalSplit,
) -> Result<String> {
    let questions: Vec<QuestionLine> =
        read_records(&data.join(format!("{}/questions.jsonl", split.name())))?;
    let answers: Vec<AnswerLine> =
        read_records(&data.join(format!("{}/answers.jsonl", split.name())))?;
    let truth: HashMap<&str, &AnswerLine> = answers
        .iter()
        .map(|a| (a.question_id.as_str(), a))
        .collect();
    let mut preds: HashMap<&str, HashMap<String, String>> = HashMap::new();
    for model in MODELS {
        let path = seed_dir
            .join("eval")
            .join(model)
            .join("vqa/predictions.jsonl");
        let lines: Vec<PredictionLine> =
            read_records(&path).with_context(|| format!("reading {}", path.display()))?;
        preds.insert(
            model,
            lines.into_iter().map(|p| (p.question_id, p.text)).collect(),
        );
    }
    let images_dir = out.join("report_images");
    std::fs::create_dir_all(&images_dir)?;
    let mut md = format!("## Examples (seed 0, {} split)\n\n| image | question | truth | teacher | baseline | distilled |\n| --- | --- | --- | --- | --- | --- |\n", split.name());
    // One question per image, from the first `n` images.
    let mut seen = std::collections::HashSet::new();
    for q in questions.iter().filter(|q| q.image.is_some()) {
        let image = q.image.clone().unwrap_or_default();
        if seen.len() >= n && !seen.contains(&image) {
            break;
        }
        if !seen.insert(image.clone()) {
            continue;
        }
        let file = Path::new(&image)
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        let _ = std::fs::copy(data.join(&image), images_dir.join(&file));
        let cell = |m: &str| {
            preds
                .get(m)
                .and_then(|p| p.get(&q.question_id))
                .cloned()
                .unwrap_or_default()
                .replace('|', "/")
        };
        md.push_str(&format!(
            "| ![](report_images/{file}) | {} | {} | {} | {} | {} |\n",
            q.text.replace('\n', " "),
            truth
                .get(q.question_id.as_str())
                .map(|a| a.answers.join(" / "))
                .unwrap_or_default(),
            cell("teacher"),
            cell("baseline"),
            cell("distilled")
        ));
    }
    Ok(md)
}
