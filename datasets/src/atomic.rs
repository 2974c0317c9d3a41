//! Files that are either absent or complete: written beside their final name, then renamed
//! (atomic on one filesystem). A run stopped by a full disk or a kill leaves no half-written
//! data file for a later run to misread.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary sibling; on failure the sibling is removed and
/// any previous `path` is left as it was.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = temp_name(path);
    if let Err(err) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("cannot write {}", path.display()));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))
}

fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/data.json");
        write_atomically(&path, b"[1]").unwrap();
        write_atomically(&path, b"[1, 2]").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"[1, 2]");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["data.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        write_atomically(&path, b"old").unwrap();
        // A directory where the temporary file would go makes the write fail.
        std::fs::create_dir(temp_name(&path)).unwrap();
        let err = format!("{:#}", write_atomically(&path, b"new").unwrap_err());
        assert!(
            err.contains("cannot write") && err.contains("data.json"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
