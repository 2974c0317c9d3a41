//! The MPI collective (rsmpi over the system's Open MPI or MPICH): the ranks `mpirun` started,
//! exchanging host memory.

use anyhow::{bail, Result};
use candle_core::Tensor;
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::world::Collective;

/// Elements per MPI call: counts are C ints, and a bounded buffer bounds the copies.
const MAX_ELEMENTS: usize = 1 << 26;

pub(super) struct MpiCollective {
    rank: usize,
    size: usize,
}

/// Initialises MPI (any thread may call it: the command runs on a rayon worker, and the
/// watchdog aborts from its own thread).
pub(super) fn start() -> Result<(Universe, MpiCollective)> {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        bail!("MPI was already initialised");
    };
    if threading < Threading::Serialized {
        bail!(
            "the MPI library offers thread level {threading:?}; mmkd needs at least Serialized \
             (calls from its worker threads, one at a time)"
        );
    }
    let world = universe.world();
    let collective = MpiCollective {
        rank: world.rank() as usize,
        size: world.size() as usize,
    };
    Ok((universe, collective))
}

fn comm() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

impl Collective for MpiCollective {
    fn name(&self) -> &'static str {
        "MPI"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let host: Vec<f32> = flat.to_vec1()?;
        let mut sum = vec![0f32; host.len()];
        for (send, recv) in host.chunks(MAX_ELEMENTS).zip(sum.chunks_mut(MAX_ELEMENTS)) {
            comm().all_reduce_into(send, recv, SystemOperation::sum());
        }
        Ok(Tensor::from_vec(sum, flat.shape(), flat.device())?)
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        comm().all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let comm = comm();
        let root = comm.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for part in bytes.chunks_mut(MAX_ELEMENTS) {
            root.broadcast_into(part);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        comm().barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        comm().abort(code)
    }
}
