//! A teacher whose tokenizer is not the student's reads its own tokenization of every sample:
//! the stage's samples tokenized again with the teacher's tokenizer (same template, same
//! records), collated for the teacher, and paired with the student's response tokens by where
//! they start in the answer text (see `distill::align`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mmkd_datasets::{collate, tokenize_sample, LlavaDataset, Template, TokenizedSample};

use crate::batch::{training_tokenize_config, ModelInputs, TRAINING_COLLATE};
use crate::checkpoint::LoadedModel;
use crate::distill::align::{align, AlignedRows, Alignment};
use crate::distill::uld::SharedVocab;

/// The teacher's side of cross-tokenizer distillation.
pub struct OwnTokens {
    /// The entries the two vocabularies share.
    pub shared: Arc<SharedVocab>,
    pub alignment: Alignment,
    /// The stage's samples as the teacher tokenizes them, in the student's sample order.
    samples: Vec<TokenizedSample>,
}

impl OwnTokens {
    pub fn new(student: &LoadedModel, teacher: &LoadedModel, alignment: Alignment) -> Self {
        Self {
            shared: Arc::new(SharedVocab::between(
                &student.tokenizer.get_vocab(true),
                &teacher.tokenizer.get_vocab(true),
            )),
            alignment,
            samples: Vec::new(),
        }
    }

