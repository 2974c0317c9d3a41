//! CPU time used by this process (all threads), from `/proc/self/task/*/schedstat` (Linux):
//! on a shared machine it measures the work a step costs, where wall time also measures the
//! other processes.

use anyhow::{Context, Result};

/// Seconds of CPU time all threads of this process have run so far.
pub fn process_cpu_seconds() -> Result<f64> {
    let tasks = "/proc/self/task";
    let mut total_ns: u64 = 0;
    for entry in std::fs::read_dir(tasks).with_context(|| format!("listing {tasks}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between listing and reading: it no longer counts.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total_ns += parse_run_ns(&text)
            .with_context(|| format!("{} is not `run_ns wait_ns slices`", path.display()))?;
    }
    Ok(total_ns as f64 / 1e9)
}

/// The first field of a schedstat line: nanoseconds spent running.
fn parse_run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_grows_with_work() {
        assert_eq!(parse_run_ns("123456 789 10\n"), Some(123456));
        assert_eq!(parse_run_ns(""), None);
        let before = process_cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds().unwrap() > before);
    }
}
