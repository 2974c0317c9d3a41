//! Data-parallel gradient sync: every rank's step gradients replaced by their mean over the
//! ranks, in flat buckets, before clipping and AdamW (which then step identically everywhere).
//!
//! candle's backward returns all gradients at once (there is no per-parameter hook to start a
//! bucket's reduction while the rest of the backward runs), so the reduction follows it.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::world::{world, Collective, World};
use super::GradientSync;

/// f32 elements per all-reduce (16 MiB): bounds the flat copy next to the gradients.
const BUCKET_ELEMENTS: usize = 1 << 22;

/// The gradient sync of one rank of a data-parallel job.
pub struct DataParallel {
    world: &'static World,
    /// Reduces the gradients: MPI over host memory, or NCCL on the GPUs.
    gradients: Arc<dyn Collective>,
    steps: usize,
    fault: Option<RankFault>,
}

impl DataParallel {
    /// This rank's gradient sync for models on `device` (NCCL on a CUDA device when built
    /// with it, MPI otherwise); `None` in one process.
    pub fn for_device(device: &Device) -> Result<Option<Self>> {
        let world = world();
        let Some(host) = world.collective() else {
            return Ok(None);
        };
        let gradients = match device {
            #[cfg(feature = "nccl")]
            Device::Cuda(_) => Arc::new(super::nccl::NcclCollective::bootstrap(world, device)?)
                as Arc<dyn Collective>,
            _ => host.clone(),
        };
        Ok(Some(Self {
            world,
            gradients,
            steps: 0,
            fault: RankFault::from_env(world.rank())?,
        }))
    }

    /// Bytes one rank hands to the all-reduces of a step that has gradients for all of `vars`:
    /// the f32 gradients, which parameters have them, and the step's loss sums. (A ring
    /// all-reduce sends and receives 2·(N−1)/N times this per rank.)
    pub fn bytes_per_step(&self, vars: &[(String, Var)]) -> u64 {
        let gradients: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        (4 * gradients + 8 * vars.len() + 8 * 3) as u64
    }

    /// The backend reducing the gradients (`MPI`, `NCCL`).
    pub fn backend(&self) -> &'static str {
        self.gradients.name()
    }
}

impl GradientSync for DataParallel {
    fn sync(&mut self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
        self.steps += 1;
        if let Some(fault) = &self.fault {
            fault.strike(self.steps);
        }
        // A parameter without a gradient on one rank (its micro-batches never reached it)
        // takes part as zeros, as an absent micro-batch gradient adds nothing in one process.
        let mut present: Vec<f64> = vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).is_some() as u8 as f64)
            .collect();
        self.world.sum_f64(
            &mut present,
            "the all-reduce of which parameters have gradients",
        )?;
        let reduced: Vec<usize> = (0..vars.len()).filter(|&i| present[i] > 0.0).collect();
        for bucket in buckets(&reduced, vars) {
            let parts = bucket
                .iter()
                .map(|&i| flat_gradient(grads, &vars[i].1))
                .collect::<Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?;
            let mean = self.world.guarded("the all-reduce of the gradients", || {
                self.gradients.all_reduce_mean(&flat)
            })?;
            let mut offset = 0;
            for &i in bucket {
                let var = vars[i].1.as_tensor();
                let n = var.elem_count();
                let g = mean
                    .narrow(0, offset, n)?
                    .reshape(var.shape())?
                    .to_dtype(var.dtype())
                    .with_context(|| format!("the reduced gradient of `{}`", vars[i].0))?;
                grads.insert(var, g);
                offset += n;
            }
        }
        Ok(())
    }

    fn world_size(&self) -> usize {
        self.gradients.size()
    }

    fn sum_over_processes(&mut self, values: &mut [f64]) -> Result<()> {
        self.world
            .sum_f64(values, "the all-reduce of the step's losses")
    }
}

/// A gradient as flat f32 (zeros when this rank has none).
fn flat_gradient(grads: &GradStore, var: &Var) -> Result<Tensor> {
    let t = var.as_tensor();
    Ok(match grads.get(t) {
        Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
        None => Tensor::zeros(t.elem_count(), DType::F32, t.device())?,
    })
}

/// `indices` split into runs of at most [`BUCKET_ELEMENTS`] elements (a bigger parameter is a
/// bucket of its own).
fn buckets<'a>(indices: &'a [usize], vars: &[(String, Var)]) -> Vec<&'a [usize]> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (at, &i) in indices.iter().enumerate() {
        let n = vars[i].1.elem_count();
        if filled > 0 && filled + n > BUCKET_ELEMENTS {
            out.push(&indices[start..at]);
            (start, filled) = (at, 0);
        }
        filled += n;
    }
    if start < indices.len() {
        out.push(&indices[start..]);
    }
    out
}

/// A fault the tests inject into one rank (`MMKD_FAULT_RANK=R:STEP:exit|stall`): at its
/// STEP-th gradient sync, rank R is killed (as by the OOM killer) or stops answering.
struct RankFault {
    step: usize,
    stall: bool,
}

impl RankFault {
    fn from_env(rank: usize) -> Result<Option<Self>> {
        let Ok(text) = std::env::var("MMKD_FAULT_RANK") else {
            return Ok(None);
        };
        let parts: Vec<&str> = text.split(':').collect();
        let (Some(r), Some(step), Some(kind), 3) = (
            parts.first().and_then(|r| r.parse::<usize>().ok()),
            parts.get(1).and_then(|s| s.parse::<usize>().ok()),
            parts.get(2),
            parts.len(),
        ) else {
            bail!("MMKD_FAULT_RANK={text}: expected RANK:STEP:exit|stall");
        };
        let stall = match *kind {
            "exit" => false,
            "stall" => true,
            other => bail!("MMKD_FAULT_RANK={text}: unknown fault `{other}` (exit, stall)"),
        };
        Ok((r == rank).then_some(Self { step, stall }))
    }

    fn strike(&self, step: usize) {
        if step != self.step {
            return;
        }
        if self.stall {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        // SAFETY: raising a signal in this process has no memory-safety preconditions.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_whole_parameters_up_to_the_bucket_size() {
        let var = |n: usize| {
            (
                format!("p{n}"),
                Var::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            )
        };
        let vars = vec![
            var(BUCKET_ELEMENTS / 2),
            var(BUCKET_ELEMENTS / 2),
            var(1),
            var(BUCKET_ELEMENTS * 2),
            var(3),
        ];
        let all: Vec<usize> = (0..vars.len()).collect();
        assert_eq!(
            buckets(&all, &vars),
            vec![&[0, 1][..], &[2][..], &[3][..], &[4][..]]
        );
        assert_eq!(buckets(&[2, 4], &vars), vec![&[2, 4][..]]);
        assert!(buckets(&[], &vars).is_empty());
    }
}