    /// Tokenizes the records behind `student_samples` (read again from `data`) with the
    /// teacher's tokenizer. A record the teacher cannot tokenize, or whose answers it
    /// tokenizes to nothing, is an error naming the sample.
    pub fn tokenize(
        &mut self,
        teacher: &LoadedModel,
        data: &Path,
        images: &Path,
        template: &Template,
        student_samples: &[TokenizedSample],
        max_length: usize,
    ) -> Result<()> {
        let dataset = LlavaDataset::read(data, images)?;
        let by_index: std::collections::HashMap<usize, &mmkd_datasets::Sample> = dataset
            .samples
            .iter()
            .map(|s| (s.reference.index, s))
            .collect();
        mmkd_datasets::check_tokenizer(&teacher.tokenizer, template)
            .context("the teacher's tokenizer")?;
        let cfg = training_tokenize_config(&teacher.model, max_length);
        self.samples = student_samples
            .iter()
            .map(|s| {
                let record = by_index.get(&s.index).with_context(|| {
                    format!("sample {}: not found again in {}", s.id, data.display())
                })?;
                let own = tokenize_sample(record, &teacher.tokenizer, template, &cfg)
                    .map_err(|p| anyhow::anyhow!("the teacher's tokenizer: {p}"))?;
                if own.supervised_count() == 0 {
                    bail!(
                        "sample {}: the teacher's tokenizer turns its answers into no token",
                        s.id
                    );
                }
                Ok(own)
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The teacher's inputs for the student's micro-batch, and the pairs of logit rows (flat
    /// `batch·seq`, the row before each supervised token) that predict the same text. A sample
    /// whose two tokenizations share no starting point is an error naming it.
    pub fn inputs(
        &self,
        student_inputs: &ModelInputs,
        student_samples: &[&TokenizedSample],
        teacher: &LoadedModel,
    ) -> Result<(ModelInputs, AlignedRows)> {
        let indices = &student_inputs.collated.sample_indices;
        let own: Vec<&TokenizedSample> = indices
            .iter()
            .map(|&i| {
                self.samples
                    .get(i)
                    .context("the teacher's tokenization does not cover this sample")
            })
            .collect::<Result<_>>()?;
        let collated = collate(&own, indices, &TRAINING_COLLATE);
        let inputs = ModelInputs::new(collated, &teacher.processor, &teacher.model)?;
        let aligned = pair_rows(
            student_samples,
            &own,
            (student_inputs.tokens.seq_len(), inputs.tokens.seq_len()),
            self.alignment,
        )?;
        Ok((inputs, aligned))
    }
}

/// The flat logit rows (`batch·seq`, the row before each supervised token) of the student's
/// and the teacher's tokenizations of the same samples that predict the same text; `seqs`:
/// the two batches' padded lengths. A sample whose two tokenizations share no starting point
/// is an error naming it.
fn pair_rows(
    student: &[&TokenizedSample],
    teacher: &[&TokenizedSample],
    (student_seq, teacher_seq): (usize, usize),
    alignment: Alignment,
) -> Result<AlignedRows> {
    let mut aligned = AlignedRows::default();
    for (b, (s, t)) in student.iter().zip(teacher).enumerate() {
        let pairs = align(&s.answer_offsets, &t.answer_offsets, alignment);
        if pairs.is_empty() && s.supervised_count() > 0 {
            bail!(
                "sample {}: no token of its answers starts at the same place in the student's \
                 tokenization ({} tokens) and the teacher's ({}): nothing to distil (try \
                 alignment = \"position\")",
                s.id,
                s.supervised_count(),
                t.supervised_count()
            );
        }
        let (rows_s, rows_t) = (predicting_rows(s), predicting_rows(t));
        anyhow::ensure!(
            rows_s.len() == s.answer_offsets.len() && rows_t.len() == t.answer_offsets.len(),
            "sample {}: its supervised tokens and their answer offsets do not line up",
            s.id
        );
        for (i, j) in pairs {
            aligned.student.push((b * student_seq + rows_s[i]) as u32);
            aligned.teacher.push((b * teacher_seq + rows_t[j]) as u32);
        }
    }
    Ok(aligned)
}

/// The logit row that predicts each supervised token of `sample`, in order.
fn predicting_rows(sample: &TokenizedSample) -> Vec<usize> {
    sample
        .labels
        .iter()
        .enumerate()
        .filter(|&(t, &l)| t > 0 && l != mmkd_datasets::IGNORE_INDEX)
        .map(|(t, _)| t - 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, labels: Vec<i64>, offsets: Vec<(u32, u32)>) -> TokenizedSample {
        TokenizedSample {
            id: id.into(),
            index: 0,
            input_ids: labels.iter().map(|&l| l.max(0) as u32).collect(),
            labels,
            images: Vec::new(),
            image_spans: Vec::new(),
            truncated: false,
            answer_offsets: offsets,
        }
    }

    #[test]
    fn rows_pair_up_by_answer_offsets_and_a_sample_without_a_common_start_is_named() {
        const I: i64 = mmkd_datasets::IGNORE_INDEX;
        // Student: answer tokens at positions 2, 3, 4 (offsets 0, 3, 7); teacher: positions
        // 3..=6 (offsets 0, 3, 5, 7).
        let s = sample("s1", vec![I, I, 5, 6, 7], vec![(0, 0), (0, 3), (0, 7)]);
        let t = sample(
            "s1",
            vec![I, I, I, 5, 6, 8, 7],
            vec![(0, 0), (0, 3), (0, 5), (0, 7)],
        );
        let rows = pair_rows(&[&s, &s], &[&t, &t], (5, 8), Alignment::Text).unwrap();
        // Predicting rows: student 1, 2, 3; teacher 2, 3, 4, 5; the second sample is offset
        // by one padded sequence.
        assert_eq!(rows.student, [1, 2, 3, 6, 7, 8]);
        assert_eq!(rows.teacher, [2, 3, 5, 10, 11, 13]);
        let apart = sample(
            "s2",
            vec![I, I, I, 5, 6, 8, 7],
            vec![(0, 1), (0, 4), (0, 6), (0, 8)],
        );
        let err = pair_rows(&[&s], &[&apart], (5, 7), Alignment::Text).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "sample s1: no token of its answers starts at the same place in the student's \
                 tokenization (3 tokens) and the teacher's (4)"
            ),
            "{err}"
        );
        // ULD's positional pairing does not need a common start.
        let rows = pair_rows(&[&s], &[&apart], (5, 7), Alignment::Position).unwrap();
        assert_eq!((rows.student, rows.teacher), (vec![1, 2, 3], vec![2, 3, 4]));
    }
}
