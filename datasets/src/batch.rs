//! Collating tokenized samples into padded arrays (dynamic padding: to the longest sample).
//!
//! Batches hold plain `ndarray` arrays and image *paths*; [`Batch::load_images`] decodes them and
//! the caller preprocesses them for its vision tower.

use std::ops::Range;
use std::path::PathBuf;
use std::thread;

use image::DynamicImage;
use ndarray::Array2;

use crate::image_io::{load_image, ImageFault};
use crate::tokenize::{TokenizedSample, IGNORE_INDEX};

/// Which side gets the padding. Training pads on the right; batched generation on the left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    #[default]
    Right,
    Left,
}

/// Settings of [`collate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateConfig {
    pub pad_token_id: u32,
    pub padding_side: PaddingSide,
    /// Round the padded length up to a multiple of this (1 = no rounding).
    pub pad_to_multiple_of: usize,
}

/// One image of a batch: the row of its sample and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchImage {
    pub row: usize,
    pub path: PathBuf,
    /// Its block's positions in the padded row.
    pub positions: Range<usize>,
}

/// A padded batch. Images are listed in sample order, then block order within a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub sample_ids: Vec<String>,
    /// Position of each row's sample in the tokenized data set.
    pub sample_indices: Vec<usize>,
    /// `[batch, seq]`, padding = `pad_token_id`.
    pub input_ids: Array2<u32>,
    /// `[batch, seq]`, unshifted, `-100` at ignored and padded positions.
    pub labels: Array2<i64>,
    /// `[batch, seq]`, 1 for real tokens, 0 for padding.
    pub attention_mask: Array2<u8>,
    /// Unpadded length of each row.
    pub lengths: Vec<usize>,
    pub images: Vec<BatchImage>,
}

/// An image of a batch that could not be decoded, naming its sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sample {sample_id}: {fault}")]
pub struct BatchImageError {
    pub sample_id: String,
    pub fault: ImageFault,
}

impl Batch {
    pub fn batch_size(&self) -> usize {
        self.input_ids.nrows()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.ncols()
    }

    /// Decode the batch's images in order, on up to `threads` threads.
    pub fn load_images(&self, threads: usize) -> Result<Vec<DynamicImage>, BatchImageError> {
        let chunk = self.images.len().div_ceil(threads.max(1)).max(1);
        thread::scope(|scope| {
            let handles: Vec<_> = self
                .images
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|img| {
                                load_image(&img.path).map_err(|fault| BatchImageError {
                                    sample_id: self.sample_ids[img.row].clone(),
                                    fault,
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<Result<Vec<_>, _>>()
        })
    }
}

/// Pad `samples` to the longest one (rounded up to `pad_to_multiple_of`).
pub fn collate(samples: &[&TokenizedSample], indices: &[usize], cfg: &CollateConfig) -> Batch {
    let lengths: Vec<usize> = samples.iter().map(|s| s.len()).collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let multiple = cfg.pad_to_multiple_of.max(1);
    let seq = longest.div_ceil(multiple) * multiple;
    let rows = samples.len();
    let mut input_ids = Array2::from_elem((rows, seq), cfg.pad_token_id);
    let mut labels = Array2::from_elem((rows, seq), IGNORE_INDEX);
    let mut attention_mask = Array2::zeros((rows, seq));
    let mut images = Vec::new();
    for (row, s) in samples.iter().enumerate() {
        let offset = match cfg.padding_side {
            PaddingSide::Right => 0,
            PaddingSide::Left => seq - s.len(),
        };
        for (t, (&id, &label)) in s.input_ids.iter().zip(&s.labels).enumerate() {
            input_ids[[row, offset + t]] = id;
            labels[[row, offset + t]] = label;
            attention_mask[[row, offset + t]] = 1;
        }
        for (path, span) in s.images.iter().zip(&s.image_spans) {
            images.push(BatchImage {
                row,
                path: path.clone(),
                positions: span.start + offset..span.end + offset,
            });
        }
    }
    Batch {
        sample_ids: samples.iter().map(|s| s.id.clone()).collect(),
        sample_indices: indices.to_vec(),
        input_ids,
        labels,
        attention_mask,
        lengths,
        images,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(
        id: &str,
        ids: Vec<u32>,
        labels: Vec<i64>,
        image: Option<Range<usize>>,
    ) -> TokenizedSample {
        TokenizedSample {
            id: id.into(),
            index: 0,
            input_ids: ids,
            labels,
            images: image
                .iter()
                .map(|_| PathBuf::from(format!("{id}.png")))
                .collect(),
            image_spans: image.into_iter().collect(),
            truncated: false,
            answer_offsets: Vec::new(),
        }
    }

    #[test]
    fn right_and_left_padding() {
        let a = sample(
            "a",
            vec![5, 9, 9, 6, 7],
            vec![-100, -100, -100, 6, 7],
            Some(1..3),
        );
        let b = sample("b", vec![8, 3], vec![-100, 3], None);
        let cfg = CollateConfig {
            pad_token_id: 0,
            padding_side: PaddingSide::Right,
            pad_to_multiple_of: 4,
        };
        let batch = collate(&[&a, &b], &[4, 7], &cfg);
        assert_eq!(batch.input_ids.shape(), &[2, 8]);
        assert_eq!(
            batch.input_ids.row(0).to_vec(),
            vec![5, 9, 9, 6, 7, 0, 0, 0]
        );
        assert_eq!(
            batch.input_ids.row(1).to_vec(),
            vec![8, 3, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.labels.row(1).to_vec(),
            vec![-100, 3, -100, -100, -100, -100, -100, -100]
        );
        assert_eq!(
            batch.attention_mask.row(0).to_vec(),
            vec![1, 1, 1, 1, 1, 0, 0, 0]
        );
        assert_eq!(batch.lengths, vec![5, 2]);
        assert_eq!(batch.sample_indices, vec![4, 7]);
        assert_eq!(
            batch.images,
            vec![BatchImage {
                row: 0,
                path: "a.png".into(),
                positions: 1..3
            }]
        );

        let cfg = CollateConfig {
            pad_token_id: 1,
            padding_side: PaddingSide::Left,
            pad_to_multiple_of: 1,
        };
        let batch = collate(&[&b, &a], &[7, 4], &cfg);
        assert_eq!(batch.input_ids.row(0).to_vec(), vec![1, 1, 1, 8, 3]);
        assert_eq!(batch.attention_mask.row(0).to_vec(), vec![0, 0, 0, 1, 1]);
        assert_eq!(
            batch.labels.row(0).to_vec(),
            vec![-100, -100, -100, -100, 3]
        );
        assert_eq!(batch.images[0].row, 1);
        assert_eq!(batch.images[0].positions, 1..3);
    }

    #[test]
    fn image_errors_name_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = sample("cat-1", vec![5, 9], vec![-100, -100], Some(1..2));
        a.images = vec![dir.path().join("nope.png")];
        let cfg = CollateConfig {
            pad_token_id: 0,
            padding_side: PaddingSide::Right,
            pad_to_multiple_of: 1,
        };
        let err = collate(&[&a], &[0], &cfg).load_images(2).unwrap_err();
        assert_eq!(err.sample_id, "cat-1");
        assert!(err.to_string().starts_with("sample cat-1: image "), "{err}");
        assert!(
            err.to_string().ends_with("nope.png: file not found"),
            "{err}"
        );
    }
}
