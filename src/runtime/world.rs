//! The processes of a job: one, or the ranks `mpirun` started (built with the `mpi` feature).
//!
//! [`init`] runs first thing in `main`, before candle or rayon start a thread (MPI must be
//! initialised on a process with one thread, and a mixed start has been seen to hang). Every
//! collective a rank enters is watched: one that has not completed after
//! `MMKD_COLLECTIVE_TIMEOUT_S` seconds (default 600) means another rank died or is stuck, and
//! the job is stopped with a message naming this rank, instead of hanging.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// What every backend (MPI over host memory, NCCL on GPUs) does for a data-parallel job.
pub trait Collective: Send + Sync {
    /// `MPI` or `NCCL`, for messages.
    fn name(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// The element-wise sum of a flat f32 tensor over the ranks (every rank gets it), on its
    /// device.
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor>;
    /// The element-wise mean of `t` over the ranks, on `t`'s device and dtype: summed in f32,
    /// then scaled by 1/size as candle's `affine` does.
    fn all_reduce_mean(&self, t: &Tensor) -> Result<Tensor> {
        let flat = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?;
        Ok(self
            .all_reduce_sum(&flat)?
            .affine(1.0 / self.size() as f64, 0.0)?
            .reshape(t.shape())?
            .to_dtype(t.dtype())?)
    }
    /// Replaces each value by its sum over the ranks.
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Makes `bytes` on every rank what they are on `root`.
    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Stops every rank of the job.
    fn abort(&self, code: i32) -> !;
}

/// The job this process belongs to.
pub struct World {
    /// The host collective (MPI) when the job has ranks.
    collective: Option<Arc<dyn Collective>>,
    watchdog: Watchdog,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// The job: the one [`init`] made, or a single process.
pub fn world() -> &'static World {
    WORLD.get_or_init(|| World {
        collective: None,
        watchdog: Watchdog::new(Duration::from_secs(DEFAULT_TIMEOUT_S)),
    })
}

const DEFAULT_TIMEOUT_S: u64 = 600;
const TIMEOUT_VAR: &str = "MMKD_COLLECTIVE_TIMEOUT_S";

/// Held by `main` for the process's life: finalises MPI when dropped.
pub struct Launch {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Joins the job `mpirun` started, if it started one. Must run before any other thread starts.
pub fn init() -> Result<Launch> {
    let ranks = launched_ranks();
    #[cfg(feature = "mpi")]
    {
        if ranks.is_some() {
            let timeout = collective_timeout()?;
            let (universe, collective) = super::mpi_world::start()?;
            let collective: Arc<dyn Collective> = Arc::new(collective);
            let world = World {
                watchdog: Watchdog::new(timeout).watching(collective.clone()),
                collective: Some(collective),
            };
            if WORLD.set(world).is_err() {
                bail!("the MPI job was joined twice");
            }
            return Ok(Launch {
                _universe: Some(universe),
            });
        }
        Ok(Launch { _universe: None })
    }
    #[cfg(not(feature = "mpi"))]
    {
        match ranks {
            Some(n) if n > 1 => bail!(
                "started by an MPI launcher as one of {n} ranks, but this mmkd binary was built \
                 without MPI: build it with `cargo build --release --features mpi` (each rank \
                 would otherwise train alone and overwrite the others' output)"
            ),
            _ => Ok(Launch {}),
        }
    }
}

/// The ranks an MPI launcher says it started (Open MPI, MPICH/Hydra, PMIx), if one did.
fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
}

/// This rank's place among the job's ranks on its machine (0 in one process): rank r of a
/// machine uses GPU `cuda:N+r` when told `--device cuda:N`, one GPU per rank.
pub fn local_rank() -> usize {
    if world().size() == 1 {
        return 0;
    }
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "PMIX_LOCAL_RANK",
    ]
    .iter()
    .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
    .unwrap_or(0)
}

#[cfg(feature = "mpi")]
fn collective_timeout() -> Result<Duration> {
    match std::env::var(TIMEOUT_VAR) {
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_S)),
        Ok(text) => {
            let secs: f64 = text
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0)
                .with_context(|| {
                    format!("{TIMEOUT_VAR}={text}: expected a positive number of seconds")
                })?;
            Ok(Duration::from_secs_f64(secs))
        }
    }
}

impl World {
    pub fn rank(&self) -> usize {
        self.collective.as_ref().map_or(0, |c| c.rank())
    }

    pub fn size(&self) -> usize {
        self.collective.as_ref().map_or(1, |c| c.size())
    }

    /// Whether this process writes (checkpoints, metrics, progress): rank 0.
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// The host collective, in a job of more than one rank.
    pub fn collective(&self) -> Option<&Arc<dyn Collective>> {
        self.collective.as_ref().filter(|c| c.size() > 1)
    }

    /// `rank R of N`, for messages.
    pub fn describe_rank(&self) -> String {
        format!("rank {} of {}", self.rank(), self.size())
    }

