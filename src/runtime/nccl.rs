//! The NCCL collective (cudarc's bindings) for ranks on GPUs: the gradients stay in device
//! memory. Bootstrapped over MPI: rank 0 creates the NCCL id and broadcasts it.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp1, Device, Layout, Shape, Tensor};

use super::world::{Collective, World};

/// One rank's NCCL communicator on candle's stream of its device, so the collectives are
/// ordered with the ops around them.
pub(super) struct NcclCollective {
    comm: Arc<Mutex<SendComm>>,
    device: CudaDevice,
    rank: usize,
    size: usize,
    /// The job's MPI world, which stops every rank on an abort.
    world: &'static World,
}

/// NCCL allows a communicator to be used from any thread, one call at a time (the mutex).
struct SendComm(Comm);
// SAFETY: see above; every use goes through the mutex.
unsafe impl Send for SendComm {}

impl NcclCollective {
    pub(super) fn bootstrap(world: &'static World, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            bail!("NCCL needs a CUDA device");
        };
        let mut id = if world.is_leader() {
            let id = Id::new().map_err(|e| anyhow::anyhow!("creating the NCCL id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![0u8; 128]
        };
        world.broadcast(&mut id, 0, "the broadcast of the NCCL id")?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (to, from) in internal.iter_mut().zip(&id) {
            *to = *from as std::ffi::c_char;
        }
        let (rank, size) = (world.rank(), world.size());
        let comm = world.guarded("creating the NCCL communicator", || {
            Comm::from_rank(cuda.cuda_stream(), rank, size, Id::uninit(internal))
                .map_err(|e| anyhow::anyhow!("NCCL communicator of rank {rank}: {e:?}"))
        })?;
        Ok(Self {
            comm: Arc::new(Mutex::new(SendComm(comm))),
            device: cuda.clone(),
            rank,
            size,
            world,
        })
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, SendComm> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `values` summed over the ranks through device memory.
    fn sum_host<T>(&self, values: &mut [T]) -> Result<()>
    where
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::nccl::NcclType
            + Copy,
    {
        let stream = self.device.cuda_stream();
        let mut buf = stream.clone_htod(values).context("copying to the GPU")?;
        self.comm()
            .0
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| anyhow::anyhow!("NCCL all-reduce: {e:?}"))?;
        let summed = stream.clone_dtoh(&buf).context("copying from the GPU")?;
        values.copy_from_slice(&summed);
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn name(&self) -> &'static str {
        "NCCL"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.apply_op1_no_bwd(&AllReduceSum {
            comm: self.comm.clone(),
        })?)
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum_host(values)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let stream = self.device.cuda_stream();
        let mut len = [bytes.len() as u64];
        let mut dev_len = stream.clone_htod(&len[..])?;
        let mut buf = if bytes.is_empty() {
            None
        } else {
            Some(stream.clone_htod(&bytes[..])?)
        };
        let comm = self.comm();
        comm.0
            .broadcast_in_place(&mut dev_len, root as i32)
            .map_err(|e| anyhow::anyhow!("NCCL broadcast: {e:?}"))?;
        len.copy_from_slice(&stream.clone_dtoh(&dev_len)?);
        let mut buf: CudaSlice<u8> = match buf.take() {
            Some(b) if b.len() == len[0] as usize => b,
            _ => stream.alloc_zeros::<u8>(len[0] as usize)?,
        };
        if len[0] > 0 {
            comm.0
                .broadcast_in_place(&mut buf, root as i32)
                .map_err(|e| anyhow::anyhow!("NCCL broadcast: {e:?}"))?;
        }
        *bytes = stream.clone_dtoh(&buf)?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [1.0f64];
        self.sum_host(&mut one)
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// The element-wise sum over the ranks of a contiguous f32 CUDA tensor, into a new buffer on
/// the same stream.
struct AllReduceSum {
    comm: Arc<Mutex<SendComm>>,
}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor");
        };
        let input = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let device = storage.device.clone();
        let mut out = device.cuda_stream().alloc_zeros::<f32>(end - start).w()?;
        self.comm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .all_reduce(&input, &mut out, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            layout.shape().clone(),
        ))
    }
}
