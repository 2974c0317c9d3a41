//! A black-box teacher's `top_logprobs` kept in the teacher-cache format (`--keep-logprobs K`
//! with `--teacher-url`), so that a white-box term (DFT's `mdist.response`) trains on the
//! written data without the teacher.
//!
//! The server reports its tokens as text; each is mapped to the student's id whose decoded text
//! it is (texts several ids decode to, and partial characters, map to none). A sample is kept
//! only when the generated tokens map to exactly the answer tokens the student is trained on
//! (its tokenization in the DFT's template); each record then holds one question and answer,
//! so the teacher answered in the context the student trains in. At an answer token the row is
//! the server's alternatives (their log-probabilities at temperature 1, what APIs report); the
//! mass they leave goes to the rest bucket (slots the server filled no alternative for hold
//! filler ids at 10⁻⁸). At the positions after
//! the answer, which a server reports nothing for (the end of the answer), the row holds the
//! data's token with probability 1 − [`END_SMOOTHING`]. Image-token rows are not stored: the
//! cache's manifest says so, and objectives that read them are refused.

use std::collections::HashMap;

use mmkd_datasets::{tokenize_sample, TokenizedSample};
use serde::{Deserialize, Serialize};

use super::client::TokenAlternatives;
use super::filters::Written;
use super::teacher::{conversation, SpanCheck};
use crate::distill::TopKHost;

/// The mass the end-of-answer rows leave to everything but the data's token.
pub const END_SMOOTHING: f32 = 1e-3;

/// Decoded token text → the student's token id (unambiguous ones only).
pub struct TokenMap {
    ids: HashMap<String, u32>,
}

impl TokenMap {
    /// The map of `decode` over the vocabulary `0..vocab`.
    pub fn new(vocab: usize, decode: impl Fn(u32) -> Option<String>) -> Self {
        let mut ids: HashMap<String, Option<u32>> = HashMap::new();
        for id in 0..vocab as u32 {
            let Some(text) = decode(id) else { continue };
            if text.is_empty() || text.contains('\u{FFFD}') {
                continue;
            }
            ids.entry(text)
                .and_modify(|e| *e = None)
                .or_insert(Some(id));
        }
        Self {
            ids: ids
                .into_iter()
                .filter_map(|(t, id)| Some((t, id?)))
                .collect(),
        }
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }
}

/// One sample's cached rows, as a chunk file keeps them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleRows {
    pub positions: Vec<u32>,
    pub ids: Vec<u32>,
    pub log_probs: Vec<f32>,
    pub rest: Vec<f32>,
}

impl SampleRows {
    pub fn top_k(&self, k: usize) -> TopKHost {
        TopKHost {
            k,
            ids: self.ids.clone(),
            log_probs: self.log_probs.clone(),
            rest: self.rest.clone(),
        }
    }
}

/// What the rows are built with: the DFT's tokenization, the token map and K.
pub struct RowBuilder<'a> {
    pub tokenization: &'a SpanCheck,
    pub map: &'a TokenMap,
    pub k: usize,
    pub vocab: usize,
}

impl RowBuilder<'_> {
    /// The rows of a one-round sample, or `None` when the server's tokens are not the
    /// student's answer tokens.
    pub fn rows(
        &self,
        image: &std::path::Path,
        written: &Written,
        tokens: &[TokenAlternatives],
    ) -> Option<SampleRows> {
        let t = &self.tokenization;
        let sample = tokenize_sample(
            &conversation(image, std::iter::once(written)),
            &t.tokenizer,
            &t.template,
            &t.config,
        )
        .ok()?;
        if sample.truncated {
            return None;
        }
        let positions = crate::batch::response_positions(&sample);
        let labels = label_ids(&sample, &positions);
        let generated: Vec<u32> = tokens
            .iter()
            .map(|a| self.map.id(&a.token))
            .collect::<Option<_>>()?;
        if generated.is_empty()
            || generated.len() > labels.len()
            || labels[..generated.len()] != generated[..]
        {
            return None;
        }
        let mut rows = SampleRows {
            positions,
            ..SampleRows::default()
        };
        for (i, &label) in labels.iter().enumerate() {
            let known: Vec<(u32, f32)> = match tokens.get(i) {
                Some(a) => {
                    let mut alts: Vec<(u32, f32)> = a
                        .top
                        .iter()
                        .filter_map(|(text, lp)| Some((self.map.id(text)?, *lp)))
                        .collect();
                    if alts.is_empty() {
                        alts.push((label, a.logprob));
                    }
                    alts
                }
                None => vec![(label, (1.0 - END_SMOOTHING).ln())],
            };
            push_row(&mut rows, known, self.k, self.vocab);
        }
        Some(rows)
    }
}