    /// Replaces each value by its sum over the ranks.
    pub fn sum_f64(&self, values: &mut [f64], what: &str) -> Result<()> {
        match self.collective() {
            Some(c) => self.guarded(what, || c.sum_f64(values)),
            None => Ok(()),
        }
    }

    /// Whether `flag` is true on any rank.
    pub fn any(&self, flag: bool, what: &str) -> Result<bool> {
        let mut v = [flag as u8 as f64];
        self.sum_f64(&mut v, what)?;
        Ok(v[0] > 0.0)
    }

    /// `bytes` as rank `root` has them.
    pub fn broadcast(&self, bytes: &mut Vec<u8>, root: usize, what: &str) -> Result<()> {
        match self.collective() {
            Some(c) => self.guarded(what, || c.broadcast(bytes, root)),
            None => Ok(()),
        }
    }

    pub fn barrier(&self, what: &str) -> Result<()> {
        match self.collective() {
            Some(c) => self.guarded(what, || c.barrier()),
            None => Ok(()),
        }
    }

    /// Refuses to start a job whose ranks were given different settings, data or models
    /// (their digests differ), naming the ranks that differ from rank 0.
    pub fn agree(&self, digest: &str) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let mut leader = digest.as_bytes().to_vec();
        self.broadcast(&mut leader, 0, "the broadcast of the settings digest")?;
        let mut differs = vec![0.0; self.size()];
        differs[self.rank()] = (leader != digest.as_bytes()) as u8 as f64;
        self.sum_f64(&mut differs, "the comparison of the settings digests")?;
        let ranks: Vec<String> = (0..differs.len())
            .filter(|&r| differs[r] > 0.0)
            .map(|r| r.to_string())
            .collect();
        if !ranks.is_empty() {
            bail!(
                "rank(s) {} of {} were started with other settings, data or models than rank 0 \
                 (settings digest {} on rank 0, {digest} on rank {}): every rank must run the \
                 same command",
                ranks.join(", "),
                self.size(),
                String::from_utf8_lossy(&leader),
                self.rank()
            );
        }
        Ok(())
    }

    /// Runs collective `what` under the watchdog.
    pub fn guarded<T>(&self, what: &str, run: impl FnOnce() -> Result<T>) -> Result<T> {
        self.watchdog.enter(what);
        let result = run().with_context(|| format!("{}: {what}", self.describe_rank()));
        self.watchdog.leave();
        result
    }

    /// Stops the whole job (after this rank printed why); in one process, exits.
    pub fn abort(&self, code: i32) -> ! {
        match self.collective() {
            Some(c) => c.abort(code),
            None => std::process::exit(code),
        }
    }
}

/// The collective a rank is in and since when, with the condition that wakes the watchdog.
type InCollective = (Mutex<Option<(String, Instant)>>, Condvar);

/// Stops the job when a collective has waited longer than the timeout.
struct Watchdog {
    timeout: Duration,
    current: Arc<InCollective>,
}

impl Watchdog {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            current: Arc::new((Mutex::new(None), Condvar::new())),
        }
    }

    /// Starts the thread that aborts the job through `collective` on a timeout.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    fn watching(self, collective: Arc<dyn Collective>) -> Self {
        let current = self.current.clone();
        let timeout = self.timeout;
        std::thread::Builder::new()
            .name("mmkd-collective-watchdog".into())
            .spawn(move || watch(&current, timeout, collective.as_ref()))
            .expect("starting the collective watchdog thread");
        self
    }

    fn enter(&self, what: &str) {
        let (lock, wake) = &*self.current;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some((what.to_string(), Instant::now()));
        wake.notify_all();
    }

    fn leave(&self) {
        let (lock, _) = &*self.current;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn watch(current: &InCollective, timeout: Duration, collective: &dyn Collective) {
    let (lock, wake) = current;
    let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let wait = match &*guard {
            None => timeout,
            Some((what, since)) => {
                let waited = since.elapsed();
                if waited >= timeout {
                    eprintln!(
                        "error: rank {} of {}: {} ({}) waited {:.0} s for the other ranks: one \
                         of them died or is stuck; stopping the job ({TIMEOUT_VAR} sets the limit)",
                        collective.rank(),
                        collective.size(),
                        what,
                        collective.name(),
                        waited.as_secs_f64()
                    );
                    collective.abort(124);
                }
                timeout - waited
            }
        };
        guard = wake
            .wait_timeout(guard, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_is_a_world_of_one_whose_collectives_change_nothing() {
        let world = world();
        assert_eq!((world.rank(), world.size()), (0, 1));
        assert!(world.is_leader() && world.collective().is_none());
        let mut values = [1.5, -2.0];
        world.sum_f64(&mut values, "test").unwrap();
        assert_eq!(values, [1.5, -2.0]);
        assert!(world.any(true, "test").unwrap());
        assert!(!world.any(false, "test").unwrap());
    }
}
