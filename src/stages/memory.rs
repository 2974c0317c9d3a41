//! A memory estimate before the first step: weights (student and teacher, at their dtypes),
//! the optimizer's state (gradient and two AdamW moments per trainable value) and the
//! activations a step keeps for its backward, from the model sizes and the batch shape. A run
//! that would not fit the machine is refused before it starts instead of being killed hours in.
//!
//! The activation term is an estimate (per student layer: the residual stream, attention and
//! MLP inputs and outputs, attention probabilities; the logits with their softmax and
//! gradient), accurate to a small factor; it is printed so a user can compare it with what the
//! run then takes.

use anyhow::{bail, Result};

use crate::models::llava::LlavaModel;

/// `MMKD_MEMORY_LIMIT_BYTES` replaces the machine's available memory (tests; a shared machine).
const LIMIT_ENV: &str = "MMKD_MEMORY_LIMIT_BYTES";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub optimizer: u64,
    pub activations: u64,
}

/// The batch a step runs: micro-batches side by side, each `batch × seq` tokens.
#[derive(Clone, Copy, Debug)]
pub struct BatchShape {
    pub batch: usize,
    pub seq: usize,
    pub parallel: usize,
}

fn weight_bytes(model: &LlavaModel) -> u64 {
    model
        .store
        .tensors()
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum()
}

/// Activations the student keeps for its backward, and the logits, for one micro-batch.
fn student_activation_bytes(model: &LlavaModel, shape: BatchShape) -> u64 {
    let t = &model.config.text_config;
    let tokens = (shape.batch * shape.seq) as u64;
    let per_layer = tokens * (12 * t.hidden_size as u64 + 3 * t.mean_ffn_width() as u64)
        + (shape.batch * t.num_attention_heads * shape.seq * shape.seq) as u64 * 2;
    let layers = if model.trainable().llm {
        t.num_hidden_layers as u64
    } else {
        1
    };
    let logits = tokens * t.vocab_size as u64 * 3;
    4 * (per_layer * layers + logits)
}

/// A frozen teacher's forward keeps nothing for a backward: its logits and one layer's work.
fn teacher_activation_bytes(model: &LlavaModel, shape: BatchShape) -> u64 {
    let t = &model.config.text_config;
    let tokens = (shape.batch * shape.seq) as u64;
    let layer = tokens * (4 * t.hidden_size as u64 + 2 * t.mean_ffn_width() as u64)
        + (shape.batch * t.num_attention_heads * shape.seq * shape.seq) as u64;
    4 * (layer + tokens * t.vocab_size as u64)
}

impl MemoryEstimate {
    pub fn of(student: &LlavaModel, teacher: Option<&LlavaModel>, shape: BatchShape) -> Self {
        let trainable = student.store.count_trainable() as u64;
        let parallel = shape.parallel.max(1) as u64;
        // The teacher runs one micro-batch ahead of the student's.
        let teacher_activations = teacher.map_or(0, |t| 2 * teacher_activation_bytes(t, shape));
        MemoryEstimate {
            weights: weight_bytes(student) + teacher.map_or(0, weight_bytes),
            optimizer: trainable * 4 * 3,
            activations: parallel * student_activation_bytes(student, shape) + teacher_activations,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.optimizer + self.activations
    }

    pub fn describe(&self) -> String {
        format!(
            "about {} (weights {}, optimizer state {}, activations {})",
            gib(self.total()),
            gib(self.weights),
            gib(self.optimizer),
            gib(self.activations)
        )
    }

    /// Refuses a run that does not fit in `available` bytes.
    pub fn check(&self, available: u64) -> Result<()> {
        if self.total() > available {
            bail!(
                "this run needs {} of memory but {} are available: lower train.batch_size (and \
                 raise train.grad_accum to keep the step), lower train.parallel_micro_batches or \
                 data.max_length, or set train.frozen_dtype = \"bf16\"",
                self.describe(),
                gib(available)
            );
        }
        Ok(())
    }
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 0.1 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The memory this run may use: `MMKD_MEMORY_LIMIT_BYTES`, else the machine's available memory
/// (`MemAvailable` of /proc/meminfo); `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    if let Some(limit) = std::env::var(LIMIT_ENV).ok().and_then(|v| v.parse().ok()) {
        return Some(limit);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_larger_than_the_memory_is_refused_with_what_to_change() {
        let e = MemoryEstimate {
            weights: 3 << 30,
            optimizer: 1 << 30,
            activations: 2 << 30,
        };
        assert_eq!(e.total(), 6 << 30);
        assert!(e.check(7 << 30).is_ok());
        let err = e.check(5 << 30).unwrap_err().to_string();
        assert!(
            err.contains(
                "about 6.0 GiB (weights 3.0 GiB, optimizer state 1.0 GiB, activations 2.0 GiB)"
            ) && err.contains("5.0 GiB are available")
                && err.contains("batch_size"),
            "{err}"
        );
    }

    #[test]
    fn the_machine_reports_its_memory() {
        if std::env::var(LIMIT_ENV).is_err() && std::path::Path::new("/proc/meminfo").exists() {
            let m = available_memory().unwrap();
            assert!(m > 1 << 20, "{m}");
        }
    }
}
