//! What every fuzz target shares: the readers take paths, so each input is written to a
//! scratch file of this process first.

use std::path::PathBuf;

/// A scratch directory of this fuzzing process (created once).
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmkd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// Writes `data` to `name` in the scratch directory and returns its path.
pub fn as_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("writing the input");
    path
}
