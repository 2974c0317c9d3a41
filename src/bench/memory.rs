//! Peak resident memory of this process (`VmHWM` in `/proc/self/status`, Linux only).

use anyhow::{Context, Result};

/// The process's peak resident set size in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    let path = "/proc/self/status";
    let status = std::fs::read_to_string(path)
        .with_context(|| format!("reading {path} (peak memory is measured on Linux only)"))?;
    parse_vm_hwm(&status).with_context(|| format!("{path} has no readable `VmHWM:` line"))
}

/// Starts a new peak: Linux resets `VmHWM` to the current resident size when "5" is written to
/// `/proc/self/clear_refs`. Best effort: `false` where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM:   123456 kB` → bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next()? {
        "kB" => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_status_line() {
        let status = "Name:\tmmkd\nVmPeak:\t  9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
    }

    #[test]
    fn a_reset_peak_forgets_memory_freed_before_it() {
        let block = vec![1u8; 256 << 20];
        let before = peak_rss_bytes().unwrap();
        drop(std::hint::black_box(block));
        if reset_peak_rss() {
            let after = peak_rss_bytes().unwrap();
            assert!(after + (128 << 20) < before, "{after} vs {before}");
        }
    }

    #[test]
    fn this_process_has_a_peak() {
        // Holding 64 MiB makes the peak at least that large.
        let block = vec![1u8; 64 << 20];
        let peak = peak_rss_bytes().unwrap();
        assert!(
            peak >= block.iter().map(|&b| b as u64).sum::<u64>(),
            "{peak}"
        );
    }
}
