//! Parameter storage: every weight a model uses is registered here under its Hugging Face
//! name, either as a trainable `Var` or as a frozen constant tensor (which builds no graph).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::error::{NnError, Result};
use crate::lora::LoraPlan;
use crate::rng::SeededRng;
use crate::weights::WeightSource;

/// How a parameter absent from the weight source is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f32 },
    Uniform { bound: f32 },
    Zeros,
    Ones,
}

/// One registered parameter.
#[derive(Clone, Debug)]
pub struct Param {
    pub tensor: Tensor,
    pub var: Option<Var>,
}

impl Param {
    pub fn is_trainable(&self) -> bool {
        self.var.is_some()
    }
}

/// All parameters of a model (or of several models sharing one store), keyed by full name.
/// Cloning shares the storage.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Arc<Mutex<BTreeMap<String, Param>>>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Param>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        self.params.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Trainable variables sorted by name (the order optimizers and checkpoints rely on).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .filter_map(|(name, p)| p.var.clone().map(|v| (name.clone(), v)))
            .collect()
    }

    /// Every parameter's current value, sorted by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.lock()
            .iter()
            .map(|(name, p)| (name.clone(), p.tensor.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Param> {
        self.lock().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Number of scalar parameters whose name starts with `prefix` ("" for all).
    pub fn count(&self, prefix: &str) -> usize {
        self.lock()
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, p)| p.tensor.elem_count())
            .sum()
    }

    /// Number of trainable scalar parameters.
    pub fn count_trainable(&self) -> usize {
        self.lock()
            .values()
            .filter(|p| p.is_trainable())
            .map(|p| p.tensor.elem_count())
            .sum()
    }

    fn insert(&self, name: String, param: Param) {
        self.lock().insert(name, param);
    }
}

/// Builds parameters under a name prefix, loading them from a [`WeightSource`] when present and
/// initialising them from a name-derived seed otherwise.
#[derive(Clone, Debug)]
pub struct ParamBuilder {
    store: ParamStore,
    source: Arc<WeightSource>,
    prefix: String,
    seed: u64,
    trainable: bool,
    strict: bool,
    frozen_dtype: DType,
    device: Device,
    lora: Option<Arc<LoraPlan>>,
}

impl ParamBuilder {
    /// A builder over `source`. By default parameters are trainable, f32, and missing ones are
    /// freshly initialised.
    pub fn new(store: &ParamStore, source: Arc<WeightSource>, seed: u64, device: &Device) -> Self {
        Self {
            store: store.clone(),
            source,
            prefix: String::new(),
            seed,
            trainable: true,
            strict: false,
            frozen_dtype: DType::F32,
            device: device.clone(),
            lora: None,
        }
    }

    /// A builder that initialises everything from `seed` (no weights to load).
    pub fn fresh(store: &ParamStore, seed: u64, device: &Device) -> Self {
        Self::new(store, Arc::new(WeightSource::empty()), seed, device)
    }

