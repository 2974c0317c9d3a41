//! Tokenizing a whole data set in parallel and summarising what was kept, cut and skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::thread;

use anyhow::Result;
use tokenizers::Tokenizer;

use crate::problem::{count_by_kind, Problem, ProblemKind};
use crate::reader::LlavaDataset;
use crate::sample::Sample;
use crate::template::Template;
use crate::tokenize::{check_tokenizer, tokenize_sample, TokenizeConfig, TokenizedSample};

/// Samples ready for batching, and the account of the ones that are not.
#[derive(Debug, Clone)]
pub struct TokenizedDataset {
    pub samples: Vec<TokenizedSample>,
    pub report: PrepareReport,
}

/// What happened to every record of a data file between reading and batching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareReport {
    /// Records in the file.
    pub records: usize,
    /// Samples kept for training.
    pub kept: usize,
    /// Kept samples that were cut at `max_length`.
    pub truncated: usize,
    /// Every record not kept, with the reason (reading, image and tokenization problems).
    pub problems: Vec<Problem>,
}

impl PrepareReport {
    pub fn skipped_by_kind(&self) -> BTreeMap<ProblemKind, usize> {
        count_by_kind(&self.problems)
    }

    /// Problems that are defects in the data (everything except samples too long to fit).
    pub fn data_errors(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.kind.is_data_error())
            .count()
    }
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records: {} kept ({} truncated), {} skipped",
            self.records,
            self.kept,
            self.truncated,
            self.problems.len()
        )?;
        let counts = self.skipped_by_kind();
        if !counts.is_empty() {
            let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

impl TokenizedDataset {
    /// Tokenize every usable sample of `dataset`; the report also carries the dataset's reading
    /// (and image) problems. Fails only when the tokenizer cannot serve the template at all.
    pub fn build(
        dataset: &LlavaDataset,
        tokenizer: &Tokenizer,
        template: &Template,
        cfg: &TokenizeConfig,
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<TokenizedDataset> {
        let (samples, problems) = tokenize_samples(
            &dataset.samples,
            tokenizer,
            template,
            cfg,
            threads,
            progress,
        )?;
        let mut all_problems = dataset.problems.clone();
        all_problems.extend(problems);
        all_problems.sort_by_key(|p| p.sample.index);
        let report = PrepareReport {
            records: dataset.records,
            kept: samples.len(),
            truncated: samples.iter().filter(|s| s.truncated).count(),
            problems: all_problems,
        };
        Ok(TokenizedDataset { samples, report })
    }
}

/// Tokenize `samples` on `threads` threads, keeping file order.
pub fn tokenize_samples(
    samples: &[Sample],
    tokenizer: &Tokenizer,
    template: &Template,
    cfg: &TokenizeConfig,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<TokenizedSample>, Vec<Problem>)> {
    check_tokenizer(tokenizer, template)?;
    let chunk = samples.len().div_ceil(threads.max(1)).max(1);
    let results: Vec<Result<TokenizedSample, Problem>> = thread::scope(|scope| {
        let handles: Vec<_> = samples
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|s| {
                            let r = tokenize_sample(s, tokenizer, template, cfg);
                            progress(1);
                            r
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    for r in results {
        match r {
            Ok(s) => kept.push(s),
            Err(p) => problems.push(p),
        }
    }
    Ok((kept, problems))
}
