//! Sparse Mixture-of-Experts feed-forward blocks as Hugging Face lays them out (issue 21): the
//! Qwen2-MoE block (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`, a shared expert behind a
//! sigmoid gate). A router scores the experts per token; the softmax's top-k weights (divided
//! by their sum with `norm_topk_prob`) mix the chosen experts' outputs.
//!
//! Every expert runs on every token and the unchosen ones are weighted 0: exact, differentiable
//! through the router's chosen weights, and cheap at the sizes the tests and the shapes world
//! use; a gathered per-expert dispatch is the faster form for real checkpoints.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use mmkd_nn::{Linear, ParamBuilder};

/// One expert: SwiGLU as the dense MLP (`down(act(gate(x)) · up(x))`).
#[derive(Debug)]
pub struct Expert {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: mmkd_nn::Activation,
}

impl Expert {
    pub fn new(
        pb: &ParamBuilder,
        hidden: usize,
        intermediate: usize,
        act: mmkd_nn::Activation,
        init_std: f32,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(&pb.pp("gate_proj"), hidden, intermediate, false, init_std)?,
            up_proj: Linear::new(&pb.pp("up_proj"), hidden, intermediate, false, init_std)?,
            down_proj: Linear::new(&pb.pp("down_proj"), intermediate, hidden, false, init_std)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.act.forward(&self.gate_proj.forward(x)?)?;
        let h = gate.mul(&self.up_proj.forward(x)?)?;
        Ok(self.down_proj.forward(&h)?)
    }
}

/// The shape of a sparse block (`config.json`'s MoE keys).
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub hidden: usize,
    /// `moe_intermediate_size`: each routed expert's width.
    pub expert_intermediate: usize,
    /// `shared_expert_intermediate_size` (0: no shared expert).
    pub shared_intermediate: usize,
    /// `num_experts`.
    pub experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub act: mmkd_nn::Activation,
}

/// Qwen2-MoE's sparse block.
#[derive(Debug)]
pub struct SparseMoe {
    gate: Linear,
    experts: Vec<Expert>,
    shared: Option<(Expert, Linear)>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    pub fn new(pb: &ParamBuilder, shape: MoeShape, init_std: f32) -> Result<Self> {
        ensure!(
            shape.top_k >= 1 && shape.top_k <= shape.experts,
            "a router choosing {} of {} experts: num_experts_per_tok must be between 1 and \
             num_experts",
            shape.top_k,
            shape.experts
        );
        let experts = (0..shape.experts)
            .map(|e| {
                Expert::new(
                    &pb.pp("experts").pp(e),
                    shape.hidden,
                    shape.expert_intermediate,
                    shape.act,
                    init_std,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = if shape.shared_intermediate > 0 {
            Some((
                Expert::new(
                    &pb.pp("shared_expert"),
                    shape.hidden,
                    shape.shared_intermediate,
                    shape.act,
                    init_std,
                )?,
                Linear::new(
                    &pb.pp("shared_expert_gate"),
                    shape.hidden,
                    1,
                    false,
                    init_std,
                )?,
            ))
        } else {
            None
        };
        Ok(Self {
            gate: Linear::new(&pb.pp("gate"), shape.hidden, shape.experts, false, init_std)?,
            experts,
            shared,
            top_k: shape.top_k,
            norm_topk_prob: shape.norm_topk_prob,
        })
    }

    /// `[.., hidden]` → the block's output, and the router's logits `[tokens, experts]`
    /// (for the load-balancing loss and router statistics).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().expect("a hidden dimension");
        let flat = x.reshape(((), hidden))?;
        let logits = self.gate.forward(&flat)?;
        let weights = self.routing_weights(&logits)?.to_dtype(x.dtype())?;
        let mut out = flat.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let w = weights.narrow(1, e, 1)?;
            out = (out + expert.forward(&flat)?.broadcast_mul(&w)?)?;
        }
        if let Some((expert, gate)) = &self.shared {
            let g = candle_nn::ops::sigmoid(&gate.forward(&flat)?)?;
            out = (out + expert.forward(&flat)?.broadcast_mul(&g)?)?;
        }
        Ok((out.reshape(dims)?, logits))
    }

    /// `[tokens, experts]` weights: the softmax (in f32) kept at each token's top-k experts,
    /// renormalised over them with `norm_topk_prob`, 0 elsewhere.
    fn routing_weights(&self, logits: &Tensor) -> Result<Tensor> {
        // `softmax_last_dim` has no backward: the composed softmax keeps the router trained.
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let rows = probs.to_vec2::<f32>()?;
        let experts = probs.dim(1)?;
        let mut mask = Vec::with_capacity(rows.len() * experts);
        for row in &rows {
            let mut order: Vec<usize> = (0..experts).collect();
            // Ties go to the lower index, as torch.topk's do in practice on CPU.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let mut keep = vec![0f32; experts];
            for &e in &order[..self.top_k] {
                keep[e] = 1.0;
            }
            mask.extend(keep);
        }
        let mask = Tensor::from_vec(mask, (rows.len(), experts), probs.device())?;
        let kept = probs.mul(&mask)?;
        if self.norm_topk_prob {
            Ok(kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?)?)
        } else {
            Ok(kept)
        }
    }
}
