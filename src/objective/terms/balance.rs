//! `moe.balance`: the load-balancing loss of a Mixture-of-Experts student's routers (Switch
//! Transformer; transformers' `router_aux_loss_coef` is its weight, 0.001 in Qwen2-MoE and
//! Mixtral), so a MoE model trained from scratch keeps all its experts in use.

use anyhow::Result;
use candle_core::Tensor;

use super::TermKind;
use crate::distill::balance::load_balancing_loss;
use crate::distill::LossInputs;
use crate::objective::{Needs, Term};

pub const KIND: TermKind = TermKind {
    name: "moe.balance",
    log_name: "l_balance",
    about: "load balance of a Mixture-of-Experts student's routers (Switch auxiliary loss)",
    divergence_options: false,
    options: &[],
    build: |_| Ok(Box::new(Balance)),
};

#[derive(Debug)]
struct Balance;

impl Term for Balance {
    fn needs(&self) -> Needs {
        Needs {
            chunkable: true,
            ..Needs::default()
        }
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        load_balancing_loss(inputs.routers(KIND.name)?).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::balance::Routers;
    use crate::distill::StudentLogits;
    use crate::objective::{Objective, TermSpec};
    use candle_core::{DType, Device};

    #[test]
    fn the_term_reads_the_students_routers_and_refuses_a_dense_student() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 2, 3), DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, 1]], &dev).unwrap();
        let mask = Tensor::new(&[[0u8, 0]], &dev).unwrap();
        let objective = Objective::new(
            &[TermSpec::new("ce", 1.0), TermSpec::new("moe.balance", 0.01)],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(objective.names(), ["ce", "l_balance"]);
        let dense =
            LossInputs::new(StudentLogits::Full(&logits), &labels, &mask, None, None).unwrap();
        let err = objective.evaluate(&dense).unwrap_err();
        assert!(format!("{err:#}").contains("no sparse layer"), "{err:#}");

        let router = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let tokens = Tensor::new(&[1f32, 1.], &dev).unwrap();
        let sparse = LossInputs::new(StudentLogits::Full(&logits), &labels, &mask, None, None)
            .unwrap()
            .with_routers(Routers {
                logits: std::slice::from_ref(&router),
                top_k: 1,
                token_mask: &tokens,
            });
        let values = objective.evaluate(&sparse).unwrap();
        // Each expert takes one token and has mean probability 1/2: L = 2 · 2 · (1/2 · 1/2).
        let balance = values.terms.0[1].1.unwrap();
        assert!((balance - 1.0).abs() < 1e-6, "{balance}");
    }
}
