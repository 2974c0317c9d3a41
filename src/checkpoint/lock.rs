//! One run per output directory: a lock file (`OUT/.mmkd-lock`, created atomically, holding the
//! owner's pid) refuses a second run on the same directory while the first is alive, so two
//! runs can never interleave their metrics or overwrite each other's checkpoints. A lock left
//! by a run that died (its pid gone) is taken over.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const LOCK_FILE: &str = ".mmkd-lock";

/// Held for as long as the run writes into its directory; removed on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

/// What the lock file records.
#[derive(Debug, PartialEq)]
struct Owner {
    pid: u32,
    command: String,
}

impl Owner {
    fn this_process() -> Self {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        Owner {
            pid: std::process::id(),
            command,
        }
    }

    fn to_text(&self) -> String {
        format!("{}\n{}\n", self.pid, self.command)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        Some(Owner {
            pid,
            command: lines.next().unwrap_or_default().to_string(),
        })
    }
}

/// Whether a process with this pid exists (signal 0 checks without sending anything).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl OutputLock {
    /// Locks `dir` (created if missing) for this run, or says which run holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Self::acquire_at(dir.join(LOCK_FILE), dir)
    }

    /// Locks `out` through a lock file next to it (`.NAME.mmkd-lock`): for an output that is
    /// renamed into place at the end, so its lock cannot live inside it.
    pub fn acquire_beside(out: &Path) -> Result<Self> {
        let name = out
            .file_name()
            .with_context(|| format!("{} has no directory name", out.display()))?
            .to_string_lossy();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        Self::acquire_at(parent.join(format!(".{name}.mmkd-lock")), out)
    }

    fn acquire_at(path: PathBuf, dir: &Path) -> Result<Self> {
        let owner = Owner::this_process();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(owner.to_text().as_bytes())
                        .and_then(|_| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(OutputLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    match Owner::parse(&text) {
                        Some(other) if alive(other.pid) => bail!(
                            "{} is in use by another mmkd run (pid {}: {}): wait for it to \
                             finish or choose another --out (if no such run exists, remove {})",
                            dir.display(),
                            other.pid,
                            other.command,
                            path.display()
                        ),
                        // Its run died (or the file is unreadable): take it over.
                        _ => {
                            std::fs::remove_file(&path).with_context(|| {
                                format!("removing the stale lock {}", path.display())
                            })?;
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating the lock {}", path.display()))
                }
            }
        }
        bail!(
            "could not lock {}: another run keeps creating {}",
            dir.display(),
            path.display()
        )
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_on_a_locked_directory_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(dir.path()).unwrap();
        let err = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("in use by another mmkd run")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let again = OutputLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_lock_left_by_a_dead_run_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A child that has exited: its pid is free (and not reused this quickly).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), format!("{pid}\nmmkd dft\n")).unwrap();
        let lock = OutputLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(
            Owner::parse(&text).unwrap().pid,
            std::process::id(),
            "{text}"
        );
        drop(lock);
        // An unreadable lock file is stale too.
        std::fs::write(dir.path().join(LOCK_FILE), "garbage").unwrap();
        assert!(OutputLock::acquire(dir.path()).is_ok());
    }
}
