//! SigLIP and CLIP vision transformers built from gradient-safe `mmkd_nn` layers, returning
//! every hidden state as transformers' `output_hidden_states=True` does.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use mmkd_nn::attention::attention;
use mmkd_nn::{Activation, Init, LayerNorm, Linear, ParamBuilder};

use crate::config::{VisionConfig, VisionKind};

/// Standard deviation of freshly initialised projection weights (transformers uses 0.02 too).
const INIT_STD: f32 = 0.02;

/// What a tower forward returns.
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// `num_hidden_layers + 1` tensors `[n, tokens, hidden]`: the encoder input (SigLIP: the
    /// embeddings; CLIP: the embeddings after `pre_layrnorm`), then each layer's output.
    pub hidden_states: Vec<Tensor>,
    /// SigLIP: `post_layernorm` of the last layer's output. CLIP: the last layer's output.
    pub last_hidden_state: Tensor,
    /// CLIP only: `post_layernorm` of the class token of the last layer `[n, hidden]`.
    pub pooler_output: Option<Tensor>,
}

/// Patchify + position (and for CLIP class-token) embeddings.
#[derive(Clone, Debug)]
struct Embeddings {
    /// Conv kernel `[hidden, channels, patch, patch]`, applied as a matmul over patches.
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

/// A SigLIP or CLIP vision tower (without SigLIP's attention-pooling head, which LLaVA never
/// uses).
#[derive(Clone, Debug)]
pub struct VisionTower {
    cfg: VisionConfig,
    embeddings: Embeddings,
    pre_layrnorm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    dtype: DType,
}

impl VisionTower {
    /// Builds the tower below `pb`'s prefix with transformers' names
    /// (`vision_model.embeddings.patch_embedding.weight`, ...). Trainable builders give f32
    /// `Var`s; frozen ones may hold f16/bf16 constants, and the tower then computes in that dtype.
    pub fn new(pb: &ParamBuilder, cfg: &VisionConfig) -> Result<Self> {
        cfg.validate()?;
        let vm = pb.pp("vision_model");
        let hidden = cfg.hidden_size;
        let emb = vm.pp("embeddings");
        let patch = emb.pp("patch_embedding");
        let patch_weight = patch.get(
            (hidden, cfg.num_channels, cfg.patch_size, cfg.patch_size),
            "weight",
            Init::Normal { std: INIT_STD },
        )?;
        // SigLIP's patchify conv has a bias, CLIP's has none.
        let patch_bias = match cfg.kind {
            VisionKind::Siglip => Some(patch.get(hidden, "bias", Init::Zeros)?),
            VisionKind::Clip => None,
        };
        let class_embedding = match cfg.kind {
            VisionKind::Siglip => None,
            VisionKind::Clip => Some(emb.get(
                hidden,
                "class_embedding",
                Init::Normal {
                    std: (hidden as f32).powf(-0.5),
                },
            )?),
        };
        let position_embedding = emb.pp("position_embedding").get(
            (cfg.num_positions(), hidden),
            "weight",
            Init::Normal { std: INIT_STD },
        )?;
        let eps = cfg.layer_norm_eps;
        let pre_layrnorm = match cfg.kind {
            VisionKind::Siglip => None,
            VisionKind::Clip => Some(LayerNorm::new(&vm.pp("pre_layrnorm"), hidden, eps)?),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&vm.pp("encoder").pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(&vm.pp("post_layernorm"), hidden, eps)?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings: Embeddings {
                patch_weight,
                patch_bias,
                class_embedding,
                position_embedding,
            },
            pre_layrnorm,
            layers,
            post_layernorm,
            dtype: pb.dtype(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Dtype of the tower's parameters and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the whole tower on `pixel_values` `[n, channels, image_size, image_size]` (any float
    /// dtype; converted to the tower's dtype).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        let hidden_states = self.hidden_states(pixel_values, self.layers.len())?;
        let last = hidden_states
            .last()
            .context("vision tower produced no hidden state")?;
        let (last_hidden_state, pooler_output) = match self.cfg.kind {
            VisionKind::Siglip => (self.post_layernorm.forward(last)?, None),
            VisionKind::Clip => {
                let cls = last.narrow(1, 0, 1)?.squeeze(1)?;
                (last.clone(), Some(self.post_layernorm.forward(&cls)?))
            }
        };
        Ok(VisionOutput {
            hidden_states,
            last_hidden_state,
            pooler_output,
        })
    }

    /// The encoder input and the outputs of the first `num_layers` layers (so
    /// `num_layers + 1` tensors), skipping the work LLaVA feature selection does not need.
    pub fn hidden_states(&self, pixel_values: &Tensor, num_layers: usize) -> Result<Vec<Tensor>> {
        if num_layers > self.layers.len() {
            bail!(
                "asked for {num_layers} encoder layers, the vision tower has {}",
                self.layers.len()
            );
        }
        let mut h = self.embed(pixel_values)?;
        if let Some(ln) = &self.pre_layrnorm {
            h = ln.forward(&h)?;
        }
        let mut states = Vec::with_capacity(num_layers + 1);
        states.push(h.clone());
        for (i, layer) in self.layers[..num_layers].iter().enumerate() {
            h = layer
                .forward(&h)
                .with_context(|| format!("vision encoder layer {i}"))?;
            states.push(h.clone());
        }
        Ok(states)
    }

    /// Patch embeddings (+ class token for CLIP) + position embeddings `[n, tokens, hidden]`.
    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (c, s, p) = (cfg.num_channels, cfg.image_size, cfg.patch_size);
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1] != c || dims[2] != s || dims[3] != s {
            bail!("pixel_values has shape {dims:?}, the vision tower expects [n, {c}, {s}, {s}]");
        }
        let n = dims[0];
        let g = cfg.grid_size();
        // A stride-p conv with a p×p kernel is a matmul over non-overlapping patches. Written
        // as reshape/permute + matmul it has exact gradients and works in f16/bf16 on CPU,
        // where candle's conv2d does not. Pixels beyond g·p (when p does not divide the image
        // size) are dropped, as the strided conv drops them.
        let x = pixel_values
            .to_dtype(self.dtype)?
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .reshape(vec![n, c, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((n, g * g, c * p * p))?;
        let w = self
            .embeddings
            .patch_weight
            .reshape((cfg.hidden_size, c * p * p))?;
        let patch = Linear::from_weights(w, self.embeddings.patch_bias.clone());
        let mut h = patch.forward(&x)?;
        if let Some(cls) = &self.embeddings.class_embedding {
            let cls = cls
                .reshape((1, 1, cfg.hidden_size))?
                .broadcast_as((n, 1, cfg.hidden_size))?
                .to_dtype(h.dtype())?;
            h = Tensor::cat(&[&cls, &h], 1)?;
        }
        let pos = self.embeddings.position_embedding.to_dtype(h.dtype())?;
        Ok(h.broadcast_add(&pos.unsqueeze(0)?)?)
    }
}

impl EncoderLayer {
    fn new(pb: &ParamBuilder, cfg: &VisionConfig) -> Result<Self> {
        let (hidden, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let attn = pb.pp("self_attn");
        let proj = |name: &str| Linear::new(&attn.pp(name), hidden, hidden, true, INIT_STD);
        let mlp = pb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::new(&pb.pp("layer_norm1"), hidden, eps)?,
            self_attn: Attention {
                q_proj: proj("q_proj")?,
                k_proj: proj("k_proj")?,
                v_proj: proj("v_proj")?,
                out_proj: proj("out_proj")?,
                num_heads: cfg.num_attention_heads,
                head_dim: cfg.head_dim(),
            },
            layer_norm2: LayerNorm::new(&pb.pp("layer_norm2"), hidden, eps)?,
            mlp: Mlp {
                fc1: Linear::new(
                    &mlp.pp("fc1"),
                    hidden,
                    cfg.intermediate_size,
                    true,
                    INIT_STD,
                )?,
                fc2: Linear::new(
                    &mlp.pp("fc2"),
                    cfg.intermediate_size,
                    hidden,
                    true,
                    INIT_STD,
                )?,
                act: cfg.hidden_act,
            },
        })
    }

    /// Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(·)).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let m = self.mlp.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        let m = self.mlp.fc2.forward(&self.mlp.act.forward(&m)?)?;
        Ok((h + m)?)
    }
}

impl Attention {
    /// Bidirectional multi-head self-attention over all tokens.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Half-precision softmax loses accuracy (transformers computes it in f32 too).
        let project =
            |proj: &Linear| -> Result<Tensor> { Ok(proj.forward(x)?.to_dtype(DType::F32)?) };
        let (q, k, v) = (
            project(&self.q_proj)?,
            project(&self.k_proj)?,
            project(&self.v_proj)?,
        );
        let scale = (self.head_dim as f64).powf(-0.5);
        let o = attention(&q, &k, &v, self.num_heads, self.num_heads, None, scale)?
            .to_dtype(x.dtype())?;
        Ok(self.out_proj.forward(&o)?)
    }
}
