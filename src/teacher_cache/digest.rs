//! Content digests binding a cache to what it was computed from: FNV-1a (64-bit) over the
//! bytes, as the trainer's settings digest. A guard against stale inputs, not a cryptographic
//! hash.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

/// A streaming FNV-1a hasher.
#[derive(Clone, Copy, Debug)]
pub struct ContentDigest(u64);

impl Default for ContentDigest {
    fn default() -> Self {
        Self(0xcbf29ce484222325)
    }
}

impl ContentDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        let mut hash = self.0;
        for &b in bytes {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
        self.0 = hash;
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The digest of a string.
pub fn digest_str(text: &str) -> String {
    let mut d = ContentDigest::default();
    d.update(text.as_bytes());
    d.hex()
}

/// The digest of a file's content.
pub fn digest_file(path: &Path) -> Result<String> {
    let mut d = ContentDigest::default();
    add_file(&mut d, path)?;
    Ok(d.hex())
}

fn add_file(d: &mut ContentDigest, path: &Path) -> Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        d.update(&buf[..n]);
    }
}

/// The digest of a model checkpoint directory: its `config.json` and every `*.safetensors`
/// weight file (names and contents, in name order). Tokenizer and processor files are bound
/// separately.
/// A LoRA adapter's digest covers its own files and its base's digest.
pub fn digest_checkpoint(dir: &Path) -> Result<String> {
    let adapter = crate::checkpoint::adapter::is_adapter(dir);
    let first = if adapter {
        crate::checkpoint::adapter::ADAPTER_CONFIG
    } else {
        "config.json"
    };
    let mut files = vec![dir.join(first)];
    let mut weights: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    weights.sort();
    files.extend(weights);
    let mut d = ContentDigest::default();
    for file in &files {
        if let Some(name) = file.file_name() {
            d.update(name.to_string_lossy().as_bytes());
        }
        add_file(&mut d, file)?;
    }
    if adapter {
        let base = crate::checkpoint::adapter::read_adapter(dir)?.base;
        let base_dir = crate::checkpoint::hub::resolve_model(&base)?;
        d.update(digest_checkpoint(&base_dir)?.as_bytes());
    }
    Ok(d.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_fnv1a_values_and_streaming() {
        // FNV-1a 64 reference values.
        assert_eq!(digest_str(""), "cbf29ce484222325");
        assert_eq!(digest_str("a"), "af63dc4c8601ec8c");
        let mut d = ContentDigest::default();
        d.update(b"foo");
        d.update(b"bar");
        assert_eq!(d.hex(), digest_str("foobar"));
    }
}
