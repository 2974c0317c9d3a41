//! Training objectives composed by name. A stage's objective is a list of weighted terms
//! (`[[stages.<stage>.objective]]` in a preset); each term says what it reads ([`Needs`]: a
//! teacher, the teacher's relation matrices, the temperature of the teacher's probabilities)
//! and gives one scalar per micro-batch. The built-in stages are objectives too: `ce` for
//! pretrain and SFT, `ce + α·mdist.response + β·mdist.visual + γ·rdist` (the `[distill]`
//! weights) for DPT and DFT.
//!
//! Adding a method: write a [`Term`] in `terms/` and list it in [`terms::TERMS`].

mod spec;
pub mod terms;

use std::fmt;

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use serde::Serialize;

use crate::distill::{weighted_sum, DistillLossConfig, LossInputs};
pub use spec::TermSpec;
pub use terms::{TermKind, TERMS};

/// One loss term of an objective.
pub trait Term: Send + Sync + fmt::Debug {
    /// What the term reads besides the student.
    fn needs(&self) -> Needs;
    /// The term's unweighted value on one micro-batch (part of the graph); `None` when the
    /// batch has nothing it reads (no supervised token, no image).
    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>>;
}

/// What a term reads besides the student.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Needs {
    /// A teacher signal (an online teacher or a teacher cache).
    pub teacher: bool,
    /// The teacher's visual-token relation matrices (a cache must hold them).
    pub teacher_relations: bool,
    /// The temperature the teacher's probabilities are read at (a cache stores them at one).
    pub teacher_temperature: Option<f64>,
}

/// A term with its weight and the name it is logged under.
#[derive(Debug)]
struct Entry {
    name: String,
    kind: &'static str,
    weight: f64,
    term: Box<dyn Term>,
}

/// A stage's objective: Σ weight·term over its terms.
#[derive(Debug)]
pub struct Objective {
    entries: Vec<Entry>,
}

/// Each term's value on one micro-batch (or its mean over a step), by logged name, in the
/// objective's order; `None` where the batch had nothing for the term or its weight is 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TermValues(pub Vec<(String, Option<f32>)>);

impl TermValues {
    pub fn get(&self, name: &str) -> Option<f32> {
        self.0.iter().find(|(n, _)| n == name).and_then(|(_, v)| *v)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }
}

/// One micro-batch's objective: the total to backpropagate and each term's value.
#[derive(Clone, Debug)]
pub struct ObjectiveValue {
    pub total: Tensor,
    pub total_value: f32,
    pub terms: TermValues,
}

impl Objective {
    /// Builds the objective of `specs`; options a term leaves unset come from `defaults` (the
    /// preset's `[distill]` section). Unknown terms or options are errors listing the valid
    /// ones.
    pub fn new(specs: &[TermSpec], defaults: &DistillLossConfig) -> Result<Self> {
        ensure!(
            !specs.is_empty(),
            "the objective has no term (known: {})",
            terms::known()
        );
        let mut entries: Vec<Entry> = Vec::new();
        for spec in specs {
            let kind = terms::kind(&spec.term)?;
            ensure!(
                spec.weight.is_finite() && spec.weight >= 0.0,
                "objective term `{}`: weight must be ≥ 0, got {}",
                spec.term,
                spec.weight
            );
            let term = (kind.build)(&spec.resolve(kind, defaults)?)?;
            let name = spec.name.clone().unwrap_or_else(|| kind.log_name.into());
            ensure!(
                !matches!(
                    name.as_str(),
                    "step" | "epoch" | "loss" | "grad_norm" | "lr" | "samples_per_s" | "samples"
                ),
                "objective term `{}`: `{name}` is a metrics field; give the term another `name`",
                spec.term
            );
            if entries.iter().any(|e| e.name == name) {
                bail!("the objective names `{name}` twice: give one of the terms another `name`");
            }
            entries.push(Entry {
                name,
                kind: kind.name,
                weight: spec.weight,
                term,
            });
        }
        Ok(Self { entries })
    }

    /// The names the terms are logged under, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The first term (its registered name) that reads a teacher, if any.
    pub fn teacher_term(&self) -> Option<&'static str> {
        self.active()
            .find(|e| e.term.needs().teacher)
            .map(|e| e.kind)
    }

    /// Whether a term reads the teacher's relation matrices.
    pub fn needs_teacher_relations(&self) -> bool {
        self.active().any(|e| e.term.needs().teacher_relations)
    }

    /// The temperature each term reads the teacher's probabilities at.
    pub fn teacher_temperatures(&self) -> Vec<(&str, f64)> {
        self.active()
            .filter_map(|e| e.term.needs().teacher_temperature.map(|t| (e.kind, t)))
            .collect()
    }

    /// Terms of positive weight (a zero weight turns a term off).
    fn active(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.weight > 0.0)
    }

    /// Every term on one micro-batch, then their weighted sum.
    pub fn evaluate(&self, inputs: &LossInputs<'_>) -> Result<ObjectiveValue> {
        let values = self
            .entries
            .iter()
            .map(|e| {
                if e.weight > 0.0 {
                    e.term.loss(inputs)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<Option<Tensor>>>>()?;
        let total = weighted_sum(
            values
                .iter()
                .zip(&self.entries)
                .map(|(v, e)| (v.as_ref(), e.weight)),
        )?;
        let Some(total) = total else {
            bail!(
                "the batch has nothing any term of the objective reads ({}): no supervised token{}; \
                 nothing to train on",
                self.names().join(", "),
                if self.entries.len() > 1 {
                    " and no visual position"
                } else {
                    ""
                }
            );
        };
        let terms = values
            .iter()
            .zip(&self.entries)
            .map(|(v, e)| Ok((e.name.clone(), v.as_ref().map(scalar).transpose()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ObjectiveValue {
            total_value: scalar(&total)?,
            total,
            terms: TermValues(terms),
        })
    }
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}
