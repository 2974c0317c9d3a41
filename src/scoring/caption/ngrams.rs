//! n-gram counting shared by BLEU and CIDEr-D.

use std::collections::HashMap;

use crate::scoring::pytext::py_split_whitespace;

/// Counts of every n-gram with 1 ≤ n ≤ `max_n` (`precook` in pycocoevalcap).
pub type NgramCounts<'a> = HashMap<&'a [&'a str], usize>;

/// Words of a tokenized caption as BLEU and CIDEr see them: Python `str.split()`, which also
/// splits at the no-break spaces PTBTokenizer leaves inside fraction and phone tokens.
pub fn words(tokenized: &str) -> Vec<&str> {
    py_split_whitespace(tokenized).collect()
}

pub fn count_ngrams<'a>(words: &'a [&'a str], max_n: usize) -> NgramCounts<'a> {
    let mut counts = NgramCounts::new();
    for n in 1..=max_n {
        for gram in words.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}
