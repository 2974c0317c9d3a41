//! Sparse Mixture-of-Experts feed-forward blocks as Hugging Face lays them out (issue 21): the
//! Qwen2-MoE block (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`, a shared expert behind a
//! sigmoid gate) and Mixtral's (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2`).
//! A router scores the experts per token; the softmax's top-k weights (divided by their sum with
//! `norm_topk_prob`) mix the chosen experts' outputs.
//!
//! Every expert runs on every token and the unchosen ones are weighted 0: exact, differentiable
//! through the router's chosen weights, and cheap at the sizes the tests and the shapes world
//! use; a gathered per-expert dispatch is the faster form for real checkpoints.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use mmkd_nn::{Linear, ParamBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Where a family keeps its sparse block's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `mlp.experts.{e}.{gate,up,down}_proj`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`.
    Qwen2Moe,
    /// `block_sparse_moe.experts.{e}.{w1,w3,w2}` (gate, up, down).
    Mixtral,
}

impl ExpertLayout {
    /// The decoder layer's child holding the block.
    pub fn block(self) -> &'static str {
        match self {
            ExpertLayout::Qwen2Moe => "mlp",
            ExpertLayout::Mixtral => "block_sparse_moe",
        }
    }

    /// An expert's gate, up and down projections.
    pub fn projections(self) -> [&'static str; 3] {
        match self {
            ExpertLayout::Qwen2Moe => ["gate_proj", "up_proj", "down_proj"],
            ExpertLayout::Mixtral => ["w1", "w3", "w2"],
        }
    }
}

/// How the sparse blocks of a forward choose each token's experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// The router's top-k (the model as trained).
    #[default]
    TopK,
    /// Knowledge augmentation (Kim et al., "Every Expert Matters"): the router's top k−1 experts
    /// and a k-th drawn from the others in proportion to the router's probabilities, so a
    /// teacher's output draws on experts its top-k never uses. Draws are fixed by `seed`.
    Sampled { seed: u64 },
}
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
        layout: ExpertLayout,
        hidden: usize,
        intermediate: usize,
        act: mmkd_nn::Activation,
        init_std: f32,
    ) -> Result<Self> {
        let [gate, up, down] = layout.projections();
        Ok(Self {
            gate_proj: Linear::new(&pb.pp(gate), hidden, intermediate, false, init_std)?,
            up_proj: Linear::new(&pb.pp(up), hidden, intermediate, false, init_std)?,
            down_proj: Linear::new(&pb.pp(down), intermediate, hidden, false, init_std)?,
            act,
        })
    }

    /// The gate, up and down weights (`[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`).
    pub fn weights(&self) -> [&Tensor; 3] {
        [
            &self.gate_proj.weight,
            &self.up_proj.weight,
            &self.down_proj.weight,
        ]
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
    pub layout: ExpertLayout,
}

/// A sparse block's forward.
#[derive(Debug)]
pub struct MoeOutput {
    /// The block's output, shaped as its input.
    pub output: Tensor,
    /// `[tokens, experts]`.
    pub router_logits: Tensor,
    /// `[tokens, 1]`: the shared expert's sigmoid gate (Qwen2-MoE).
    pub shared_gate: Option<Tensor>,
}

/// A sparse block: the router, the routed experts and (Qwen2-MoE) the gated shared expert.
#[derive(Debug)]
pub struct SparseMoe {
    gate: Linear,
    experts: Vec<Expert>,
    shared: Option<(Expert, Linear)>,
    top_k: usize,
    norm_topk_prob: bool,
    /// The decoder layer (separates the draws of sampled routings between layers).
    layer: usize,
}

