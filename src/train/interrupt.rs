//! Ctrl-C and `kill` during training: SIGINT or SIGTERM asks the running loop to stop after
//! the step in progress, write a checkpoint and say how to resume, so an interrupted run loses
//! at most that step. A second signal stops the process at once.
//!
//! `MMKD_FAULT_SIGNAL_AT_STEP=N` raises SIGTERM in the process itself after step N: the fault
//! injection the tests use to interrupt a run at a known step.

use std::sync::atomic::{AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    if REQUESTED.swap(signal, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// While alive, SIGINT and SIGTERM are caught for the training loop; dropped, they kill the
/// process again (a signal during evaluation or between stages is not swallowed).
pub struct InterruptGuard {
    fault_at: Option<usize>,
}

impl InterruptGuard {
    pub fn install() -> Self {
        REQUESTED.store(0, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
        }
        let fault_at = std::env::var("MMKD_FAULT_SIGNAL_AT_STEP")
            .ok()
            .and_then(|v| v.parse().ok());
        InterruptGuard { fault_at }
    }

    /// Called after each finished step (1-based): the signal that asks the loop to stop, if
    /// one arrived.
    pub fn requested(&self, step_done: usize) -> Option<Interruption> {
        if self.fault_at == Some(step_done) {
            // SAFETY: raising a signal the guard handles.
            unsafe { libc::raise(libc::SIGTERM) };
        }
        match REQUESTED.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(Interruption { signal }),
        }
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the default dispositions.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
        }
    }
}

/// A signal that stopped a run (0: one another rank of the job received).
#[derive(Clone, Copy, Debug)]
pub struct Interruption {
    pub signal: i32,
}

impl Interruption {
    pub fn name(self) -> &'static str {
        match self.signal {
            libc::SIGINT => "SIGINT (Ctrl-C)",
            libc::SIGTERM => "SIGTERM",
            0 => "a signal to another rank",
            _ => "a signal",
        }
    }
}
