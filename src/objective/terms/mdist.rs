//! `mdist.response` and `mdist.visual`: LLaVA-KD's MDist, the teacher‖student divergence at
//! the response positions (L_res) and at the visual positions (L_vis).

use anyhow::Result;
use candle_core::Tensor;

use super::TermKind;
use crate::distill::{DistillLossConfig, LossInputs};
use crate::objective::{Needs, Term};

pub const RESPONSE: TermKind = TermKind {
    name: "mdist.response",
    log_name: "l_res",
    about: "teacher‖student divergence at the response tokens",
    divergence_options: true,
    options: &[],
    build: |cfg| {
        Ok(Box::new(Mdist {
            at: Positions::Response,
            cfg: cfg.loss.clone(),
        }))
    },
};

pub const VISUAL: TermKind = TermKind {
    name: "mdist.visual",
    log_name: "l_vis",
    about: "teacher‖student divergence at the image tokens",
    divergence_options: true,
    options: &[],
    build: |cfg| {
        Ok(Box::new(Mdist {
            at: Positions::Visual,
            cfg: cfg.loss.clone(),
        }))
    },
};

#[derive(Clone, Copy, Debug)]
enum Positions {
    Response,
    Visual,
}

#[derive(Debug)]
struct Mdist {
    at: Positions,
    cfg: DistillLossConfig,
}

impl Term for Mdist {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            // DBiLD reads the teacher at the student's top ids, beyond a cache's top-k.
            teacher_logits: self.cfg.divergence.needs_full_teacher(),
            teacher_relations: false,
            teacher_visual: matches!(self.at, Positions::Visual),
            teacher_temperature: Some(self.cfg.temperature),
            chunkable: true,
            ..Needs::default()
        }
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        match self.at {
            Positions::Response => inputs.response_divergence(&self.cfg),
            Positions::Visual => inputs.visual_divergence(&self.cfg),
        }
    }
}
