//! ROUGE-L as pycocoevalcap's `Rouge` computes it (β = 1.2).
//!
//! Captions are split on single spaces (`str.split(" ")`), so an empty caption is one empty
//! token — it matches nothing, except an empty reference. Per reference, LCS-based precision
//! (÷ candidate length) and recall (÷ reference length); the maximum precision and the maximum
//! recall over references are taken separately; F = (1+β²)·P·R / (R + β²·P), 0 if P or R is 0.

pub const BETA: f64 = 1.2;

/// Words as ROUGE-L sees them.
pub fn rouge_words(tokenized: &str) -> Vec<&str> {
    tokenized.split(' ').collect()
}

/// Length of the longest common subsequence.
pub fn lcs_len(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L of one candidate against its references (words from [`rouge_words`]).
pub fn rouge_l(candidate: &[&str], references: &[Vec<&str>]) -> f64 {
    let mut best_precision: f64 = 0.0;
    let mut best_recall: f64 = 0.0;
    for r in references {
        let lcs = lcs_len(r, candidate) as f64;
        best_precision = best_precision.max(lcs / candidate.len() as f64);
        best_recall = best_recall.max(lcs / r.len() as f64);
    }
    if best_precision == 0.0 || best_recall == 0.0 {
        return 0.0;
    }
    let b2 = BETA * BETA;
    ((1.0 + b2) * best_precision * best_recall) / (best_recall + b2 * best_precision)
}
