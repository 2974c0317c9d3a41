//! Progress reporting without a UI dependency: the CLI implements [`Progress`] with progress
//! bars, tests and library callers use [`NoProgress`].

/// Receives the stages of a long job and the work done in each.
pub trait Progress: Sync {
    /// A stage named `stage` with `total` steps begins.
    fn start(&self, stage: &str, total: u64);
    /// `n` more steps of the current stage are done.
    fn inc(&self, n: u64);
    /// The current stage is over.
    fn finish(&self);
}

/// Ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _stage: &str, _total: u64) {}
    fn inc(&self, _n: u64) {}
    fn finish(&self) {}
}
