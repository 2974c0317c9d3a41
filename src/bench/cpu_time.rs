//! CPU time used by this process (all threads, finished ones included), from `getrusage`: on a
//! shared machine it measures the work a step costs, where wall time also measures the other
//! processes.

use anyhow::{ensure, Result};

/// Seconds of user + system CPU time this process has used so far.
pub fn process_cpu_seconds() -> Result<f64> {
    // SAFETY: an all-zero `rusage` is a valid value, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    ensure!(
        rc == 0,
        "getrusage failed: {}",
        std::io::Error::last_os_error()
    );
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_work() {
        let before = process_cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds().unwrap() > before);
    }
}
