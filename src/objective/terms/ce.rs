//! `ce`: next-token cross-entropy over the supervised tokens (every stage's language loss). On
//! a micro-batch the student answered itself it reads the student's forward on the data's own
//! answers instead (MiniLLM's language-modelling loss L_PT); on one the teacher answered, the
//! teacher's answers (sequence-level KD).

use anyhow::Result;
use candle_core::Tensor;

use super::TermKind;
use crate::distill::LossInputs;
use crate::objective::{Needs, Term};

pub const KIND: TermKind = TermKind {
    name: "ce",
    log_name: "ce",
    about: "next-token cross-entropy on the data",
    divergence_options: false,
    options: &[],
    build: |_| Ok(Box::new(CrossEntropy)),
};

#[derive(Debug)]
struct CrossEntropy;

impl Term for CrossEntropy {
    fn needs(&self) -> Needs {
        Needs {
            data_answers: true,
            chunkable: true,
            ..Needs::default()
        }
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        inputs.ce()
    }
}
