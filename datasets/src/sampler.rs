//! The order of batches: seeded shuffling, length grouping that keeps image and text-only
//! samples in separate batches (like LLaVA's `group_by_modality_length`), and a [`Cursor`] so a
//! run resumes mid-epoch with exactly the batches it would have seen.
//!
//! An epoch's batches depend only on (sample shapes, config, seed, epoch): the random stream for
//! epoch `e` is ChaCha8 seeded with `seed` on stream `e`, so no state but the cursor is needed.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::tokenize::TokenizedSample;

/// What the sampler needs to know about a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    pub len: usize,
    pub has_images: bool,
}

impl SampleShape {
    pub fn of(samples: &[TokenizedSample]) -> Vec<SampleShape> {
        samples
            .iter()
            .map(|s| SampleShape {
                len: s.len(),
                has_images: s.has_images(),
            })
            .collect()
    }
}

/// Settings of the batch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Keep image and text-only samples in separate batches and put samples of similar length
    /// together (less padding).
    pub group_by_modality_length: bool,
    /// Length grouping sorts windows of `batch_size * length_group_batches` shuffled samples by
    /// length before cutting them into batches: larger windows, less padding, less randomness.
    pub length_group_batches: usize,
    /// Drop each group's last incomplete batch.
    pub drop_last: bool,
}

impl SamplerConfig {
    pub fn new(batch_size: usize, seed: u64) -> Self {
        SamplerConfig {
            batch_size,
            seed,
            shuffle: true,
            group_by_modality_length: true,
            length_group_batches: 16,
            drop_last: false,
        }
    }
}

/// Where the next batch comes from. Saved with a checkpoint to resume mid-epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub batch: usize,
}

/// The batches of one epoch, as lists of sample indices.
pub fn epoch_batches(shapes: &[SampleShape], cfg: &SamplerConfig, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(epoch);
    let bs = cfg.batch_size.max(1);
    let groups: Vec<Vec<usize>> = if cfg.group_by_modality_length {
        let (image, text): (Vec<usize>, Vec<usize>) =
            (0..shapes.len()).partition(|&i| shapes[i].has_images);
        vec![image, text]
    } else {
        vec![(0..shapes.len()).collect()]
    };
    let mut batches = Vec::new();
    for mut group in groups {
        if cfg.shuffle {
            group.shuffle(&mut rng);
        }
        if cfg.group_by_modality_length {
            let window = bs * cfg.length_group_batches.max(1);
            for w in group.chunks_mut(window) {
                // Stable sort: ties keep their shuffled order, so the result is still seeded.
                w.sort_by_key(|&i| std::cmp::Reverse(shapes[i].len));
            }
        }
        for b in group.chunks(bs) {
            if b.len() == bs || !cfg.drop_last {
                batches.push(b.to_vec());
            }
        }
    }
    if cfg.shuffle {
        batches.shuffle(&mut rng);
    }
    batches
}

/// An endless, resumable sequence of batches over epochs.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    shapes: Vec<SampleShape>,
    cfg: SamplerConfig,
    cursor: Cursor,
    epoch_plan: Vec<Vec<usize>>,
}

impl BatchSampler {
    /// Start at `cursor` (use `Cursor::default()` for a fresh run).
    pub fn new(shapes: Vec<SampleShape>, cfg: SamplerConfig, cursor: Cursor) -> Result<Self> {
        if cfg.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let plan = epoch_batches(&shapes, &cfg, cursor.epoch);
        if plan.is_empty() {
            bail!(
                "no batch can be formed from {} samples with batch size {} (drop_last = {})",
                shapes.len(),
                cfg.batch_size,
                cfg.drop_last
            );
        }
        if cursor.batch > plan.len() {
            bail!("cursor batch {} is past the {} batches of epoch {}; was the data or batch size changed?", cursor.batch, plan.len(), cursor.epoch);
        }
        Ok(BatchSampler {
            shapes,
            cfg,
            cursor,
            epoch_plan: plan,
        })
    }

