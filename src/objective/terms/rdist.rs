//! `rdist`: LLaVA-KD's RDist, 1 − cosine between the teacher's and the student's visual-token
//! relation matrices.

use anyhow::Result;
use candle_core::Tensor;

use super::TermKind;
use crate::distill::LossInputs;
use crate::objective::{Needs, Term};

pub const KIND: TermKind = TermKind {
    name: "rdist",
    log_name: "l_rel",
    about: "teacher/student visual-token relation matrices",
    divergence_options: false,
    options: &[],
    build: |_| Ok(Box::new(Rdist)),
};

#[derive(Debug)]
struct Rdist;

impl Term for Rdist {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            teacher_logits: false,
            teacher_relations: true,
            chunkable: true,
            ..Needs::default()
        }
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        inputs.relation()
    }
}
