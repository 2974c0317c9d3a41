//! COCO caption metrics with pycocoevalcap's conventions: PTB tokenization, BLEU-1..4,
//! ROUGE-L, CIDEr-D. METEOR and SPICE are **not computed** (they run Java programs — METEOR 1.5
//! with its paraphrase tables, SPICE with a scene-graph parser — that have no faithful Rust port
//! here); reports say so instead of printing a number.

pub mod bleu;
pub mod cider;
mod ngrams;
pub mod ptb;
pub mod rouge;

use anyhow::{bail, Result};
use serde::Serialize;

use super::ids::SampleId;
pub use ptb::tokenize_captions;

/// Printed wherever METEOR would appear.
pub const METEOR_NOTE: &str =
    "METEOR not computed: it needs the Java METEOR 1.5 jar and has no faithful Rust port here";

/// One image: the model's caption and the human references.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionExample {
    pub id: SampleId,
    pub candidate: String,
    pub references: Vec<String>,
}

/// Captions after pycocoevalcap's tokenization (lowercased, punctuation removed, space-joined).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedCaptions {
    pub candidates: Vec<String>,
    pub references: Vec<Vec<String>>,
}

/// Tokenize as `COCOEvalCap.evaluate` does: one tokenizer run over all references (image order,
/// then reference order) and one over all candidates.
pub fn tokenize_examples(examples: &[CaptionExample]) -> TokenizedCaptions {
    let flat_refs: Vec<&str> = examples
        .iter()
        .flat_map(|e| e.references.iter().map(String::as_str))
        .collect();
    let mut tokenized_refs = tokenize_captions(&flat_refs).into_iter();
    let references = examples
        .iter()
        .map(|e| tokenized_refs.by_ref().take(e.references.len()).collect())
        .collect();
    let candidates: Vec<&str> = examples.iter().map(|e| e.candidate.as_str()).collect();
    TokenizedCaptions {
        candidates: tokenize_captions(&candidates),
        references,
    }
}

/// Scores of one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageCaptionScores {
    pub id: SampleId,
    pub rouge_l: f64,
    pub cider: f64,
}

/// Corpus caption metrics on pycocoevalcap's scale: BLEU and ROUGE-L in [0, 1], CIDEr-D as
/// pycocoevalcap returns it (×10 inside, so typically 0–1.5 for COCO models).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptionScores {
    pub bleu: [f64; 4],
    pub rouge_l: f64,
    pub cider: f64,
    pub count: usize,
    pub per_image: Vec<ImageCaptionScores>,
}

/// Score already-tokenized captions. `ids` name the images in errors and per-image scores.
pub fn score_tokenized(ids: &[SampleId], tokenized: &TokenizedCaptions) -> Result<CaptionScores> {
    let n = tokenized.candidates.len();
    if n == 0 {
        bail!("no captions to score");
    }
    if tokenized.references.len() != n || ids.len() != n {
        bail!(
            "{} candidates, {} reference sets and {} ids: they must be the same length",
            n,
            tokenized.references.len(),
            ids.len()
        );
    }
    if let Some(i) = tokenized.references.iter().position(Vec::is_empty) {
        bail!("image {}: no reference captions", ids[i]);
    }
    let cand_words: Vec<Vec<&str>> = tokenized
        .candidates
        .iter()
        .map(|c| ngrams::words(c))
        .collect();
    let ref_words: Vec<Vec<Vec<&str>>> = tokenized
        .references
        .iter()
        .map(|refs| refs.iter().map(|r| ngrams::words(r)).collect())
        .collect();
    let bleu = bleu::corpus_bleu(&cand_words, &ref_words);
    let cider = cider::cider_d(&cand_words, &ref_words);
    let rouge: Vec<f64> = tokenized
        .candidates
        .iter()
        .zip(&tokenized.references)
        .map(|(c, refs)| {
            let refs: Vec<Vec<&str>> = refs.iter().map(|r| rouge::rouge_words(r)).collect();
            rouge::rouge_l(&rouge::rouge_words(c), &refs)
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(CaptionScores {
        bleu: bleu.bleu,
        rouge_l: mean(&rouge),
        cider: mean(&cider),
        count: n,
        per_image: ids
            .iter()
            .zip(rouge.iter().zip(&cider))
            .map(|(id, (&rouge_l, &cider))| ImageCaptionScores {
                id: id.clone(),
                rouge_l,
                cider,
            })
            .collect(),
    })
}

/// Tokenize and score, as `COCOEvalCap.evaluate` (without METEOR and SPICE).
pub fn evaluate_captions(examples: &[CaptionExample]) -> Result<CaptionScores> {
    if let Some(e) = examples.iter().find(|e| e.references.is_empty()) {
        bail!("image {}: no reference captions", e.id);
    }
    let tokenized = tokenize_examples(examples);
    let ids: Vec<SampleId> = examples.iter().map(|e| e.id.clone()).collect();
    score_tokenized(&ids, &tokenized)
}
