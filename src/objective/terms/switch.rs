//! `switch`: Switch-KD's visual-switch distillation (Sun et al., CVPR Findings 2026, arXiv
//! 2604.14629). The student's visual outputs are switched into the teacher's language pathway:
//! its visual tokens, mapped to the teacher's width by a learned linear bridge B when the widths
//! differ, replace the teacher's own in the teacher's decoder. What the teacher then predicts,
//! p_sw = softmax(z_T(x_text, B·v_S)/T), is compared with what it predicts from its own visual
//! tokens, p_T = softmax(z_T(x_text, v_T)/T), in the shared text-probability space:
//!
//!   L_switch = mean over the rows of D(p_T ‖ p_sw)
//!
//! with the term's divergence (Switch-KD uses DBiLD, `divergence = "dbild"`). The teacher's
//! weights are constants, so the gradient flows through its decoder into B and the student's
//! visual path (projector, and the tower when it trains): visual features the teacher reads as
//! it reads its own are the implicit visual knowledge the paper transfers.
//!
//! Where the paper is not specific in what is reachable here (its equations are not quoted in
//! the public abstract and project page), mmkd decides: the switch point is the projector's
//! output (in mmkd the two models share one vision tower, so switching the tower's output would
//! change nothing), the rows are the response positions (`positions` chooses), and B is
//! initialised N(0, 1/d_s) and trained with the student, saved in its training state and not
//! exported.

use anyhow::{Context, Result};
use candle_core::Tensor;
use mmkd_nn::Linear;

use super::{rows_at, width_map, TermKind};
use crate::distill::positions::gather_rows;
use crate::distill::{DistillLossConfig, LossInputs};
use crate::objective::{Binding, Needs, Term, TermPositions};

pub const KIND: TermKind = TermKind {
    name: "switch",
    log_name: "l_switch",
    about: "Switch-KD: the teacher reading the student's visual tokens vs its own",
    divergence_options: true,
    options: &["positions"],
    build: |cfg| {
        Ok(Box::new(Switch {
            cfg: cfg.loss.clone(),
            positions: cfg.spec.positions.unwrap_or_default(),
            bridge: None,
            bound: false,
        }))
    },
};

#[derive(Debug)]
struct Switch {
    cfg: DistillLossConfig,
    positions: TermPositions,
    /// Student width → teacher width; `None` when they agree.
    bridge: Option<Linear>,
    bound: bool,
}

