//! The registered terms. A new term is one file here and one line in [`TERMS`].

mod balance;
mod ce;
mod gkd;
mod hidden;
mod logits_mse;
mod mdist;
mod minillm;
mod rdist;
mod switch;
mod uld;

use anyhow::{bail, Result};

use super::Term;
use mmkd_nn::{Linear, ParamBuilder};

use super::{TermConfig, TermPositions};
use crate::distill::{LossInputs, Rows};

/// A term as the registry knows it.
pub struct TermKind {
    /// The name presets use (`term = "..."`).
    pub name: &'static str,
    /// The name its values are logged under unless the preset gives one.
    pub log_name: &'static str,
    /// One line for the error that lists the terms.
    pub about: &'static str,
    /// Whether it takes `divergence`, `temperature` and `t2_scaling`.
    pub divergence_options: bool,
    /// The other options of its own it takes (`layers`, `distance`, ...).
    pub options: &'static [&'static str],
    /// Builds the term from its resolved settings.
    pub build: fn(&TermConfig) -> Result<Box<dyn Term>>,
}

/// Every term an objective can name.
pub const TERMS: &[TermKind] = &[
    ce::KIND,
    mdist::RESPONSE,
    mdist::VISUAL,
    rdist::KIND,
    logits_mse::KIND,
    hidden::KIND,
    switch::KIND,
    uld::KIND,
    gkd::KIND,
    minillm::SINGLE,
    minillm::LONG,
    minillm::PG,
    balance::KIND,
];

/// The flat rows of `positions` in this batch: the response rows, then the visual rows.
fn rows_at(inputs: &LossInputs<'_>, positions: TermPositions) -> Vec<u32> {
    let mut rows = Vec::new();
    if matches!(positions, TermPositions::Response | TermPositions::Both) {
        rows.extend(inputs.row_indices(Rows::Response));
    }
    if matches!(positions, TermPositions::Visual | TermPositions::Both) {
        rows.extend(inputs.row_indices(Rows::Visual));
    }
    rows
}

/// A trainable linear map (no bias, N(0, 1/from)) from one model's width to another's under
/// `params`; `None` when the widths agree.
fn width_map(params: &ParamBuilder, from: usize, to: usize) -> Result<Option<Linear>> {
    if from == to {
        return Ok(None);
    }
    let std = (1.0 / from as f64).sqrt() as f32;
    Ok(Some(Linear::new(params, from, to, false, std)?))
}

/// The registered term called `name`.
pub fn kind(name: &str) -> Result<&'static TermKind> {
    match TERMS.iter().find(|k| k.name == name) {
        Some(kind) => Ok(kind),
        None => bail!("unknown objective term `{name}` (known: {})", known()),
    }
}

/// The registered names with what each is.
pub fn known() -> String {
    TERMS
        .iter()
        .map(|k| format!("{} ({})", k.name, k.about))
        .collect::<Vec<_>>()
        .join(", ")
}