impl SparseMoe {
    /// The block whose tensors live under `pb` (the layer's [`ExpertLayout::block`]).
    pub fn new(pb: &ParamBuilder, shape: MoeShape, layer: usize, init_std: f32) -> Result<Self> {
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
                    shape.layout,
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
                    shape.layout,
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
            layer,
        })
    }

    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// `[.., hidden]` → the block's output, and the router's logits `[tokens, experts]`
    /// (for the load-balancing loss and router statistics).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.forward_routed(x, Routing::TopK)?;
        Ok((out.output, out.router_logits))
    }

    /// [`SparseMoe::forward`] with the experts chosen by `routing`, and the shared expert's
    /// gate values.
    pub fn forward_routed(&self, x: &Tensor, routing: Routing) -> Result<MoeOutput> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().expect("a hidden dimension");
        let flat = x.reshape(((), hidden))?;
        let logits = self.gate.forward(&flat)?;
        let weights = self
            .routing_weights(&logits, routing)?
            .to_dtype(x.dtype())?;
        let mut out = flat.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let w = weights.narrow(1, e, 1)?;
            out = (out + expert.forward(&flat)?.broadcast_mul(&w)?)?;
        }
        let mut shared_gate = None;
        if let Some((expert, gate)) = &self.shared {
            let g = candle_nn::ops::sigmoid(&gate.forward(&flat)?)?;
            out = (out + expert.forward(&flat)?.broadcast_mul(&g)?)?;
            shared_gate = Some(g);
        }
        Ok(MoeOutput {
            output: out.reshape(dims)?,
            router_logits: logits,
            shared_gate,
        })
    }

    /// The shared expert (Qwen2-MoE), if the block has one.
    pub fn shared_expert(&self) -> Option<&Expert> {
        self.shared.as_ref().map(|(expert, _)| expert)
    }

    pub fn norm_topk_prob(&self) -> bool {
        self.norm_topk_prob
    }

    /// `[tokens, experts]` weights: the softmax (in f32) kept at each token's chosen experts,
    /// renormalised over them with `norm_topk_prob`, 0 elsewhere.
    fn routing_weights(&self, logits: &Tensor, routing: Routing) -> Result<Tensor> {
        // `softmax_last_dim` has no backward: the composed softmax keeps the router trained.
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let rows = probs.to_vec2::<f32>()?;
        let experts = probs.dim(1)?;
        let mut draws = match routing {
            Routing::TopK => None,
            Routing::Sampled { seed } => Some(ChaCha8Rng::seed_from_u64(
                seed ^ (self.layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )),
        };
        let mut mask = Vec::with_capacity(rows.len() * experts);
        for row in &rows {
            let chosen = match draws.as_mut() {
                None => top_k(row, self.top_k),
                Some(rng) => top_k_with_a_draw(row, self.top_k, rng.gen::<f32>()),
            };
            let mut keep = vec![0f32; experts];
            for e in chosen {
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

/// The `k` largest entries' indices (ties to the lower index, as torch.topk's on CPU).
pub fn top_k(probs: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// The top k−1 entries, and one of the rest drawn in proportion to its probability from the
/// uniform `u ∈ [0, 1)`.
fn top_k_with_a_draw(probs: &[f32], k: usize, u: f32) -> Vec<usize> {
    let mut chosen = top_k(probs, k - 1);
    let rest: Vec<usize> = (0..probs.len()).filter(|e| !chosen.contains(e)).collect();
    let total: f32 = rest.iter().map(|&e| probs[e]).sum();
    let mut left = u * total;
    let mut pick = *rest.last().expect("k ≤ experts leaves an expert to draw");
    for &e in &rest {
        left -= probs[e];
        if left < 0.0 {
            pick = e;
            break;
        }
    }
    chosen.push(pick);
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_routing_keeps_the_top_k_minus_one_and_draws_the_last_by_probability() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        assert_eq!(top_k(&probs, 2), vec![0, 1]);
        // Without the top expert, the rest weigh 0.3, 0.15, 0.05 of 0.5.
        assert_eq!(top_k_with_a_draw(&probs, 2, 0.0), vec![0, 1]);
        assert_eq!(top_k_with_a_draw(&probs, 2, 0.59), vec![0, 1]);
        assert_eq!(top_k_with_a_draw(&probs, 2, 0.61), vec![0, 2]);
        assert_eq!(top_k_with_a_draw(&probs, 2, 0.91), vec![0, 3]);
        assert_eq!(top_k_with_a_draw(&probs, 1, 0.6), vec![1]);
        // Drawn often, each expert comes up about as often as its share.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[top_k_with_a_draw(&probs, 1, rng.gen())[0]] += 1;
        }
        for (e, &c) in counts.iter().enumerate() {
            let share = c as f32 / 20_000.0;
            assert!((share - probs[e]).abs() < 0.015, "expert {e}: {share}");
        }
    }
}
