//! CIDEr-D as pycocoevalcap's `Cider` computes it (n = 1..4, σ = 6).
//!
//! idf(g) = ln(N) − ln(max(1, df(g))), with df(g) the number of images whose reference set
//! contains g and N the number of images evaluated (so the idf comes from the evaluated corpus's
//! own references). A caption's vector for each n holds count × idf. Per reference and n:
//! sim_n = Σ_g min(c_g, r_g)·r_g / (‖c‖·‖r‖) (the division skipped when a norm is 0) ×
//! exp(−δ² / (2σ²)). Image score = 10 × mean over n of the sum over references / #references;
//! corpus score = mean over images.
//!
//! pycocoevalcap's length δ is a quirk kept here: its "length" counts the caption's *bigrams*
//! (the counter is incremented for n-gram index 1), i.e. max(0, words − 1), not its words.

use std::collections::HashMap;

use super::ngrams::{count_ngrams, NgramCounts};

pub const MAX_N: usize = 4;
pub const SIGMA: f64 = 6.0;

/// One caption's tf-idf vectors, their norms and its bigram count.
struct CaptionVector<'a> {
    vec: [HashMap<&'a [&'a str], f64>; MAX_N],
    norm: [f64; MAX_N],
    length: usize,
}

fn to_vector<'a>(
    counts: &NgramCounts<'a>,
    doc_freq: &HashMap<&'a [&'a str], usize>,
    log_n: f64,
) -> CaptionVector<'a> {
    let mut vec: [HashMap<&[&str], f64>; MAX_N] = Default::default();
    let mut norm = [0.0; MAX_N];
    let mut length = 0;
    for (&gram, &tf) in counts {
        let df = doc_freq.get(gram).copied().unwrap_or(0).max(1) as f64;
        let n = gram.len() - 1;
        let value = tf as f64 * (log_n - df.ln());
        vec[n].insert(gram, value);
        norm[n] += value * value;
        if n == 1 {
            length += tf;
        }
    }
    CaptionVector {
        vec,
        norm: norm.map(f64::sqrt),
        length,
    }
}

fn similarity(cand: &CaptionVector, reference: &CaptionVector) -> [f64; MAX_N] {
    let delta = cand.length as f64 - reference.length as f64;
    let penalty = (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
    let mut val = [0.0; MAX_N];
    for (n, v) in val.iter_mut().enumerate() {
        for (gram, &c) in &cand.vec[n] {
            let r = reference.vec[n].get(gram).copied().unwrap_or(0.0);
            *v += c.min(r) * r;
        }
        if cand.norm[n] != 0.0 && reference.norm[n] != 0.0 {
            *v /= cand.norm[n] * reference.norm[n];
        }
        *v *= penalty;
    }
    val
}

/// Per-image CIDEr-D scores (same order as the input) for word-split captions.
pub fn cider_d(candidates: &[Vec<&str>], references: &[Vec<Vec<&str>>]) -> Vec<f64> {
    let ref_counts: Vec<Vec<NgramCounts>> = references
        .iter()
        .map(|refs| refs.iter().map(|r| count_ngrams(r, MAX_N)).collect())
        .collect();
    let mut doc_freq: HashMap<&[&str], usize> = HashMap::new();
    for refs in &ref_counts {
        let mut seen: std::collections::HashSet<&[&str]> = std::collections::HashSet::new();
        for counts in refs {
            seen.extend(counts.keys().copied());
        }
        for gram in seen {
            *doc_freq.entry(gram).or_insert(0) += 1;
        }
    }
    let log_n = (references.len() as f64).ln();
    candidates
        .iter()
        .zip(&ref_counts)
        .map(|(cand, refs)| {
            let cand_vec = to_vector(&count_ngrams(cand, MAX_N), &doc_freq, log_n);
            let mut sum = [0.0; MAX_N];
            for r in refs {
                let sim = similarity(&cand_vec, &to_vector(r, &doc_freq, log_n));
                for n in 0..MAX_N {
                    sum[n] += sim[n];
                }
            }
            let mean_over_n = sum.iter().sum::<f64>() / MAX_N as f64;
            mean_over_n / refs.len() as f64 * 10.0
        })
        .collect()
}
