//! The weighted average of checkpoints of one architecture (LM-Cocktail's merge: θ = Σ wᵢ·θᵢ),
//! after checking that they can be averaged at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{read_config, read_weights};

/// One model to merge: its directory and weights (in the current key layout).
pub struct MergeInput {
    pub dir: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

impl MergeInput {
    pub fn read(dir: &Path) -> Result<Self> {
        let weights = read_weights(dir, &Device::Cpu)
            .with_context(|| format!("reading the weights of {}", dir.display()))?;
        let tensors = weights
            .names()
            .map(|n| (n.to_string(), weights.get(n).expect("listed").clone()))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            tensors,
        })
    }
}

/// Refuses models that cannot be averaged: another architecture (model types), another
/// vocabulary (tokenizers), a tensor one has and another lacks, or a tensor of another shape —
/// each error names the first thing that differs.
pub fn check_compatible(models: &[MergeInput]) -> Result<()> {
    let first = &models[0];
    let kinds = |dir: &Path| -> Result<[String; 3]> {
        let config = read_config(dir)?;
        Ok([
            config.model_type.clone(),
            format!("{:?}", config.text_config.model_type),
            format!("{:?}", config.vision_config.kind),
        ])
    };
    let first_kinds = kinds(&first.dir)?;
    let first_vocab = vocabulary(&first.dir)?;
    for other in &models[1..] {
        let (a, b) = (first.dir.display(), other.dir.display());
        let other_kinds = kinds(&other.dir)?;
        ensure!(
            other_kinds == first_kinds,
            "{b} is another architecture than {a}: (model, language model, vision tower) types \
             {other_kinds:?} vs {first_kinds:?}"
        );
        match (&first_vocab, vocabulary(&other.dir)?) {
            (Some(v1), Some(v2)) if *v1 != v2 => bail!(
                "{b} has another vocabulary than {a}: {}",
                first_difference(v1, &v2)
            ),
            _ => {}
        }
        if let Some(name) = first
            .tensors
            .keys()
            .find(|k| !other.tensors.contains_key(*k))
        {
            bail!("{b} has no tensor `{name}`, which {a} has");
        }
        if let Some(name) = other
            .tensors
            .keys()
            .find(|k| !first.tensors.contains_key(*k))
        {
            bail!("{b} has a tensor `{name}` that {a} lacks");
        }
        for (name, t) in &first.tensors {
            let u = &other.tensors[name];
            ensure!(
                t.dims() == u.dims(),
                "tensor `{name}` is {:?} in {a} but {:?} in {b}",
                t.dims(),
                u.dims()
            );
        }
    }
    Ok(())
}

/// The tokenizer's token → id table, when the model has a `tokenizer.json`.
fn vocabulary(dir: &Path) -> Result<Option<BTreeMap<String, u32>>> {
    if !dir.join("tokenizer.json").exists() {
        return Ok(None);
    }
    let tokenizer = crate::checkpoint::bundle::load_tokenizer(dir)?;
    Ok(Some(tokenizer.get_vocab(true).into_iter().collect()))
}

fn first_difference(a: &BTreeMap<String, u32>, b: &BTreeMap<String, u32>) -> String {
    if a.len() != b.len() {
        return format!("{} vs {} entries", a.len(), b.len());
    }
    match a.iter().find(|(token, id)| b.get(*token) != Some(id)) {
        Some((token, id)) => match b.get(token) {
            Some(other) => format!("token {token:?} is id {id} vs {other}"),
            None => format!("token {token:?} (id {id}) is missing from the second"),
        },
        None => "the tables differ".into(),
    }
}

/// Σ wᵢ·θᵢ for every tensor, accumulated in f64 and stored in the first model's dtype (so
/// a model merged with itself, or with weights (1, 0, …), comes out bit for bit).
pub fn weighted_average(
    models: &[MergeInput],
    weights: &[f64],
) -> Result<BTreeMap<String, Tensor>> {
    ensure!(
        models.len() == weights.len(),
        "{} models but {} weights",
        models.len(),
        weights.len()
    );
    let mut merged = BTreeMap::new();
    for (name, first) in &models[0].tensors {
        let mut sum = first.to_dtype(DType::F64)?.affine(weights[0], 0.0)?;
        for (model, &w) in models.iter().zip(weights).skip(1) {
            let term = model.tensors[name].to_dtype(DType::F64)?.affine(w, 0.0)?;
            sum = (sum + term)?;
        }
        merged.insert(name.clone(), sum.to_dtype(first.dtype())?);
    }
    Ok(merged)
}

/// Weights as given, checked (finite, ≥ 0, not all 0) and normalised to sum to 1.
pub fn normalised(weights: &[f64]) -> Result<Vec<f64>> {
    ensure!(
        weights.iter().all(|w| w.is_finite() && *w >= 0.0),
        "merge weights must be finite and ≥ 0, got {weights:?}"
    );
    let total: f64 = weights.iter().sum();
    ensure!(total > 0.0, "the merge weights are all 0");
    Ok(weights.iter().map(|w| w / total).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(values: &[f32]) -> MergeInput {
        let t = Tensor::from_slice(values, (values.len(),), &Device::Cpu).unwrap();
        MergeInput {
            dir: PathBuf::from("m"),
            tensors: BTreeMap::from([("w".to_string(), t)]),
        }
    }

    #[test]
    fn averages_with_the_weights_and_keeps_exact_values_at_the_ends() {
        let a = input(&[1.0, 0.1, -3.0]);
        let b = input(&[3.0, 0.7, 5.0]);
        let m = weighted_average(&[a, b], &[0.25, 0.75]).unwrap();
        let v: Vec<f32> = m["w"].to_vec1().unwrap();
        let want = [2.5f32, 0.55, 3.0];
        for (x, y) in v.iter().zip(want) {
            assert!((x - y).abs() < 1e-6, "{v:?}");
        }
        let (a, b) = (input(&[0.1, 1e-30, 7.3]), input(&[9.0, 2.0, 1.0]));
        let m = weighted_average(&[a, b], &[1.0, 0.0]).unwrap();
        assert_eq!(m["w"].to_vec1::<f32>().unwrap(), vec![0.1, 1e-30, 7.3]);
    }

    #[test]
    fn weights_are_checked_and_normalised() {
        assert_eq!(normalised(&[1.0, 3.0]).unwrap(), vec![0.25, 0.75]);
        assert!(normalised(&[1.0, -1.0]).is_err());
        assert!(normalised(&[0.0, 0.0]).is_err());
        assert!(normalised(&[f64::NAN, 1.0]).is_err());
    }
}
