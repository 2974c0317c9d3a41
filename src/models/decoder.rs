//! Qwen2- and Llama-family decoders: a forward from input embeddings that returns hidden states
//! for every position of a padded batch, plus a KV-cached path used only for generation.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use mmkd_nn::attention::{attention, MASK_VALUE};
use mmkd_nn::{Embedding, Linear, ParamBuilder, RmsNorm};

use super::moe::{Routing, SparseMoe};
use super::text_config::TextConfig;

const INIT_STD: f32 = 0.02;

/// Keys and values (`[b, positions, kv_heads·head_dim]`) of every layer for the positions seen
/// so far (generation only; training never uses it because candle's in-place cache ops drop
/// gradients).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(1).unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` positions (speculative decoding drops the rejected ones).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        anyhow::ensure!(
            len <= self.len(),
            "cannot keep {len} cached positions of {}",
            self.len()
        );
        for layer in self.layers.iter_mut().flatten() {
            layer.0 = layer.0.narrow(1, 0, len)?;
            layer.1 = layer.1.narrow(1, 0, len)?;
        }
        Ok(())
    }

    /// Keeps only the batch rows in `rows` (sequences still generating).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for layer in self.layers.iter_mut().flatten() {
            layer.0 = layer.0.index_select(rows, 0)?;
            layer.1 = layer.1.index_select(rows, 0)?;
        }
        Ok(())
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(pb: &ParamBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        Ok(Self {
            q_proj: Linear::new(&pb.pp("q_proj"), h, heads * hd, cfg.qkv_bias(), INIT_STD)?,
            k_proj: Linear::new(&pb.pp("k_proj"), h, kv_heads * hd, cfg.qkv_bias(), INIT_STD)?,
            v_proj: Linear::new(&pb.pp("v_proj"), h, kv_heads * hd, cfg.qkv_bias(), INIT_STD)?,
            o_proj: Linear::new(&pb.pp("o_proj"), heads * hd, h, cfg.o_bias(), INIT_STD)?,
            heads,
            kv_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        // Everything stays in the projections' [b, s, heads·d] layout.
        let q = rope.apply(&self.q_proj.forward(x)?)?;
        let mut k = rope.apply(&self.k_proj.forward(x)?)?;
        let mut v = self.v_proj.forward(x)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 1)?;
                v = Tensor::cat(&[pv, &v], 1)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attention(&q, &k, &v, self.heads, self.kv_heads, Some(mask), scale)?;
        Ok(self.o_proj.forward(&out)?)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: mmkd_nn::Activation,
}

impl Mlp {
    fn new(pb: &ParamBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias());
        Ok(Self {
            gate_proj: Linear::new(&pb.pp("gate_proj"), h, i, bias, INIT_STD)?,
            up_proj: Linear::new(&pb.pp("up_proj"), h, i, bias, INIT_STD)?,
            down_proj: Linear::new(&pb.pp("down_proj"), i, h, bias, INIT_STD)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let h = match self.act {
            mmkd_nn::Activation::Silu => mmkd_nn::fused::silu_mul(&gate, &up)?,
            act => act.forward(&gate)?.mul(&up)?,
        };
        Ok(self.down_proj.forward(&h)?)
    }
}

/// A layer's feed-forward block: dense, or sparse in a Mixture-of-Experts family.
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    fn new(pb: &ParamBuilder, cfg: &TextConfig, layer: usize) -> Result<Self> {
        let Some(shape) = cfg.moe_shape().filter(|_| cfg.is_sparse_layer(layer)) else {
            // Qwen2-MoE's dense layers are ordinary MLPs at `intermediate_size`.
            return Ok(FeedForward::Dense(Mlp::new(&pb.pp("mlp"), cfg)?));
        };
        let block = pb.pp(shape.layout.block());
        let moe = SparseMoe::new(&block, shape, layer, INIT_STD)
            .with_context(|| format!("decoder layer {layer}'s sparse block"))?;
        Ok(FeedForward::Sparse(moe))
    }

    /// The block's output; a sparse block also leaves its router logits in `trace`.
    fn forward(&self, x: &Tensor, trace: &mut LayerStates) -> Result<Tensor> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Sparse(moe) => {
                let out = moe.forward_routed(x, trace.routing)?;
                trace.router_logits.push(out.router_logits);
                if let Some(gate) = out.shared_gate {
                    trace.shared_gates.push(gate);
                }
                Ok(out.output)
            }
        }
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn new(pb: &ParamBuilder, cfg: &TextConfig, layer: usize) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(
                &pb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::new(&pb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(
                &pb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: FeedForward::new(pb, cfg, layer)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        trace: &mut LayerStates,
    ) -> Result<Tensor> {
        let h =
            (x + self
                .self_attn
                .forward(&self.input_layernorm.forward(x)?, rope, mask, cache)?)?;
        let out = (&h
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?, trace)?)?;
        Ok(out)
    }
}

/// Rotary position embedding (non-interleaved halves, as `rotate_half` in transformers), with
/// cos/sin computed in f32 for the batch's position ids.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `positions`: `[b, s]` u32.
    fn new(positions: &Tensor, head_dim: usize, theta: f64, dtype: DType) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, half), positions.device())?;
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self {
            cos: emb.cos()?.to_dtype(dtype)?,
            sin: emb.sin()?.to_dtype(dtype)?,
        })
    }

    /// x: `[b, s, heads·head_dim]`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(mmkd_nn::fused::rope(x, &self.cos, &self.sin)?)
    }
}