/// One row: the known (id, log-prob) pairs (the first K distinct, most likely first), the
/// slots left filled with unused ids at next to no mass, the leftover in the rest bucket.
fn push_row(rows: &mut SampleRows, mut known: Vec<(u32, f32)>, k: usize, vocab: usize) {
    known.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut seen = std::collections::HashSet::new();
    known.retain(|(id, _)| (*id as usize) < vocab && seen.insert(*id));
    known.truncate(k);
    let mass: f32 = known.iter().map(|(_, lp)| lp.exp()).sum();
    let pads = k - known.len();
    // The slots nothing was reported for are filler ids: next to no mass, so the student is
    // not pulled towards them; what the alternatives leave goes to the rest bucket (at least
    // a sliver: reported log-probabilities are rounded).
    let left = (1.0 - mass - pads as f32 * PAD_MASS).max(1e-6);
    let mut next = 0u32;
    for _ in 0..pads {
        while seen.contains(&next) {
            next += 1;
        }
        seen.insert(next);
        known.push((next, PAD_MASS.ln()));
    }
    rows.ids.extend(known.iter().map(|(id, _)| id));
    rows.log_probs.extend(known.iter().map(|(_, lp)| lp));
    rows.rest.push(left.ln());
}

/// The probability of a filler id in a row's unreported slots.
const PAD_MASS: f32 = 1e-8;

/// Where a server's kept log-probabilities go: the DFT run they are for and the student
/// whose tokenization they are in.
pub struct ApiCache<'a> {
    pub rows: RowBuilder<'a>,
    pub settings: &'a crate::config::StageSettings,
    pub student: &'a crate::checkpoint::LoadedModel,
    pub teacher: crate::teacher_cache::TeacherIdentity,
}

impl ApiCache<'_> {
    /// Writes the cache of `data` (record i has `rows[i]`) into `out` (resuming an interrupted
    /// write of the same); returns what the distill-data manifest records of it.
    pub fn write(
        &self,
        data: &std::path::Path,
        images: &std::path::Path,
        out: &std::path::Path,
        rows: &[SampleRows],
    ) -> anyhow::Result<serde_json::Value> {
        use crate::teacher_cache::{CacheWriter, Manifest, SampleRecord};
        let k = self.rows.k;
        let run = crate::teacher::run_identity(
            self.settings,
            data,
            images,
            &self.rows.tokenization.template,
            &self.student.tokenizer,
            &self.student.processor,
        )?;
        let job = serde_json::json!({"run": run, "teacher": self.teacher, "top_k": k, "api": true});
        let (mut writer, done) = CacheWriter::open(out, job, k, 1024)?;
        for (index, r) in rows.iter().enumerate().skip(done) {
            writer.push(&SampleRecord {
                index,
                response_positions: r.positions.clone(),
                response: r.top_k(k),
                visual_positions: Vec::new(),
                visual: TopKHost::empty(k),
                relation: None,
            })?;
        }
        let model = &self.student.model;
        let manifest = writer.finish(Manifest {
            run,
            teacher: self.teacher.clone(),
            top_k: k,
            vocab: self.rows.vocab,
            image_token_id: model.image_token_id(),
            tokens_per_image: model.tokens_per_image(),
            relations: false,
            visual: false,
            data: data.display().to_string(),
            samples: rows.len(),
            response_positions: rows.iter().map(|r| r.positions.len()).sum(),
            visual_positions: 0,
            skipped: Default::default(),
            shards: Vec::new(),
        })?;
        Ok(
            serde_json::json!({"dir": out.file_name().map(|n| n.to_string_lossy().to_string()),
            "top_k": k, "samples": manifest.samples, "source": "api top_logprobs"}),
        )
    }
}

/// The supervised token at each response position (the label one ahead).
fn label_ids(sample: &TokenizedSample, positions: &[u32]) -> Vec<u32> {
    positions
        .iter()
        .map(|&t| sample.labels[t as usize + 1] as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_map_keeps_unambiguous_whole_texts() {
        let texts = ["a", "b", "a", "", "\u{FFFD}", "c"];
        let map = TokenMap::new(texts.len(), |id| Some(texts[id as usize].to_string()));
        assert_eq!(map.id("b"), Some(1));
        assert_eq!(map.id("c"), Some(5));
        assert_eq!(map.id("a"), None, "two ids decode to it");
        assert_eq!(map.id(""), None);
    }

    #[test]
    fn rows_are_proper_distributions_over_k_distinct_ids() {
        let mut rows = SampleRows::default();
        push_row(
            &mut rows,
            vec![(3, -0.5), (7, -1.5), (3, -2.0), (12, -3.0)],
            4,
            10,
        );
        push_row(&mut rows, vec![(2, (1.0 - END_SMOOTHING).ln())], 4, 10);
        assert_eq!(rows.rest.len(), 2);
        for r in 0..2 {
            let ids = &rows.ids[r * 4..r * 4 + 4];
            let mut distinct = ids.to_vec();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "{ids:?}");
            assert!(ids.iter().all(|&i| i < 10));
            let total: f32 = rows.log_probs[r * 4..r * 4 + 4]
                .iter()
                .chain([&rows.rest[r]])
                .map(|lp| lp.exp())
                .sum();
            assert!((total - 1.0).abs() < 1e-5, "row {r}: {total}");
        }
        assert_eq!(
            &rows.ids[..2],
            &[3, 7],
            "most likely first, duplicates and ids outside the vocabulary dropped"
        );
        assert_eq!(rows.ids[4], 2);
        // Filler ids carry next to nothing; the leftover is the rest's.
        assert!(rows.log_probs[3].exp() < 1e-7 && rows.log_probs[5].exp() < 1e-7);
        assert!(
            (rows.rest[1].exp() - END_SMOOTHING).abs() < 1e-5,
            "{}",
            rows.rest[1].exp()
        );
    }
}
