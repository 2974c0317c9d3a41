//! `mmkd data check`: read a data file, open its images, optionally tokenize it with a template,
//! and report counts and every problem. A data set with any data error is not fit for training.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use tokenizers::Tokenizer;

use crate::image_io::ImageCheck;
use crate::prepare::tokenize_samples;
use crate::problem::{count_by_kind, Problem, ProblemKind};
use crate::progress::Progress;
use crate::reader::LlavaDataset;
use crate::template::Template;
use crate::tokenize::{TokenizeConfig, TokenizedSample};

/// Tokenization settings for a check.
pub struct TokenCheck<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a Template,
    pub config: TokenizeConfig,
}

/// What to check.
pub struct CheckOptions<'a> {
    pub image_check: ImageCheck,
    pub threads: usize,
    /// Tokenize and verify labels too.
    pub tokens: Option<TokenCheck<'a>>,
}

/// Distribution of a per-sample count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distribution {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
    pub mean: f64,
}

impl Distribution {
    pub fn of(mut values: Vec<usize>) -> Option<Distribution> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Some(Distribution {
            min: values[0],
            median: at(0.5),
            p95: at(0.95),
            max: values[values.len() - 1],
            mean: values.iter().sum::<usize>() as f64 / values.len() as f64,
        })
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "min {} / median {} / p95 {} / max {} (mean {:.1})",
            self.min, self.median, self.p95, self.max, self.mean
        )
    }
}

/// The result of a check.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub file: PathBuf,
    /// Records in the file.
    pub records: usize,
    /// Samples with no problem.
    pub usable: usize,
    pub with_images: usize,
    pub text_only: usize,
    /// Images over the usable samples.
    pub images: usize,
    /// Question/answer rounds per usable sample.
    pub rounds: Option<Distribution>,
    /// Tokens per sample (image blocks included), when tokenized.
    pub tokens: Option<Distribution>,
    /// Supervised tokens per sample, when tokenized.
    pub supervised_tokens: Option<Distribution>,
    /// Usable samples cut at max_length.
    pub truncated: usize,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Problems that are defects of the data (not samples merely too long).
    pub fn data_errors(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.kind.is_data_error())
            .count()
    }
}

impl CheckReport {
    /// The problems grouped by kind, in the order kinds first appear: the first `shown` of each
    /// kind in full, then how many more there are.
    pub fn problems_grouped(&self, shown: usize) -> String {
        let mut kinds: Vec<ProblemKind> = Vec::new();
        for p in &self.problems {
            if !kinds.contains(&p.kind) {
                kinds.push(p.kind);
            }
        }
        let mut out = String::new();
        for kind in kinds {
            let of_kind: Vec<&Problem> = self.problems.iter().filter(|p| p.kind == kind).collect();
            out.push_str(&format!("{kind:?}: {} sample(s)\n", of_kind.len()));
            for p in of_kind.iter().take(shown) {
                out.push_str(&format!("  {p}\n"));
            }
            if of_kind.len() > shown {
                out.push_str(&format!("  … and {} more\n", of_kind.len() - shown));
            }
        }
        out
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file: {}", self.file.display())?;
        writeln!(f, "records: {}", self.records)?;
        writeln!(
            f,
            "usable samples: {} ({} with images, {} text-only)",
            self.usable, self.with_images, self.text_only
        )?;
        writeln!(f, "images: {}", self.images)?;
        if let Some(d) = &self.rounds {
            writeln!(f, "rounds per sample: {d}")?;
        }
        if let Some(d) = &self.tokens {
            writeln!(f, "tokens per sample: {d}")?;
        }
        if let Some(d) = &self.supervised_tokens {
            writeln!(f, "supervised tokens per sample: {d}")?;
        }
        if self.tokens.is_some() {
            writeln!(f, "truncated: {}", self.truncated)?;
        }
        write!(f, "problems: {}", self.problems.len())?;
        let counts = count_by_kind(&self.problems);
        if !counts.is_empty() {
            let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

/// Check `data` with images under `image_root`. Fails only when the file cannot be read at all
/// (missing, malformed JSON list) or the tokenizer cannot serve the template.
pub fn check_dataset(
    data: &Path,
    image_root: &Path,
    opts: &CheckOptions,
    progress: &dyn Progress,
) -> Result<CheckReport> {
    let mut dataset = LlavaDataset::read(data, image_root)?;
    progress.start("images", dataset.samples.len() as u64);
    dataset.verify_images(opts.image_check, opts.threads, &|n| progress.inc(n));
    progress.finish();

    let mut problems = dataset.problems.clone();
    let mut tokenized: Option<Vec<TokenizedSample>> = None;
    if let Some(tc) = &opts.tokens {
        progress.start("tokenize", dataset.samples.len() as u64);
        let (kept, token_problems) = tokenize_samples(
            &dataset.samples,
            tc.tokenizer,
            tc.template,
            &tc.config,
            opts.threads,
            &|n| progress.inc(n),
        )?;
        progress.finish();
        problems.extend(token_problems);
        problems.sort_by_key(|p| p.sample.index);
        tokenized = Some(kept);
    }

    // Counts are over samples with no problem at all.
    let usable_indices: std::collections::HashSet<usize> = match &tokenized {
        Some(kept) => kept.iter().map(|s| s.index).collect(),
        None => dataset.samples.iter().map(|s| s.reference.index).collect(),
    };
    let usable: Vec<_> = dataset
        .samples
        .iter()
        .filter(|s| usable_indices.contains(&s.reference.index))
        .collect();
    Ok(CheckReport {
        file: data.to_path_buf(),
        records: dataset.records,
        usable: usable.len(),
        with_images: usable.iter().filter(|s| s.has_images()).count(),
        text_only: usable.iter().filter(|s| !s.has_images()).count(),
        images: usable.iter().map(|s| s.images.len()).sum(),
        rounds: Distribution::of(usable.iter().map(|s| s.num_rounds()).collect()),
        tokens: tokenized
            .as_ref()
            .and_then(|k| Distribution::of(k.iter().map(|s| s.len()).collect())),
        supervised_tokens: tokenized
            .as_ref()
            .and_then(|k| Distribution::of(k.iter().map(|s| s.supervised_count()).collect())),
        truncated: tokenized
            .as_ref()
            .map(|k| k.iter().filter(|s| s.truncated).count())
            .unwrap_or(0),
        problems,
    })
}
