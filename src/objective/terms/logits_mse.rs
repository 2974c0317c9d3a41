//! `logits.mse`: the mean squared difference between the student's and the teacher's logits
//! at the response positions, the logit regression of Ba & Caruana (2014, "Do Deep Nets
//! Really Need to be Deep?") — distillation on the logits themselves rather than on the
//! softmaxed distributions (L = mean over rows and vocabulary of (z_s − z_t)²). It reads the
//! teacher's full logits, so it needs an online teacher.
//!
//! docs/design.md walks through this file as the example of adding a term.

use anyhow::Result;
use candle_core::Tensor;

use super::TermKind;
use crate::distill::{LossInputs, Rows};
use crate::objective::{Needs, Term};

pub const KIND: TermKind = TermKind {
    name: "logits.mse",
    log_name: "l_logits_mse",
    about: "squared difference of teacher and student logits at the response tokens",
    divergence_options: false,
    options: &[],
    build: |_| Ok(Box::new(LogitsMse)),
};

#[derive(Debug)]
struct LogitsMse;

impl Term for LogitsMse {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            teacher_logits: true,
            ..Needs::default()
        }
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        let Some(student) = inputs.student_rows(Rows::Response)? else {
            return Ok(None);
        };
        let teacher = inputs
            .teacher_logit_rows(Rows::Response, KIND.name)?
            .expect("the teacher has the student's response rows");
        let student = student.to_dtype(candle_core::DType::F32)?;
        let teacher = teacher.to_dtype(candle_core::DType::F32)?;
        Ok(Some(student.sub(&teacher)?.sqr()?.mean_all()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::{StudentLogits, TeacherSide};
    use crate::objective::{Objective, TermSpec};
    use candle_core::{Device, Var};

    #[test]
    fn the_mean_squared_logit_difference_at_the_response_rows() {
        let dev = Device::Cpu;
        // One sample, 3 positions, vocabulary 2; labels supervise position 2, so logit row 1
        // is the only response row.
        let student = Var::new(&[[[9.0f32, 9.0], [1.0, 2.0], [7.0, 7.0]]], &dev).unwrap();
        let teacher = Tensor::new(&[[[0.0f32, 0.0], [0.0, 4.0], [0.0, 0.0]]], &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, -100, 1]], &dev).unwrap();
        let mask = Tensor::new(&[[0u8, 0, 0]], &dev).unwrap();
        let inputs = LossInputs::new(
            StudentLogits::Full(student.as_tensor()),
            &labels,
            &mask,
            Some(TeacherSide::Logits {
                logits: &teacher,
                relation_hidden: None,
            }),
            None,
        )
        .unwrap();
        let cfg = TermSpec::new(KIND.name, 1.0)
            .resolve(&KIND, &Default::default())
            .unwrap();
        let term = (KIND.build)(&cfg).unwrap();
        let loss = term.loss(&inputs).unwrap().unwrap();
        // ((1 − 0)² + (2 − 4)²) / 2 = 2.5
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 2.5);
        // d/dz_s = 2 (z_s − z_t) / 2 at the response row, 0 elsewhere.
        let grad = loss.backward().unwrap();
        let g = grad
            .get(student.as_tensor())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        assert_eq!(g, [[[0.0, 0.0], [1.0, -2.0], [0.0, 0.0]]]);

        // Registered under its name, logged as l_logits_mse, refused where no full logits are.
        let objective = Objective::new(
            &[TermSpec::new("ce", 1.0), TermSpec::new("logits.mse", 0.1)],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(objective.names(), ["ce", "l_logits_mse"]);
        assert_eq!(objective.teacher_logits_term(), Some("logits.mse"));
    }
}
