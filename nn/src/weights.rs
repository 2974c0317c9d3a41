//! Reading and writing safetensors weights (single file or sharded with an index), with errors
//! that name the file and tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{NnError, Result};

/// Name of the index file that lists the shards of a sharded checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SAFETENSORS_SINGLE: &str = "model.safetensors";

/// Tensors loaded from one or more files, each remembering where it came from so that errors
/// can name the file.
#[derive(Clone, Debug, Default)]
pub struct WeightSource {
    tensors: HashMap<String, (Tensor, usize)>,
    files: Vec<PathBuf>,
}

impl WeightSource {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads one safetensors file.
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let mut source = Self::empty();
        source.add_file(path, device)?;
        Ok(source)
    }

    /// Loads the checkpoint in `dir`: `model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join(SAFETENSORS_INDEX);
        let single = dir.join(SAFETENSORS_SINGLE);
        if index.exists() {
            let mut source = Self::empty();
            for shard in read_index(&index)? {
                source.add_file(&dir.join(shard), device)?;
            }
            Ok(source)
        } else if single.exists() {
            Self::from_file(&single, device)
        } else {
            Err(NnError::BadSafetensors {
                path: single,
                reason: format!("no weights found: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} exists in {}", dir.display()),
            })
        }
    }

    /// Builds a source from tensors already in memory (tests, composition of checkpoints).
    pub fn from_tensors(origin: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors: tensors.into_iter().map(|(k, t)| (k, (t, 0))).collect(),
            files: vec![origin.into()],
        }
    }

    pub fn add_file(&mut self, path: &Path, device: &Device) -> Result<()> {
        if !path.exists() {
            return Err(NnError::BadSafetensors {
                path: path.to_path_buf(),
                reason: "file does not exist".into(),
            });
        }
        let loaded =
            candle_core::safetensors::load(path, device).map_err(|e| NnError::BadSafetensors {
                path: path.to_path_buf(),
                reason: format!("{e} (truncated or not a safetensors file?)"),
            })?;
        let file_id = self.files.len();
        self.files.push(path.to_path_buf());
        for (name, tensor) in loaded {
            self.tensors.insert(name, (tensor, file_id));
        }
        Ok(())
    }

    /// Adds every tensor of `other` under `prefix` (e.g. composing a vision checkpoint into a
    /// LLaVA model), after renaming each with `rename`; `None` drops the tensor.
    pub fn merge_renamed(&mut self, other: WeightSource, rename: impl Fn(&str) -> Option<String>) {
        let offset = self.files.len();
        self.files.extend(other.files);
        for (name, (tensor, file)) in other.tensors {
            if let Some(new_name) = rename(&name) {
                self.tensors.insert(new_name, (tensor, file + offset));
            }
        }
    }

    /// Renames tensors in place (legacy key layouts → current ones).
    pub fn rename(&mut self, rename: impl Fn(&str) -> Option<String>) {
        let old = std::mem::take(&mut self.tensors);
        for (name, value) in old {
            if let Some(new_name) = rename(&name) {
                self.tensors.insert(new_name, value);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The file a tensor came from, or a description of all files when it is absent.
    pub fn origin_of(&self, name: &str) -> String {
        match self.tensors.get(name) {
            Some((_, file)) => self.files[*file].display().to_string(),
            None => self.describe(),
        }
    }

    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [] => "the (empty) weight source".to_string(),
            [one] => one.display().to_string(),
            many => format!(
                "{} shards ({} … {})",
                many.len(),
                many[0].display(),
                many[many.len() - 1].display()
            ),
        }
    }
}

fn read_index(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| NnError::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| NnError::BadIndex {
        path: index.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| NnError::BadIndex {
            path: index.to_path_buf(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| NnError::BadIndex {
            path: index.to_path_buf(),
            reason: format!("weight_map entry for `{tensor}` is not a file name"),
        })?;
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}

/// Writes `tensors` to `path` atomically (temporary file + rename) with the `format: pt`
/// metadata that transformers expects.
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(contiguous, Some(metadata), &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => NnError::io(&tmp, source),
        other => NnError::BadSafetensors {
            path: tmp.clone(),
            reason: other.to_string(),
        },
    })?;
    std::fs::rename(&tmp, path).map_err(|e| NnError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_truncation_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SAFETENSORS_SINGLE);
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let map = BTreeMap::from([("a.weight".to_string(), t.clone())]);
        save_safetensors(&map, &path).unwrap();
        let src = WeightSource::from_dir(dir.path(), &Device::Cpu).unwrap();
        let back = src.get("a.weight").unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = WeightSource::from_dir(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn missing_weights_name_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = WeightSource::from_dir(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no weights found"), "{err}");
    }
}
