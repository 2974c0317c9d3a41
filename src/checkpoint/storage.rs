//! Writes that fail because of the storage — a full disk (or quota, or file-size limit), a
//! read-only or forbidden directory — are told apart from other errors, so the user reads what
//! happened and what was kept instead of a bare OS error from deep inside a writer.

use std::path::Path;

/// Why the storage refused a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageFault {
    /// No space left, a quota, or a file-size limit.
    Full,
    /// A read-only filesystem or a directory this user may not write.
    NotWritable,
}

impl StorageFault {
    /// The storage fault behind `err`, if one of the errors in its chain is an OS error that
    /// means one.
    pub fn of(err: &anyhow::Error) -> Option<StorageFault> {
        err.chain()
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .find_map(|e| Self::of_os_error(e.raw_os_error()?))
    }

    fn of_os_error(code: i32) -> Option<StorageFault> {
        match code {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Some(StorageFault::Full),
            libc::EROFS | libc::EACCES | libc::EPERM => Some(StorageFault::NotWritable),
            _ => None,
        }
    }

    fn describe(self, out: &Path) -> String {
        match self {
            StorageFault::Full => format!(
                "writing to {} failed: the disk is full (or a quota or file-size limit was reached)",
                out.display()
            ),
            StorageFault::NotWritable => format!(
                "{} cannot be written (a read-only filesystem, or no permission)",
                out.display()
            ),
        }
    }

    fn remedy(self) -> &'static str {
        match self {
            StorageFault::Full => "free some space",
            StorageFault::NotWritable => "make it writable",
        }
    }
}

/// Adds to a run's error, when the storage caused it, what happened, what was kept
/// (`kept`, e.g. "the last good checkpoint is …") and how to go on (`go_on`, e.g. "continue
/// with the same command and --resume"). Other errors pass through unchanged.
pub fn explain(
    err: anyhow::Error,
    out: &Path,
    kept: impl FnOnce() -> String,
    go_on: &str,
) -> anyhow::Error {
    match StorageFault::of(&err) {
        Some(fault) => {
            let what = fault.describe(out);
            let remedy = fault.remedy();
            err.context(format!(
                "{what}. Nothing finished was lost: {}; {remedy} and {go_on}",
                kept()
            ))
        }
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn os_error(code: i32) -> anyhow::Error {
        Err::<(), _>(std::io::Error::from_raw_os_error(code))
            .context("writing model.safetensors")
            .context("saving the checkpoint")
            .unwrap_err()
    }

    #[test]
    fn a_full_disk_and_a_read_only_directory_are_recognised_through_the_chain() {
        assert_eq!(
            StorageFault::of(&os_error(libc::ENOSPC)),
            Some(StorageFault::Full)
        );
        assert_eq!(
            StorageFault::of(&os_error(libc::EFBIG)),
            Some(StorageFault::Full)
        );
        assert_eq!(
            StorageFault::of(&os_error(libc::EROFS)),
            Some(StorageFault::NotWritable)
        );
        assert_eq!(
            StorageFault::of(&os_error(libc::EACCES)),
            Some(StorageFault::NotWritable)
        );
        assert_eq!(StorageFault::of(&os_error(libc::ENOENT)), None);
        assert_eq!(
            StorageFault::of(&anyhow::anyhow!("no space left on device")),
            None
        );
    }

    #[test]
    fn explain_says_what_was_kept_only_for_storage_faults() {
        let out = Path::new("/runs/dft");
        let full = explain(
            os_error(libc::ENOSPC),
            out,
            || "the last good checkpoint is X".into(),
            "resume",
        );
        let text = format!("{full:#}");
        assert!(
            text.starts_with("writing to /runs/dft failed: the disk is full"),
            "{text}"
        );
        assert!(
            text.contains("the last good checkpoint is X; free some space and resume"),
            "{text}"
        );
        assert!(text.contains("No space left on device"), "{text}");
        let other = explain(os_error(libc::ENOENT), out, || unreachable!(), "resume");
        assert_eq!(
            format!("{other:#}"),
            format!("{:#}", os_error(libc::ENOENT))
        );
    }
}
