//! Corpus BLEU-1..4 as pycocoevalcap's `Bleu(4)` computes it (`option='closest'`).
//!
//! Per image: candidate n-gram counts clipped by the maximum count in any single reference;
//! guesses = max(0, c − n + 1); the effective reference length is the reference length closest to
//! the candidate length, ties going to the shorter reference. Sums run over the corpus; then
//! BLEU-N = (Π_{n≤N} (matches_n + 1e-15) / (guesses_n + 1e-9))^(1/N), times the brevity penalty
//! exp(1 − 1/ratio) when ratio = (c + 1e-15) / (r + 1e-9) < 1. The tiny/small constants are
//! pycocoevalcap's: they make an all-zero precision give ~0 instead of a division by zero.

use super::ngrams::{count_ngrams, NgramCounts};

pub const MAX_N: usize = 4;
const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;

/// Corpus-level BLEU and the length statistics behind the brevity penalty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BleuScores {
    /// BLEU-1..4 in [0, 1].
    pub bleu: [f64; MAX_N],
    /// Total candidate length.
    pub candidate_len: usize,
    /// Total effective ("closest") reference length.
    pub reference_len: usize,
}

/// Per-image sufficient statistics.
#[derive(Debug, Clone, Copy, Default)]
struct BleuStats {
    candidate_len: usize,
    reference_len: usize,
    guesses: [usize; MAX_N],
    matches: [usize; MAX_N],
}

fn image_stats(candidate: &[&str], references: &[Vec<&str>]) -> BleuStats {
    let mut max_ref_counts: NgramCounts = NgramCounts::new();
    for r in references {
        for (gram, count) in count_ngrams(r, MAX_N) {
            let entry = max_ref_counts.entry(gram).or_insert(0);
            *entry = (*entry).max(count);
        }
    }
    let c = candidate.len();
    // min over (|len − c|, len): ties on distance go to the shorter reference.
    let reference_len = references
        .iter()
        .map(|r| r.len())
        .min_by_key(|&l| (l.abs_diff(c), l))
        .unwrap_or(0);
    let mut stats = BleuStats {
        candidate_len: c,
        reference_len,
        ..Default::default()
    };
    for k in 0..MAX_N {
        stats.guesses[k] = (c + 1).saturating_sub(k + 1);
    }
    for (gram, count) in count_ngrams(candidate, MAX_N) {
        let clip = max_ref_counts.get(gram).copied().unwrap_or(0);
        stats.matches[gram.len() - 1] += count.min(clip);
    }
    stats
}

/// Corpus BLEU over (candidate words, reference word lists) pairs.
pub fn corpus_bleu(candidates: &[Vec<&str>], references: &[Vec<Vec<&str>>]) -> BleuScores {
    let mut total = BleuStats::default();
    for (cand, refs) in candidates.iter().zip(references) {
        let s = image_stats(cand, refs);
        total.candidate_len += s.candidate_len;
        total.reference_len += s.reference_len;
        for k in 0..MAX_N {
            total.guesses[k] += s.guesses[k];
            total.matches[k] += s.matches[k];
        }
    }
    let mut bleu = [0.0; MAX_N];
    let mut product = 1.0;
    for (k, b) in bleu.iter_mut().enumerate() {
        product *= (total.matches[k] as f64 + TINY) / (total.guesses[k] as f64 + SMALL);
        *b = product.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (total.candidate_len as f64 + TINY) / (total.reference_len as f64 + SMALL);
    if ratio < 1.0 {
        let penalty = (1.0 - 1.0 / ratio).exp();
        for b in &mut bleu {
            *b *= penalty;
        }
    }
    BleuScores {
        bleu,
        candidate_len: total.candidate_len,
        reference_len: total.reference_len,
    }
}
