//! The evaluation tasks: VQA, captions, POPE and multiple choice, each producing predictions,
//! metrics, `results.json` and `results.md` in an output directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::D;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::files::{
    check_ids_match, read_records, write_predictions, AnswerLine, CaptionItem, ChoiceLine,
    PopeLine, PredictionLine, QuestionLine,
};
use super::{Answerer, GenerationStats, PromptItem};
use crate::models::llava::TokenBatch;
use crate::scoring::caption::{evaluate_captions, CaptionExample};
use crate::scoring::choice::{extract_choice, option_letter};
use crate::scoring::ids::SampleId;
use crate::scoring::pope::{evaluate_pope, PopeExample, YesNo};
use crate::scoring::vqa::{evaluate_vqa, VqaExample, VqaSummary};

/// The caption prompt used when a caption item brings none.
pub const DEFAULT_CAPTION_PROMPT: &str = "Describe the image briefly.";

/// What one evaluation run writes to `results.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResults {
    pub task: String,
    pub model: String,
    pub data: Vec<String>,
    pub settings: Value,
    pub duration_s: f64,
    /// Headline numbers (name → value), e.g. `vqa_accuracy`, `caption_cider`, `pope_f1`.
    pub headline: BTreeMap<String, f64>,
    /// Full metrics with breakdowns.
    pub metrics: Value,
    pub generation: Option<GenerationStatsJson>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationStatsJson {
    pub prompts: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

impl From<&GenerationStats> for GenerationStatsJson {
    fn from(s: &GenerationStats) -> Self {
        Self {
            prompts: s.prompts,
            new_tokens: s.new_tokens,
            seconds: s.seconds,
            tokens_per_s: s.tokens_per_s,
        }
    }
}

fn resolve(root: &Path, image: &Option<String>) -> Option<PathBuf> {
    image.as_ref().map(|i| root.join(i))
}

fn prediction(
    answerer: &Answerer,
    item: &PromptItem,
    text: &str,
    metadata: Value,
) -> PredictionLine {
    PredictionLine {
        question_id: item.id.clone(),
        prompt: answerer.prompt_text(item),
        text: text.to_string(),
        answer_id: format!("{}-{}", answerer.model_id, item.id),
        model_id: answerer.model_id.clone(),
        metadata,
    }
}

/// Writes `results.json` and `results.md` into `out`.
pub fn write_results(out: &Path, results: &EvalResults, markdown: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    std::fs::write(out.join("results.md"), markdown)?;
    Ok(())
}

fn percent_table(title: &str, rows: &[(String, f64, usize)]) -> String {
    let mut md = format!("| {title} | accuracy (%) | questions |\n| --- | ---: | ---: |\n");
    for (name, acc, n) in rows {
        md.push_str(&format!("| {name} | {acc:.2} | {n} |\n"));
    }
    md
}

/// The prompts of VQA questions, their images resolved against `images`.
pub fn vqa_prompts(
    questions: &[QuestionLine],
    images: &Path,
    prompt_suffix: &str,
) -> Vec<PromptItem> {
    questions
        .iter()
        .map(|q| PromptItem {
            id: q.question_id.clone(),
            image: resolve(images, &q.image),
            text: format!("{}{prompt_suffix}", q.text),
        })
        .collect()
}

/// Scores `predictions` (one per question, in order) against the reference answers, which
/// must cover exactly the same question ids.
pub fn score_vqa(
    questions: &[QuestionLine],
    predictions: &[String],
    refs: &[AnswerLine],
) -> Result<VqaSummary> {
    check_ids_match(
        questions.iter().map(|q| q.question_id.as_str()),
        refs.iter().map(|r| r.question_id.as_str()),
        "answers",
    )?;
    let by_id: HashMap<&str, &AnswerLine> =
        refs.iter().map(|r| (r.question_id.as_str(), r)).collect();
    let examples: Vec<VqaExample> = questions
        .iter()
        .zip(predictions)
        .map(|(q, a)| {
            let r = by_id[q.question_id.as_str()];
            VqaExample {
                id: SampleId(q.question_id.clone()),
                prediction: a.clone(),
                answers: r.answers.clone(),
                accepted: r.accepted.clone(),
                answer_type: r.answer_type.clone(),
                category: q.category.clone().or_else(|| r.category.clone()),
            }
        })
        .collect();
    evaluate_vqa(&examples)
}

/// VQA: answers `questions`, scores them against `answers` when given (10-answer soft accuracy
/// after the official normalization; single-reference questions reduce to exact match).
pub fn eval_vqa(
    answerer: &Answerer,
    questions_path: &Path,
    images: &Path,
    answers_path: Option<&Path>,
    prompt_suffix: &str,
    out: &Path,
    progress: bool,
) -> Result<EvalResults> {
    let started = Instant::now();
    let questions: Vec<QuestionLine> = read_records(questions_path)?;
    ensure!(
        !questions.is_empty(),
        "{} has no questions",
        questions_path.display()
    );
    let items = vqa_prompts(&questions, images, prompt_suffix);
    let (answers, stats) = answerer.answer_all(&items, "vqa", progress)?;
    let preds: Vec<PredictionLine> = items
        .iter()
        .zip(&questions)
        .zip(&answers)
        .map(|((item, q), a)| prediction(answerer, item, a, json!({"category": q.category})))
        .collect();
    std::fs::create_dir_all(out)?;
    write_predictions(&out.join("predictions.jsonl"), &preds)?;

    let mut headline = BTreeMap::new();
    let (metrics, markdown) = match answers_path {
        None => (
            Value::Null,
            format!(
                "# VQA predictions\n\n{} questions answered; no answers file given.\n",
                items.len()
            ),
        ),
        Some(path) => {
            let refs: Vec<AnswerLine> = read_records(path)?;
            let summary = score_vqa(&questions, &answers, &refs)?;
            headline.insert("vqa_accuracy".into(), summary.accuracy);
            let mut md = format!(
                "# VQA accuracy: {:.2} % ({} questions)\n\n",
                summary.accuracy, summary.count
            );
            md.push_str(&percent_table(
                "answer type",
                &summary
                    .per_answer_type
                    .iter()
                    .map(|(k, g)| (k.clone(), g.accuracy, g.count))
                    .collect::<Vec<_>>(),
            ));
            md.push('\n');
            md.push_str(&percent_table(
                "category",
                &summary
                    .per_category
                    .iter()
                    .map(|(k, g)| (k.clone(), g.accuracy, g.count))
                    .collect::<Vec<_>>(),
            ));
            for (k, g) in &summary.per_category {
                headline.insert(format!("vqa_{k}"), g.accuracy);
            }
            let metrics = json!({
                "accuracy": summary.accuracy,
                "count": summary.count,
                "exact_match_count": summary.exact_match_count,
                "per_answer_type": summary.per_answer_type,
                "per_category": summary.per_category,
            });
            (metrics, md)
        }
    };
    let results = EvalResults {
        task: "vqa".into(),
        model: answerer.model_id.clone(),
        data: vec![questions_path.display().to_string()],
        settings: json!({"template": answerer.template.name, "max_new_tokens": answerer.generation.max_new_tokens, "prompt_suffix": prompt_suffix}),
        duration_s: started.elapsed().as_secs_f64(),
        headline,
        metrics,
        generation: Some((&stats).into()),
    };
    write_results(out, &results, &markdown)?;
    Ok(results)
}

/// Captions: BLEU-1..4, ROUGE-L and CIDEr-D after PTB tokenization (pycocoevalcap's scale);
/// METEOR is not computed.
pub fn eval_captions(
    answerer: &Answerer,
    items_path: &Path,
    images: &Path,
    refs_path: Option<&Path>,
    out: &Path,
    progress: bool,
) -> Result<EvalResults> {
    let started = Instant::now();
    let items_in: Vec<CaptionItem> = read_records(items_path)?;
    ensure!(
        !items_in.is_empty(),
        "{} has no images",
        items_path.display()
    );
    let mut references: HashMap<String, Vec<String>> = items_in
        .iter()
        .map(|i| (i.image_id.clone(), i.references.clone()))
        .collect();
    if let Some(path) = refs_path {
        let refs: Vec<AnswerLine> = read_records(path)?;
        for r in refs {
            references.insert(r.question_id.clone(), r.answers);
        }
    }
    if let Some(missing) = items_in
        .iter()
        .find(|i| references.get(&i.image_id).is_none_or(Vec::is_empty))
    {
        bail!(
            "image {} has no reference captions (give them in the item or with --refs)",
            missing.image_id
        );
    }
    let items: Vec<PromptItem> = items_in
        .iter()
        .map(|i| PromptItem {
            id: i.image_id.clone(),
            image: Some(images.join(&i.image)),
            text: i
                .text
                .clone()
                .unwrap_or_else(|| DEFAULT_CAPTION_PROMPT.into()),
        })
        .collect();
    let (captions, stats) = answerer.answer_all(&items, "caption", progress)?;
    let preds: Vec<PredictionLine> = items
        .iter()
        .zip(&captions)
        .map(|(item, c)| prediction(answerer, item, c, Value::Null))
        .collect();
    std::fs::create_dir_all(out)?;
    write_predictions(&out.join("predictions.jsonl"), &preds)?;
    let examples: Vec<CaptionExample> = items
        .iter()
        .zip(&captions)
        .map(|(item, c)| CaptionExample {
            id: SampleId(item.id.clone()),
            candidate: c.clone(),
            references: references[&item.id].clone(),
        })
        .collect();
    let scores = evaluate_captions(&examples)?;
    let headline = BTreeMap::from([
        ("caption_bleu_4".to_string(), scores.bleu[3]),
        ("caption_rouge_l".to_string(), scores.rouge_l),
        ("caption_cider".to_string(), scores.cider),
    ]);
    let md = format!(
        "# Captions ({} images)\n\n| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CIDEr-D | METEOR |\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |\n| {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | not computed |\n",
        scores.count, scores.bleu[0], scores.bleu[1], scores.bleu[2], scores.bleu[3], scores.rouge_l, scores.cider
    );
    let results = EvalResults {
        task: "caption".into(),
        model: answerer.model_id.clone(),
        data: vec![items_path.display().to_string()],
        settings: json!({"template": answerer.template.name, "max_new_tokens": answerer.generation.max_new_tokens}),
        duration_s: started.elapsed().as_secs_f64(),
        headline,
        metrics: json!({
            "bleu_1": scores.bleu[0], "bleu_2": scores.bleu[1], "bleu_3": scores.bleu[2], "bleu_4": scores.bleu[3],
            "rouge_l": scores.rouge_l, "cider": scores.cider, "count": scores.count,
            "meteor": null, "meteor_note": crate::scoring::caption::METEOR_NOTE,
        }),
        generation: Some((&stats).into()),
    };
    write_results(out, &results, &md)?;
    Ok(results)
}

/// POPE: accuracy, precision, recall, F1 and yes-ratio per split (the split is the file's
/// stem, e.g. `pope_adversarial`, unless lines carry a `category`).
pub fn eval_pope(
    answerer: &Answerer,
    files: &[PathBuf],
    images: &Path,
    out: &Path,
    progress: bool,
) -> Result<EvalResults> {
    let started = Instant::now();
    let mut items = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let split = path
            .file_stem()
            .map(|s| s.to_string_lossy().trim_start_matches("pope_").to_string());
        for line in read_records::<PopeLine>(path)? {
            let label = YesNo::parse_label(&line.label).with_context(|| {
                format!(
                    "{}: question {}: label must be yes or no, found {:?}",
                    path.display(),
                    line.question_id,
                    line.label
                )
            })?;
            items.push(PromptItem {
                id: format!("{}:{}", split.clone().unwrap_or_default(), line.question_id),
                image: Some(images.join(&line.image)),
                text: line.text.clone(),
            });
            labels.push((label, split.clone()));
        }
    }
    ensure!(!items.is_empty(), "no POPE questions in {:?}", files);
    let (answers, stats) = answerer.answer_all(&items, "pope", progress)?;
    let preds: Vec<PredictionLine> = items
        .iter()
        .zip(&answers)
        .map(|(item, a)| prediction(answerer, item, a, Value::Null))
        .collect();
    std::fs::create_dir_all(out)?;
    write_predictions(&out.join("predictions.jsonl"), &preds)?;
    let examples: Vec<PopeExample> = answers
        .iter()
        .zip(&labels)
        .map(|(a, (label, split))| PopeExample {
            answer: a.clone(),
            label: *label,
            split: split.clone(),
        })
        .collect();
    let summary = evaluate_pope(&examples)?;
    let mut md = "# POPE\n\n| split | accuracy | precision | recall | F1 | yes-ratio | questions |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n".to_string();
    for (name, m) in summary
        .per_split
        .iter()
        .chain(std::iter::once((&"overall".to_string(), &summary.overall)))
    {
        md.push_str(&format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            m.accuracy, m.precision, m.recall, m.f1, m.yes_ratio, m.count
        ));
    }
    let results = EvalResults {
        task: "pope".into(),
        model: answerer.model_id.clone(),
        data: files.iter().map(|f| f.display().to_string()).collect(),
        settings: json!({"template": answerer.template.name, "max_new_tokens": answerer.generation.max_new_tokens}),
        duration_s: started.elapsed().as_secs_f64(),
        headline: BTreeMap::from([
            ("pope_f1".to_string(), summary.overall.f1),
            ("pope_accuracy".to_string(), summary.overall.accuracy),
        ]),
        metrics: serde_json::to_value(&summary)?,
        generation: Some((&stats).into()),
    };
    write_results(out, &results, &md)?;
    Ok(results)
}