impl Term for Switch {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            teacher_logits: true,
            switch: true,
            ..Needs::default()
        }
    }

    fn bind(&mut self, binding: &Binding) -> Result<()> {
        let teacher = binding.teacher.context(
            "runs the teacher on the student's visual tokens: it needs an online teacher \
             (--teacher)",
        )?;
        let (ws, wt) = (binding.student.width, teacher.width);
        self.bridge = width_map(&binding.params.pp("bridge"), ws, wt)?;
        self.bound = true;
        Ok(())
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        anyhow::ensure!(
            self.bound,
            "objective term `switch` was not bound to the models"
        );
        let Some(path) = inputs.switch_path(KIND.name)? else {
            return Ok(None);
        };
        let rows = rows_at(inputs, self.positions);
        if rows.is_empty() {
            return Ok(None);
        }
        let tokens = match &self.bridge {
            Some(bridge) => bridge.forward(path.student_visual)?,
            None => path.student_visual.clone(),
        };
        let switched = (path.teacher_reads)(&tokens).context("the teacher on switched tokens")?;
        let own = inputs.teacher_logits(KIND.name)?;
        let switched = gather_rows(&switched, &rows)?;
        let own = gather_rows(&own, &rows)?;
        Ok(Some(self.cfg.per_token(&switched, &own)?.mean_all()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::{StudentLogits, SwitchPath, TeacherSide};
    use crate::objective::{LmShape, Objective, TermSpec};
    use candle_core::{Device, Var, D};
    use mmkd_nn::grad_check::gradients;
    use mmkd_nn::{ParamBuilder, ParamStore};

    /// A stand-in teacher pathway: logits at every position are a fixed linear read-out of the
    /// mean visual token (width 3) plus a per-position offset; vocabulary 4, 1 × 3 positions.
    fn teacher_reads(tokens: &Tensor) -> Result<Tensor> {
        let dev = tokens.device();
        let read = Tensor::new(
            &[
                [0.5f64, -1.0, 0.2, 0.3],
                [1.0, 0.4, -0.6, 0.0],
                [-0.3, 0.8, 0.9, -1.1],
            ],
            dev,
        )?
        .to_dtype(tokens.dtype())?;
        let pooled = tokens.mean(1)?.mean_keepdim(0)?; // [1, 3]
        let logits = pooled.matmul(&read)?; // [1, 4]
        let offsets = Tensor::new(
            &[
                [0.0f64, 0.1, 0.2, 0.3],
                [1.0, 0.0, -1.0, 0.5],
                [0.2, 0.2, 0.7, -0.4],
            ],
            dev,
        )?
        .to_dtype(tokens.dtype())?;
        Ok(offsets.broadcast_add(&logits)?.unsqueeze(0)?)
    }

    /// `objective` on one sample of 3 positions (image at 0, answer tokens at 1 and 2, zero
    /// student logits) whose teacher reads its own tokens `own_tokens` and the student's
    /// `visual` through [`teacher_reads`].
    fn evaluate_switch(
        objective: &Objective,
        visual: &Tensor,
        own_tokens: &Tensor,
    ) -> Result<crate::objective::ObjectiveValue> {
        let dev = visual.device();
        let own = teacher_reads(own_tokens)?;
        let logits = Tensor::zeros((1, 3, 4), visual.dtype(), dev)?;
        let labels = Tensor::new(&[[-100i64, 1, 2]], dev)?;
        let mask = Tensor::new(&[[1u8, 0, 0]], dev)?;
        let reads = |t: &Tensor| teacher_reads(t);
        let inputs = LossInputs::new(
            StudentLogits::Full(&logits),
            &labels,
            &mask,
            Some(TeacherSide::Logits {
                logits: &own,
                relation_hidden: None,
            }),
            None,
        )?
        .with_switch(SwitchPath {
            student_visual: visual,
            teacher_reads: &reads,
        });
        objective.evaluate(&inputs)
    }

    #[test]
    fn the_teacher_on_switched_tokens_against_its_own_with_gradients_to_the_student() {
        let dev = Device::Cpu;
        let spec: TermSpec =
            toml::from_str("term = \"switch\"\ndivergence = \"reverse_kl\"").unwrap();
        let mut objective = Objective::new(&[spec], &Default::default()).unwrap();
        let store = ParamStore::new();
        objective
            .bind(&Binding {
                student: LmShape {
                    layers: 1,
                    width: 2,
                },
                teacher: Some(LmShape {
                    layers: 2,
                    width: 3,
                }),
                params: ParamBuilder::fresh(&store, 3, &dev).pp("objective"),
                shared_vocab: None,
            })
            .unwrap();
        let bridge = store.get("objective.l_switch.bridge.weight").unwrap();
        assert_eq!(bridge.tensor.dims(), [3, 2]);

        // One image of two tokens (student width 2); the teacher's own tokens give `own`.
        let visual = Var::new(&[[[0.3f32, -0.2], [1.0, 0.5]]], &dev).unwrap();
        let own_tokens = Tensor::new(&[[[0.2f32, 0.1, -0.4], [0.0, 0.6, 0.3]]], &dev).unwrap();
        let own = teacher_reads(&own_tokens).unwrap();
        let value = evaluate_switch(&objective, visual.as_tensor(), &own_tokens).unwrap();

        // Written out: the bridged tokens, the teacher's read-out, reverse KL at rows 0 and 1.
        let bridged = visual
            .as_tensor()
            .broadcast_matmul(&bridge.tensor.t().unwrap())
            .unwrap();
        let switched = teacher_reads(&bridged).unwrap();
        let log_softmax = |z: &Tensor| -> Vec<Vec<f32>> {
            let z = z.squeeze(0).unwrap();
            let lse = z
                .exp()
                .unwrap()
                .sum_keepdim(D::Minus1)
                .unwrap()
                .log()
                .unwrap();
            z.broadcast_sub(&lse).unwrap().to_vec2::<f32>().unwrap()
        };
        let (q, p) = (log_softmax(&switched), log_softmax(&own));
        let expected: f32 = [0usize, 1]
            .iter()
            .map(|&r| {
                (0..4)
                    .map(|v| q[r][v].exp() * (q[r][v] - p[r][v]))
                    .sum::<f32>()
            })
            .sum::<f32>()
            / 2.0;
        assert!(
            (value.total_value - expected).abs() < 1e-6,
            "{} vs {expected}",
            value.total_value
        );
        assert!(expected > 1e-4, "the example should not be trivially 0");

        // Gradients reach the student's tokens and the bridge.
        let grads = value.total.backward().unwrap();
        assert!(grads.get(visual.as_tensor()).is_some());
        for (name, var) in store.trainable_vars() {
            assert!(grads.get(var.as_tensor()).is_some(), "{name}");
        }
    }

    #[test]
    fn gradients_through_the_switch_match_finite_differences() {
        let dev = Device::Cpu;
        let spec: TermSpec = toml::from_str("term = \"switch\"\npositions = \"both\"").unwrap();
        let mut objective = Objective::new(&[spec], &Default::default()).unwrap();
        objective
            .bind(&Binding {
                student: LmShape {
                    layers: 1,
                    width: 3,
                },
                teacher: Some(LmShape {
                    layers: 1,
                    width: 3,
                }),
                params: ParamBuilder::fresh(&ParamStore::new(), 0, &dev),
                shared_vocab: None,
            })
            .unwrap();
        let own_tokens = Tensor::new(&[[[0.2f64, 0.1, -0.4], [0.0, 0.6, 0.3]]], &dev).unwrap();
        let f = |visual: &Tensor| -> candle_core::Result<Tensor> {
            Ok(evaluate_switch(&objective, visual, &own_tokens)
                .map_err(candle_core::Error::wrap)?
                .total)
        };
        let start = Tensor::new(&[[[0.3f64, -0.2, 0.8], [1.0, 0.5, -0.1]]], &dev).unwrap();
        let (analytic, numeric) = gradients(f, &start, 1e-6).unwrap();
        for (a, n) in analytic.iter().zip(&numeric) {
            assert!((a - n).abs() < 1e-7, "analytic {a} vs numeric {n}");
        }
        assert!(analytic.iter().any(|g| g.abs() > 1e-4));
    }
}