/// Additive attention mask `[b, 1, q, past + q]`: a query at absolute position `past + i` sees
/// keys `j ≤ past + i` whose `key_mask` entry is 1.
pub fn causal_padding_mask(key_mask: &[Vec<u8>], q_len: usize, device: &Device) -> Result<Tensor> {
    let b = key_mask.len();
    let total = key_mask.first().map(|r| r.len()).unwrap_or(0);
    anyhow::ensure!(total >= q_len, "attention mask shorter than the query");
    let past = total - q_len;
    let mut data = vec![0f32; b * q_len * total];
    for (row, keys) in key_mask.iter().enumerate() {
        anyhow::ensure!(keys.len() == total, "ragged attention mask");
        for i in 0..q_len {
            for (j, &k) in keys.iter().enumerate() {
                if j > past + i || k == 0 {
                    data[(row * q_len + i) * total + j] = MASK_VALUE;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, q_len, total), device)?)
}

/// A Qwen2/Llama causal language model: `model.embed_tokens`, `model.layers.*`, `model.norm`
/// and `lm_head` (tied to the embeddings when the config says so).
pub struct CausalLm {
    pub config: TextConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
}

impl CausalLm {
    /// `model_pb` is where the decoder's weights live (`model.language_model` in a LLaVA
    /// checkpoint), `head_pb` where `lm_head` lives.
    pub fn new(
        model_pb: &ParamBuilder,
        head_pb: &ParamBuilder,
        config: &TextConfig,
    ) -> Result<Self> {
        config.check_supported()?;
        let embed_tokens = Embedding::new(
            &model_pb.pp("embed_tokens"),
            config.vocab_size,
            config.hidden_size,
            INIT_STD,
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model_pb.pp("layers").pp(i), config, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(
            &model_pb.pp("norm"),
            config.hidden_size,
            config.rms_norm_eps,
        )?;
        let lm_head = if config.tie_word_embeddings {
            Linear::from_weights(embed_tokens.weight.clone(), None)
        } else {
            Linear::new(
                &head_pb.pp("lm_head"),
                config.hidden_size,
                config.vocab_size,
                false,
                INIT_STD,
            )?
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The sparse blocks, by decoder layer (empty for a dense model).
    pub fn sparse_blocks(&self) -> Vec<(usize, &SparseMoe)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.mlp {
                FeedForward::Sparse(moe) => Some((i, moe)),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// Embeddings of token ids `[b, s]` → `[b, s, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head.weight
    }

    /// Final-norm hidden states for every position. `key_mask[b][t]` is 1 for real tokens
    /// (length past + s when a cache is given); `positions` is `[b, s]` u32.
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        key_mask: &[Vec<u8>],
        positions: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_layers(
            embeds,
            key_mask,
            positions,
            cache,
            &mut LayerStates::default(),
        )
    }

    /// [`CausalLm::forward_hidden`] that also keeps the hidden states `keep.layers` names: 0 is
    /// the input embeddings, i ≥ 1 the output of decoder layer i (before the final norm), as
    /// transformers' `output_hidden_states`.
    pub fn forward_layers(
        &self,
        embeds: &Tensor,
        key_mask: &[Vec<u8>],
        positions: &Tensor,
        mut cache: Option<&mut KvCache>,
        keep: &mut LayerStates,
    ) -> Result<Tensor> {
        if let Some(&i) = keep.wanted.iter().find(|&&i| i > self.layers.len()) {
            anyhow::bail!(
                "hidden state of layer {i} asked for; the model has {} layers (0 = embeddings)",
                self.layers.len()
            );
        }
        keep.keep(0, embeds);
        let (_, s, _) = embeds.dims3()?;
        let mask = causal_padding_mask(key_mask, s, embeds.device())?;
        let rope = Rope::new(
            positions,
            self.config.head_dim(),
            self.config.rope_theta(),
            embeds.dtype(),
        )?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &rope, &mask, slot, keep)?;
            keep.keep(i + 1, &x);
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Logits `[b, s, vocab]` from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }
}

/// What a forward leaves besides its output: the hidden states asked for, by layer (0 =
/// embeddings, i = after decoder layer i), and each sparse block's router logits; and how its
/// sparse blocks route.
#[derive(Clone, Debug, Default)]
pub struct LayerStates {
    wanted: Vec<usize>,
    pub states: BTreeMap<usize, Tensor>,
    /// `[tokens, experts]` per sparse block in layer order (tokens = batch · positions).
    pub router_logits: Vec<Tensor>,
    /// `[tokens, 1]` per sparse block with a shared expert: its sigmoid gate.
    pub shared_gates: Vec<Tensor>,
    pub routing: Routing,
}

impl LayerStates {
    /// Keeps the states of `layers` when the forward runs.
    pub fn wanted(layers: &[usize]) -> Self {
        Self {
            wanted: layers.to_vec(),
            ..Self::default()
        }
    }

    /// Routes the sparse blocks with `routing`.
    pub fn routed(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    fn keep(&mut self, layer: usize, x: &Tensor) {
        if self.wanted.contains(&layer) {
            self.states.insert(layer, x.clone());
        }
    }

    /// The same states cut from the graph (a frozen teacher's).
    pub fn detach(&self) -> Self {
        Self {
            wanted: self.wanted.clone(),
            states: self.states.iter().map(|(&i, t)| (i, t.detach())).collect(),
            router_logits: self.router_logits.iter().map(Tensor::detach).collect(),
            shared_gates: self.shared_gates.iter().map(Tensor::detach).collect(),
            routing: self.routing,
        }
    }
}

/// Position ids `0..s` for each row (right-padded training batches, as transformers does).
pub fn arange_positions(b: usize, s: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let row: Vec<u32> = (offset as u32..(offset + s) as u32).collect();
    Ok(Tensor::from_vec(row, (1, s), device)?.repeat((b, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmkd_nn::grad_check::params_without_gradient;
    use mmkd_nn::ParamStore;

    fn tiny(family: &str, tied: bool) -> TextConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": family, "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": tied, "rope_theta": 10000.0
        }))
        .unwrap()
    }

    #[test]
    fn every_decoder_parameter_gets_a_gradient() {
        for (family, tied) in [("qwen2", false), ("llama", true), ("llama", false)] {
            let store = ParamStore::new();
            let pb = ParamBuilder::fresh(&store, 3, &Device::Cpu);
            let lm = CausalLm::new(&pb.pp("model"), &pb, &tiny(family, tied)).unwrap();
            let ids = Tensor::new(&[[1u32, 5, 7, 2], [3, 4, 0, 0]], &Device::Cpu).unwrap();
            let mask = vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]];
            let embeds = lm.embed(&ids).unwrap();
            let pos = arange_positions(2, 4, 0, &Device::Cpu).unwrap();
            let logits = lm
                .logits(&lm.forward_hidden(&embeds, &mask, &pos, None).unwrap())
                .unwrap();
            let target = Tensor::randn(0f32, 1., logits.shape(), &Device::Cpu).unwrap();
            let loss = (logits * target).unwrap().sum_all().unwrap();
            let missing = params_without_gradient(&store, &loss).unwrap();
            assert!(missing.is_empty(), "{family} tied={tied}: {missing:?}");
            let expected = if tied { 2 * 9 + 2 } else { 2 * 9 + 3 };
            let bias = if family == "qwen2" { 3 * 2 } else { 0 };
            assert_eq!(store.trainable_vars().len(), expected + bias, "{family}");
        }
    }

    #[test]
    fn cached_forward_equals_full_forward() {
        let store = ParamStore::new();
        let pb = ParamBuilder::fresh(&store, 4, &Device::Cpu);
        let lm = CausalLm::new(&pb.pp("model"), &pb, &tiny("qwen2", false)).unwrap();
        let ids = Tensor::new(&[[0u32, 5, 7, 2, 9]], &Device::Cpu).unwrap();
        let embeds = lm.embed(&ids).unwrap();
        let mask = vec![vec![0, 1, 1, 1, 1]];
        let pos = Tensor::new(&[[0u32, 0, 1, 2, 3]], &Device::Cpu).unwrap();
        let full = lm.forward_hidden(&embeds, &mask, &pos, None).unwrap();
        let mut cache = KvCache::new(2);
        let first = lm
            .forward_hidden(
                &embeds.narrow(1, 0, 3).unwrap(),
                &[mask[0][..3].to_vec()],
                &pos.narrow(1, 0, 3).unwrap(),
                Some(&mut cache),
            )
            .unwrap();
        let second = lm
            .forward_hidden(
                &embeds.narrow(1, 3, 2).unwrap(),
                &mask,
                &pos.narrow(1, 3, 2).unwrap(),
                Some(&mut cache),
            )
            .unwrap();
        assert_eq!(cache.len(), 5);
        // Position 0 is padding (its output is unused and differs by construction).
        let stitched = Tensor::cat(&[&first, &second], 1)
            .unwrap()
            .narrow(1, 1, 4)
            .unwrap();
        let diff = mmkd_nn::grad_check::max_abs_diff(&full.narrow(1, 1, 4).unwrap(), &stitched);
        assert!(diff < 1e-5, "{diff}");
    }
}
