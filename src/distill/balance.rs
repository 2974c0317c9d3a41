//! The Switch Transformer's load-balancing loss for a Mixture-of-Experts student (Fedus et al.
//! 2021, eqs. 4–6), as transformers computes it for Qwen2-MoE and Mixtral: over every sparse
//! layer's real tokens, f_e is the share of top-k assignments expert e receives (counted, so no
//! gradient) and P_e its mean router probability; L = E · Σ_e f_e · P_e, which is k when the
//! load is even and grows as the router favours a few experts.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, D};

/// A student's routers on one micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct Routers<'a> {
    /// `[tokens, experts]` per sparse layer (tokens = batch · seq, row-major).
    pub logits: &'a [Tensor],
    /// Experts each token is routed to.
    pub top_k: usize,
    /// `[tokens]` f32: 1 at real tokens, 0 at padding.
    pub token_mask: &'a Tensor,
}

/// L = E · Σ_e f_e · P_e over all layers' real tokens (pooled as transformers'
/// `load_balancing_loss_func` pools them).
pub fn load_balancing_loss(routers: Routers<'_>) -> Result<Tensor> {
    let first = routers
        .logits
        .first()
        .context("no router logits: the student has no sparse layer")?;
    let (tokens, experts) = first.dims2()?;
    ensure!(
        routers.top_k >= 1 && routers.top_k <= experts,
        "a top-{} router over {experts} experts",
        routers.top_k
    );
    ensure!(
        routers.token_mask.dims() == [tokens],
        "the token mask is {:?}, the router logits cover {tokens} tokens",
        routers.token_mask.dims()
    );
    let mask = routers.token_mask.to_dtype(DType::F32)?;
    let host_mask = mask.to_vec1::<f32>()?;
    let mut counts = vec![0f32; experts];
    let mut prob_sum: Option<Tensor> = None;
    let mut rows = 0f32;
    for logits in routers.logits {
        ensure!(
            logits.dims2()? == (tokens, experts),
            "router logits of {:?} next to {:?}",
            logits.dims(),
            first.dims()
        );
        // The composed softmax: `softmax_last_dim` has no backward.
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        for (row, m) in probs.to_vec2::<f32>()?.iter().zip(&host_mask) {
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &e in &order[..routers.top_k] {
                counts[e] += m;
            }
        }
        let masked = probs.broadcast_mul(&mask.unsqueeze(1)?)?.sum(0)?;
        prob_sum = Some(match prob_sum {
            Some(sum) => (sum + masked)?,
            None => masked,
        });
        rows += host_mask.iter().sum::<f32>();
    }
    ensure!(rows > 0.0, "the micro-batch has no real token to balance");
    let share = Tensor::from_vec(
        counts.iter().map(|c| c / rows).collect::<Vec<_>>(),
        experts,
        first.device(),
    )?;
    let prob = (prob_sum.expect("at least one layer") / rows as f64)?;
    Ok((share.mul(&prob)?.sum_all()? * experts as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn even_routing_scores_k_and_the_gradient_moves_probability_off_the_busy_expert() {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[1f32, 1., 1., 1., 0.], &dev).unwrap();
        // Equal logits: P_e = 1/4 and, ties going to the lower index, experts 0 and 1 take
        // every assignment (f = [1, 1, 0, 0]): L = 4 · (1/4 + 1/4) = 2 = k.
        let even = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let routers = Routers {
            logits: std::slice::from_ref(&even),
            top_k: 2,
            token_mask: &mask,
        };
        let l = load_balancing_loss(routers).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 2.0).abs() < 1e-6);

        // A router that always prefers expert 0: its probability gets a positive gradient
        // (the loss falls as it shrinks); the padded row gets none.
        let logits = Var::new(&[[2f32, 0., 0., 0.]; 5], &dev).unwrap();
        let routers = Routers {
            logits: std::slice::from_ref(logits.as_tensor()),
            top_k: 1,
            token_mask: &mask,
        };
        let l = load_balancing_loss(routers).unwrap();
        let p0 = (2f32.exp()) / (2f32.exp() + 3.0);
        assert!((l.to_scalar::<f32>().unwrap() - 4.0 * p0).abs() < 1e-5);
        let g = l.backward().unwrap();
        let g = g.get(logits.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(g[0][0] > 0.0 && g[0][1] < 0.0, "{g:?}");
        assert_eq!(g[4], [0.0; 4]);
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[1f32, 1.], &dev).unwrap();
        let logits = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let err = load_balancing_loss(Routers {
            logits: std::slice::from_ref(&logits),
            top_k: 2,
            token_mask: &mask,
        })
        .unwrap_err();
        assert!(err.to_string().contains("cover 3 tokens"), "{err}");
        let err = load_balancing_loss(Routers {
            logits: &[],
            top_k: 2,
            token_mask: &mask,
        })
        .unwrap_err();
        assert!(err.to_string().contains("no sparse layer"), "{err}");
    }
}
