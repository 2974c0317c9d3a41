//! A stage's share of a data-parallel job (`mpirun -np N mmkd dft ...`): the micro-batches of
//! every global batch this rank trains on, and the batch layout a checkpoint records for
//! resuming on another N.

use mmkd_datasets::BatchSampler;

use crate::runtime::world::World;
use crate::train::state::BatchLayout;

/// Rank `rank` of `ranks` trains micro-batches `rank·A .. (rank+1)·A` of each step's `ranks·A`
/// (A = `train.grad_accum`): one process with grad_accum `ranks·A` trains all of them, in the
/// same order, so the two make the same step.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shard {
    rank: usize,
    ranks: usize,
    per_rank: usize,
}

impl Shard {
    pub(super) fn of(world: &World, grad_accum: usize) -> Self {
        Self {
            rank: world.rank(),
            ranks: world.size(),
            per_rank: grad_accum,
        }
    }

    /// Micro-batches per optimizer step over the whole job.
    pub(super) fn global_micro_batches(&self) -> usize {
        self.ranks * self.per_rank
    }

    pub(super) fn layout(&self, batch_size: usize) -> BatchLayout {
        BatchLayout {
            ranks: self.ranks,
            grad_accum: self.per_rank,
            batch_size,
        }
    }

    /// This rank's micro-batches of the next step. The whole global batch is drawn, so the
    /// sampler's cursor (what a checkpoint records) is the job's.
    pub(super) fn next_step(&self, sampler: &mut BatchSampler) -> Vec<Vec<usize>> {
        let mut all: Vec<Vec<usize>> = (0..self.global_micro_batches())
            .map(|_| sampler.next_batch())
            .collect();
        all.drain(self.rank * self.per_rank..(self.rank + 1) * self.per_rank)
            .collect()
    }

    /// This rank's first `n` micro-batches of the step after the sampler's position.
    pub(super) fn peek(&self, sampler: &BatchSampler, n: usize) -> Vec<Vec<usize>> {
        let mut peek = sampler.clone();
        for _ in 0..self.rank * self.per_rank {
            peek.next_batch();
        }
        (0..n.min(self.per_rank))
            .map(|_| peek.next_batch())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmkd_datasets::{Cursor, SampleShape, SamplerConfig};

    fn sampler() -> BatchSampler {
        let shapes: Vec<SampleShape> = (0..40)
            .map(|i| SampleShape {
                len: 10 + i,
                has_images: true,
            })
            .collect();
        BatchSampler::new(shapes, SamplerConfig::new(2, 7), Cursor::default()).unwrap()
    }

    #[test]
    fn the_ranks_split_what_one_process_with_their_grad_accum_trains() {
        let one = Shard {
            rank: 0,
            ranks: 1,
            per_rank: 4,
        };
        let mut whole = sampler();
        let steps: Vec<_> = (0..3).map(|_| one.next_step(&mut whole)).collect();
        for rank in 0..2 {
            let shard = Shard {
                rank,
                ranks: 2,
                per_rank: 2,
            };
            let mut own = sampler();
            for step in &steps {
                assert_eq!(shard.peek(&own, 1), step[rank * 2..rank * 2 + 1].to_vec());
                assert_eq!(
                    shard.next_step(&mut own),
                    step[rank * 2..rank * 2 + 2].to_vec()
                );
            }
            assert_eq!(own.cursor(), whole.cursor(), "the cursor is the job's");
        }
    }
}