    /// The position of the next batch; store it to resume.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.epoch_plan.len()
    }

    /// The next batch's sample indices; moves to the next epoch after the last batch.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.cursor.batch >= self.epoch_plan.len() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                batch: 0,
            };
            self.epoch_plan = epoch_batches(&self.shapes, &self.cfg, self.cursor.epoch);
        }
        let batch = self.epoch_plan[self.cursor.batch].clone();
        self.cursor.batch += 1;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(n: usize) -> Vec<SampleShape> {
        // Lengths all different; every third sample text-only.
        (0..n)
            .map(|i| SampleShape {
                len: 10 + (i * 37) % 101,
                has_images: i % 3 != 0,
            })
            .collect()
    }

    #[test]
    fn same_seed_and_epoch_same_order_and_every_sample_once() {
        let s = shapes(100);
        let cfg = SamplerConfig::new(8, 42);
        let a = epoch_batches(&s, &cfg, 3);
        assert_eq!(a, epoch_batches(&s, &cfg, 3));
        assert_ne!(a, epoch_batches(&s, &cfg, 4));
        assert_ne!(a, epoch_batches(&s, &SamplerConfig::new(8, 43), 3));
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn batches_never_mix_image_and_text_only_samples() {
        let s = shapes(100);
        for epoch in 0..5 {
            for b in epoch_batches(&s, &SamplerConfig::new(8, 1), epoch) {
                let images = b.iter().filter(|&&i| s[i].has_images).count();
                assert!(images == 0 || images == b.len(), "mixed batch {b:?}");
            }
        }
    }

    #[test]
    fn length_grouping_puts_neighbouring_lengths_together() {
        // 64 image samples of lengths 0..64 in one window: each batch of 4 holds 4 consecutive lengths.
        let s: Vec<SampleShape> = (0..64)
            .map(|i| SampleShape {
                len: i,
                has_images: true,
            })
            .collect();
        let cfg = SamplerConfig {
            length_group_batches: 16,
            ..SamplerConfig::new(4, 9)
        };
        for b in epoch_batches(&s, &cfg, 0) {
            let lens: Vec<usize> = b.iter().map(|&i| s[i].len).collect();
            assert_eq!(
                lens.iter().max().unwrap() - lens.iter().min().unwrap(),
                3,
                "{lens:?}"
            );
        }
    }

    #[test]
    fn drop_last_and_no_shuffle() {
        let s = shapes(10); // 6 image, 4 text-only samples
        let cfg = SamplerConfig {
            shuffle: false,
            drop_last: true,
            group_by_modality_length: true,
            ..SamplerConfig::new(4, 0)
        };
        let b = epoch_batches(&s, &cfg, 0);
        assert_eq!(b.len(), 2, "{b:?}"); // one full image batch, one full text batch
        let cfg = SamplerConfig {
            group_by_modality_length: false,
            ..cfg
        };
        assert_eq!(
            epoch_batches(&s, &cfg, 0),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
    }

    #[test]
    fn resuming_from_a_cursor_continues_the_same_sequence() {
        let s = shapes(30);
        let cfg = SamplerConfig::new(4, 7);
        let mut full = BatchSampler::new(s.clone(), cfg, Cursor::default()).unwrap();
        let per_epoch = full.batches_per_epoch();
        let first: Vec<Vec<usize>> = (0..per_epoch - 2).map(|_| full.next_batch()).collect();
        assert_eq!(first.len(), per_epoch - 2);
        let cursor = full.cursor();
        assert_eq!(
            cursor,
            Cursor {
                epoch: 0,
                batch: per_epoch - 2
            }
        );
        let rest: Vec<Vec<usize>> = (0..per_epoch + 3).map(|_| full.next_batch()).collect();
        let mut resumed = BatchSampler::new(s, cfg, cursor).unwrap();
        let again: Vec<Vec<usize>> = (0..per_epoch + 3).map(|_| resumed.next_batch()).collect();
        assert_eq!(rest, again);
        assert_eq!(resumed.cursor(), Cursor { epoch: 2, batch: 1 });
    }

    #[test]
    fn bad_cursor_and_empty_data_are_errors() {
        let s = shapes(8);
        let cfg = SamplerConfig::new(4, 0);
        let err = BatchSampler::new(
            s,
            cfg,
            Cursor {
                epoch: 0,
                batch: 99,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("cursor batch 99 is past"), "{err}");
        assert!(BatchSampler::new(Vec::new(), cfg, Cursor::default()).is_err());
    }
}