/// The text of a multiple-choice prompt: question, `A. ...` option lines, and the instruction.
pub fn choice_prompt(question: &str, options: &[String]) -> String {
    let mut text = question.trim().to_string();
    for (i, option) in options.iter().enumerate() {
        text.push_str(&format!("\n{}. {}", option_letter(i), option));
    }
    text.push_str("\nAnswer with the option's letter from the given choices directly.");
    text
}

/// Multiple choice, scored two ways: by the letter the model generates, and by the option whose
/// answer text (`"A"` … as generated letters) has the highest log-likelihood after the prompt.
pub fn eval_choice(
    answerer: &Answerer,
    path: &Path,
    images: &Path,
    out: &Path,
    progress: bool,
) -> Result<EvalResults> {
    let started = Instant::now();
    let lines: Vec<ChoiceLine> = read_records(path)?;
    ensure!(!lines.is_empty(), "{} has no questions", path.display());
    for l in &lines {
        ensure!(
            l.options.len() >= 2,
            "{}: question {} has fewer than two options",
            path.display(),
            l.question_id
        );
        let answer = l.answer.trim().chars().next().unwrap_or(' ');
        ensure!(
            (0..l.options.len()).any(|i| option_letter(i) == answer),
            "{}: question {}: answer {:?} is not one of the option letters",
            path.display(),
            l.question_id,
            l.answer
        );
    }
    let items: Vec<PromptItem> = lines
        .iter()
        .map(|l| PromptItem {
            id: l.question_id.clone(),
            image: resolve(images, &l.image),
            text: choice_prompt(&l.question, &l.options),
        })
        .collect();
    let (answers, stats) = answerer.answer_all(&items, "mc", progress)?;
    let mut by_letter = 0usize;
    let mut by_likelihood = 0usize;
    let mut preds = Vec::new();
    for ((line, item), answer) in lines.iter().zip(&items).zip(&answers) {
        let truth = line.answer.trim().chars().next().unwrap_or(' ');
        let picked = extract_choice(answer, &line.options).map(|c| c.letter());
        by_letter += usize::from(picked == Some(truth));
        let likelihoods = option_log_likelihoods(answerer, item, line.options.len())?;
        let best = likelihoods
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| option_letter(i));
        by_likelihood += usize::from(best == Some(truth));
        preds.push(prediction(answerer, item, answer, json!({"extracted": picked.map(String::from), "likelihood_choice": best.map(String::from), "option_logprobs": likelihoods})));
    }
    std::fs::create_dir_all(out)?;
    write_predictions(&out.join("predictions.jsonl"), &preds)?;
    let n = lines.len() as f64;
    let (acc_letter, acc_lik) = (
        100.0 * by_letter as f64 / n,
        100.0 * by_likelihood as f64 / n,
    );
    let md = format!(
        "# Multiple choice ({} questions)\n\n| scoring | accuracy (%) |\n| --- | ---: |\n| generated letter | {acc_letter:.2} |\n| option likelihood | {acc_lik:.2} |\n",
        lines.len()
    );
    let results = EvalResults {
        task: "mc".into(),
        model: answerer.model_id.clone(),
        data: vec![path.display().to_string()],
        settings: json!({"template": answerer.template.name}),
        duration_s: started.elapsed().as_secs_f64(),
        headline: BTreeMap::from([
            ("mc_accuracy_letter".to_string(), acc_letter),
            ("mc_accuracy_likelihood".to_string(), acc_lik),
        ]),
        metrics: json!({"accuracy_letter": acc_letter, "accuracy_likelihood": acc_lik, "count": lines.len()}),
        generation: Some((&stats).into()),
    };
    write_results(out, &results, &md)?;
    Ok(results)
}

