//! Where training runs: the device a command puts its models on (`--device`, or `device` in
//! a preset's `[train]`), the processes of a data-parallel job ([`world`]), and the
//! gradient-sync hook the learner calls between backward and the optimizer (a no-op in one
//! process; [`data_parallel`] plugs the all-reduce in).
//!
//! The fused kernels of `mmkd_nn::fused` are CPU kernels: each public op checks its inputs'
//! device and dtype and falls back to the primitive formulation it is tested against, so every
//! model, objective and the optimizer also run on devices without a kernel.

pub mod data_parallel;
#[cfg(feature = "mpi")]
mod mpi_world;
#[cfg(feature = "nccl")]
mod nccl;
pub mod world;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Var};
use serde::{Deserialize, Serialize};

/// A device as the command line and presets name it: `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceSpec::Cuda(ordinal)),
                _ => bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device; a clear error when this binary has no backend for it or the device
    /// is not there. In a data-parallel job each rank of a machine takes the next GPU.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(first) => {
                let ordinal = first + world::local_rank();
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "--device {self}: this mmkd binary was built without CUDA; build it with \
                         `cargo build --release --features cuda`"
                    );
                }
                Device::new_cuda(ordinal).map_err(|e| {
                    let whose = match ordinal - first {
                        0 => String::new(),
                        r => format!(" (the GPU of local rank {r})"),
                    };
                    anyhow::anyhow!(
                        "--device {self}: cannot open CUDA device {ordinal}{whose}: {e}"
                    )
                })
            }
        }
    }
}

/// The dtype of frozen modules as settings name it: `f32`, `bf16` or `f16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("unknown dtype `{other}` (f32, bf16, f16)"),
    })
}

/// What runs between backward and the optimizer on the averaged gradients of one step: in a
/// data-parallel run, the all-reduce that makes every process's gradients the mean over all.
pub trait GradientSync: Send {
    /// Replaces each parameter's gradient in `grads` by its mean over the processes.
    fn sync(&mut self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()>;
    /// How many processes share a step (1 in one process).
    fn world_size(&self) -> usize;
    /// Replaces each value by its sum over the processes (the step's loss sums and counts,
    /// so every process logs and guards the same numbers).
    fn sum_over_processes(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// One process: the gradients are already everything there is.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl GradientSync for SingleProcess {
    fn sync(&mut self, _grads: &mut GradStore, _vars: &[(String, Var)]) -> Result<()> {
        Ok(())
    }

    fn world_size(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip_and_bad_ones_are_named() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        let err = "gpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert_eq!(err, "unknown device `gpu` (cpu, cuda, cuda:N)");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        if candle_core::utils::cuda_is_available() {
            return;
        }
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }
}
