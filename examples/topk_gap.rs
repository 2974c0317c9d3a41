//! How far MDist against a teacher's top-k (the offline teacher cache) is from the exact
//! full-vocabulary MDist: for each k, the mean per-token |L_topk − L_exact| of L_res and L_vis
//! and the relative error Σ|L_topk − L_exact| / Σ L_exact, over a data set, for a trained
//! teacher and student. Prints a Markdown table (docs/performance.md).
//!
//! cargo run --example topk_gap -- --teacher T --student S --data D --images I \
//!     [--config shapes-tiny] [--stage dft] [--k 1,4,16,64]   (k = vocabulary is always added)

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use mmkd::batch::{prepare_data, training_tokenize_config, ModelInputs};
use mmkd::config::{load_document, Role, Stage, StageSettings};
use mmkd::distill::positions::{gather_rows, response_rows, visual_rows};
use mmkd::distill::{topk_per_token, TopKHost};
use mmkd::models::llava::Trainable;
use mmkd::stages::init::from_checkpoint;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    teacher: String,
    #[arg(long)]
    student: String,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    images: PathBuf,
    #[arg(long, default_value = "shapes-tiny")]
    config: String,
    #[arg(long, default_value = "dft")]
    stage: String,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    k: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

/// Per-token sums for one term and one k.
#[derive(Clone, Copy, Default)]
struct Gap {
    tokens: usize,
    exact: f64,
    abs_diff: f64,
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let stage = match args.stage.as_str() {
        "dpt" => Stage::Dpt,
        "dft" => Stage::Dft,
        other => anyhow::bail!("--stage must be dpt or dft, got {other}"),
    };
    let settings = StageSettings::resolve(&load_document(&args.config)?, stage, Role::Student)?;
    let cfg = &settings.distill;
    let teacher = from_checkpoint(&args.teacher, Trainable::NONE, DType::F32, &Device::Cpu)
        .context("teacher")?;
    let student = from_checkpoint(&args.student, Trainable::NONE, DType::F32, &Device::Cpu)
        .context("student")?;
    let vocab = teacher.model.config.text_config.vocab_size;
    let mut ks: Vec<usize> = args.k.iter().copied().filter(|&k| k < vocab).collect();
    ks.push(vocab);
    let template = mmkd_datasets::Template::by_name_or_path(&settings.template())?;
    let data = prepare_data(
        &args.data,
        &args.images,
        &student.tokenizer,
        &template,
        &training_tokenize_config(&student.model, settings.data.max_length),
        "topk_gap",
    )?;
    // gaps[term][k index]
    let mut gaps = vec![vec![Gap::default(); ks.len()]; 2];
    let indices: Vec<usize> = (0..data.samples.len()).collect();
    for chunk in indices.chunks(args.batch_size) {
        let batch = ModelInputs::collate(&data.samples, chunk.to_vec(), &student)?;
        let (tokens, pixels) = (&batch.tokens, batch.pixels.as_ref());
        let s_out = student.model.forward(tokens, pixels)?;
        let t_out = teacher.model.forward(tokens, pixels)?;
        let (labels, mask) = (&batch.labels, &batch.visual_mask);
        let rows = [response_rows(labels)?.rows, visual_rows(mask)?];
        for (term, rows) in rows.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let s = gather_rows(&s_out.logits, rows)?;
            let t = gather_rows(&t_out.logits, rows)?;
            let exact = values(&cfg.per_token(&s, &t)?)?;
            for (ki, &k) in ks.iter().enumerate() {
                let top = TopKHost::from_logits(&t, k, cfg.temperature)?.to_tensors(s.device())?;
                let approx = values(&topk_per_token(&s, &top, cfg)?)?;
                let g = &mut gaps[term][ki];
                g.tokens += exact.len();
                g.exact += exact.iter().sum::<f64>();
                g.abs_diff += exact
                    .iter()
                    .zip(&approx)
                    .map(|(e, a)| (a - e).abs())
                    .sum::<f64>();
            }
        }
    }
    println!(
        "{} samples, divergence {}, T = {}; per-token means over {} response and {} visual positions\n",
        data.samples.len(),
        cfg.divergence,
        cfg.temperature,
        gaps[0][0].tokens,
        gaps[1][0].tokens
    );
    println!("| k | L_res exact | mean abs gap L_res | rel. error L_res | L_vis exact | mean abs gap L_vis | rel. error L_vis |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (ki, &k) in ks.iter().enumerate() {
        let cell = |g: &Gap| {
            let n = g.tokens.max(1) as f64;
            (
                g.exact / n,
                g.abs_diff / n,
                g.abs_diff / g.exact.max(f64::MIN_POSITIVE),
            )
        };
        let (re, rd, rr) = cell(&gaps[0][ki]);
        let (ve, vd, vr) = cell(&gaps[1][ki]);
        let label = if k == vocab {
            format!("{k} (vocab)")
        } else {
            k.to_string()
        };
        println!(
            "| {label} | {re:.4} | {rd:.2e} | {:.2}% | {ve:.4} | {vd:.2e} | {:.2}% |",
            100.0 * rr,
            100.0 * vr
        );
    }
    Ok(())
}