    /// Descends one level in the name hierarchy.
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        let mut next = self.clone();
        next.prefix = if self.prefix.is_empty() {
            name
        } else {
            format!("{}.{}", self.prefix, name)
        };
        next
    }

    /// Parameters built from here on are trainable `Var`s (true) or constants (false).
    pub fn trainable(&self, trainable: bool) -> Self {
        let mut next = self.clone();
        next.trainable = trainable;
        next
    }

    /// When strict, a parameter missing from the source is an error instead of being initialised.
    pub fn strict(&self, strict: bool) -> Self {
        let mut next = self.clone();
        next.strict = strict;
        next
    }

    /// Dtype of frozen parameters (f16/bf16 save memory for frozen towers); trainable ones are f32.
    pub fn frozen_dtype(&self, dtype: DType) -> Self {
        let mut next = self.clone();
        next.frozen_dtype = dtype;
        next
    }

    /// Linear layers built from here on get the plan's adapters where it applies.
    pub fn lora(&self, plan: Option<Arc<LoraPlan>>) -> Self {
        let mut next = self.clone();
        next.lora = plan;
        next
    }

    /// The adapter plan, when it applies to the layer at this builder's prefix.
    pub fn lora_here(&self) -> Option<&LoraPlan> {
        self.lora.as_deref().filter(|p| p.applies_to(&self.prefix))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights this builder loads from.
    pub fn source(&self) -> Arc<WeightSource> {
        self.source.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// Dtype in which this builder's parameters (and so its activations) live.
    pub fn dtype(&self) -> DType {
        if self.trainable {
            DType::F32
        } else {
            self.frozen_dtype
        }
    }

    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether the source holds `name` under this prefix (optional tensors such as biases).
    pub fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.full_name(name))
    }

    /// Gets (loading or initialising) the parameter `name` of shape `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.full_name(name);
        if let Some(existing) = self.store.get(&full) {
            return Ok(existing.tensor);
        }
        let value = match self.source.get(&full) {
            Some(t) => {
                if t.dims() != shape.dims() {
                    return Err(NnError::ShapeMismatch {
                        origin: self.source.origin_of(&full),
                        name: full,
                        expected: shape.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                t.to_device(&self.device)?
            }
            None if self.strict => {
                return Err(NnError::MissingTensor {
                    origin: self.source.describe(),
                    name: full,
                })
            }
            None => self.initial_value(&shape, &full, init)?,
        };
        let param = if self.trainable {
            let var = Var::from_tensor(&value.to_dtype(DType::F32)?)?;
            Param {
                tensor: var.as_tensor().clone(),
                var: Some(var),
            }
        } else {
            Param {
                tensor: value.to_dtype(self.frozen_dtype)?.detach(),
                var: None,
            }
        };
        self.store.insert(full, param.clone());
        Ok(param.tensor)
    }

    fn initial_value(&self, shape: &Shape, full: &str, init: Init) -> Result<Tensor> {
        let n = shape.elem_count();
        let values = match init {
            Init::Zeros => vec![0f32; n],
            Init::Ones => vec![1f32; n],
            Init::Normal { std } => SeededRng::for_name(self.seed, full).normal_vec(n, std),
            Init::Uniform { bound } => {
                SeededRng::for_name(self.seed, full).uniform_vec(n, -bound, bound)
            }
        };
        Ok(Tensor::from_vec(values, shape.clone(), &self.device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn same_seed_same_weights_and_order_independent() {
        let a = ParamStore::new();
        let pa = ParamBuilder::fresh(&a, 5, &Device::Cpu);
        let x1 = pa
            .pp("l1")
            .get((3, 4), "weight", Init::Normal { std: 0.02 })
            .unwrap();
        let _ = pa.pp("l2").get((2,), "bias", Init::Zeros).unwrap();
        let b = ParamStore::new();
        let pb = ParamBuilder::fresh(&b, 5, &Device::Cpu);
        let _ = pb.pp("l2").get((2,), "bias", Init::Zeros).unwrap();
        let y1 = pb
            .pp("l1")
            .get((3, 4), "weight", Init::Normal { std: 0.02 })
            .unwrap();
        assert_eq!(x1.to_vec2::<f32>().unwrap(), y1.to_vec2::<f32>().unwrap());
        assert_eq!(a.trainable_vars().len(), 2);
        assert_eq!(a.count(""), 14);
    }

    #[test]
    fn frozen_params_are_constants_and_loaded_shapes_are_checked() {
        let t = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
        let src = WeightSource::from_tensors("w.safetensors", HashMap::from([("m.w".into(), t)]));
        let store = ParamStore::new();
        let pb = ParamBuilder::new(&store, Arc::new(src), 0, &Device::Cpu);
        let frozen = pb
            .pp("m")
            .trainable(false)
            .get((2, 2), "w", Init::Zeros)
            .unwrap();
        assert!(!frozen.is_variable());
        assert!(store.trainable_vars().is_empty());
        let store2 = ParamStore::new();
        let pb2 = ParamBuilder::new(&store2, pb.source.clone(), 0, &Device::Cpu);
        let err = pb2
            .pp("m")
            .get((3, 2), "w", Init::Zeros)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.w") && err.contains("w.safetensors") && err.contains("[3, 2]"),
            "{err}"
        );
        let err = pb2
            .strict(true)
            .get((1,), "absent", Init::Zeros)
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent") && err.contains("missing"), "{err}");
    }
}