/// Log-likelihood of answering with each option letter (the letter's tokens after the prompt).
fn option_log_likelihoods(
    answerer: &Answerer,
    item: &PromptItem,
    n_options: usize,
) -> Result<Vec<f32>> {
    let model = &answerer.bundle.model;
    let (prompt, _) = mmkd_datasets::tokenize_prompt(
        &answerer.prompt_text(item),
        &answerer.bundle.tokenizer,
        model.image_token_id(),
        model.tokens_per_image(),
    )?;
    let pixels = match &item.image {
        Some(p) => Some(answerer.bundle.pixel_values(std::slice::from_ref(p))?),
        None => None,
    };
    let mut scores = Vec::with_capacity(n_options);
    for i in 0..n_options {
        // The separator space the template's prompt ends before the answer.
        let answer = answerer.bundle.encode(&format!(" {}", option_letter(i)))?;
        let mut ids = prompt.clone();
        ids.extend_from_slice(&answer);
        let out = model.forward(
            &TokenBatch::right_padded(&[ids.clone()], 0),
            pixels.as_ref(),
        )?;
        let logits = out
            .logits
            .squeeze(0)?
            .narrow(0, prompt.len() - 1, answer.len())?;
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        scores.push(
            answer
                .iter()
                .zip(&logprobs)
                .map(|(&t, row)| row[t as usize])
                .sum(),
        );
    }
    Ok(scores)
}

/// Reads `results.json` of several runs and lays their headline numbers side by side.
pub fn compare(dirs: &[PathBuf]) -> Result<String> {
    let mut runs = Vec::new();
    for dir in dirs {
        let path = if dir.is_file() {
            dir.clone()
        } else {
            dir.join("results.json")
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let r: EvalResults = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an mmkd results file", path.display()))?;
        runs.push((dir.display().to_string(), r));
    }
    let keys: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|(_, r)| r.headline.keys()).collect();
    let mut md = format!(
        "| metric | {} |\n| --- |{}\n",
        runs.iter()
            .map(|(d, _)| d.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        " ---: |".repeat(runs.len())
    );
    for key in keys {
        let cells: Vec<String> = runs
            .iter()
            .map(|(_, r)| {
                r.headline
                    .get(key)
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "–".into())
            })
            .collect();
        md.push_str(&format!("| {key} | {} |\n", cells.join(" | ")));
    }
    Ok(md)
}
