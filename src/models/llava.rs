//! LLaVA assembly: vision tower → feature selection → projector → splice into the language
//! model's input embeddings → decoder → logits at every position.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use mmkd_nn::{LoraPlan, ParamBuilder, ParamStore, WeightSource};
use mmkd_vision::select::FeatureSelect;
use mmkd_vision::tower::VisionTower;

use super::decoder::{arange_positions, CausalLm, KvCache, LayerStates};
use super::llava_config::LlavaConfig;
use super::projector::Projector;
use super::splice::{splice_image_features, VisualPositions};

/// Prefixes of the three modules in the checkpoint (transformers ≥ 5 layout).
pub const VISION_PREFIX: &str = "model.vision_tower";
pub const PROJECTOR_PREFIX: &str = "model.multi_modal_projector";
pub const LM_PREFIX: &str = "model.language_model";

/// Which modules get trainable parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trainable {
    pub vision: bool,
    pub projector: bool,
    pub llm: bool,
}

impl Trainable {
    pub const NONE: Self = Self {
        vision: false,
        projector: false,
        llm: false,
    };
    pub const ALL: Self = Self {
        vision: true,
        projector: true,
        llm: true,
    };
    pub const PROJECTOR: Self = Self {
        vision: false,
        projector: true,
        llm: false,
    };
    pub const PROJECTOR_AND_LLM: Self = Self {
        vision: false,
        projector: true,
        llm: true,
    };
}

/// How to build a model's parameters.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub trainable: Trainable,
    /// Seed for parameters absent from the weights.
    pub seed: u64,
    /// Seed of a fresh vision tower (models that should share one use the same value).
    pub vision_seed: u64,
    /// Dtype of frozen modules (f32, or f16/bf16 to save memory).
    pub frozen_dtype: DType,
    /// Which module prefixes must be present in the weights (others may be freshly initialised).
    pub require: Vec<&'static str>,
    pub device: Device,
    /// Low-rank adapters on the linear layers the plan names (their bases frozen).
    pub lora: Option<Arc<LoraPlan>>,
}

impl BuildOptions {
    pub fn new(trainable: Trainable, seed: u64) -> Self {
        Self {
            trainable,
            seed,
            vision_seed: 0,
            frozen_dtype: DType::F32,
            require: vec![VISION_PREFIX, PROJECTOR_PREFIX, LM_PREFIX],
            device: Device::Cpu,
            lora: None,
        }
    }
}

/// A padded batch of token sequences (right padding for training and scoring).
#[derive(Clone, Debug)]
pub struct TokenBatch {
    pub ids: Vec<Vec<u32>>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<Vec<u8>>,
}

impl TokenBatch {
    /// Pads `seqs` on the right with `pad_id`.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32) -> Self {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids = seqs
            .iter()
            .map(|s| {
                let mut row = s.clone();
                row.resize(len, pad_id);
                row
            })
            .collect();
        let mask = seqs
            .iter()
            .map(|s| (0..len).map(|t| u8::from(t < s.len())).collect())
            .collect();
        Self { ids, mask }
    }

    pub fn batch_size(&self) -> usize {
        self.ids.len()
    }

    pub fn seq_len(&self) -> usize {
        self.ids.first().map(Vec::len).unwrap_or(0)
    }
}

/// The images of a forward: pixel values `[n, 3, H, W]`, or the tower's selected features
/// `[n, tokens, vision hidden]` from [`LlavaModel::tower_features`] (the projector still runs).
#[derive(Clone, Copy, Debug)]
pub enum ImageInput<'a> {
    Pixels(&'a Tensor),
    Tower(&'a Tensor),
    /// Visual tokens `[n, tokens, hidden]` already in this model's embedding space (the
    /// projector does not run): e.g. another model's visual tokens mapped to this width.
    Projected(&'a Tensor),
}

/// A forward pass without the LM head: for losses that compute logits only at the rows they
/// read (see `distill::StudentLogits::AtRows`).
pub struct LlavaHidden {
    /// Final-norm hidden states `[b, s, hidden]`.
    pub hidden: Tensor,
    /// Image-token positions of each sample.
    pub visual: VisualPositions,
    /// `[tokens, experts]` per sparse layer (empty for a dense model).
    pub router_logits: Vec<Tensor>,
}

/// Everything a loss needs from one forward pass.
pub struct LlavaOutput {
    /// Final-norm hidden states `[b, s, hidden]`.
    pub hidden: Tensor,
    /// Logits `[b, s, vocab]` at every position.
    pub logits: Tensor,
    /// Image-token positions of each sample (for L_vis and RDist).
    pub visual: VisualPositions,
    /// The decoder's hidden states a loss asked for ([`LlavaModel::forward_images_layers`]);
    /// empty otherwise.
    pub layers: LayerStates,
    /// The visual tokens spliced in, `[n, tokens, hidden]` (the projector's output; part of
    /// the graph when it trains); `None` without images.
    pub image_features: Option<Tensor>,
}

pub struct LlavaModel {
    pub config: LlavaConfig,
    pub store: ParamStore,
    pub vision: VisionTower,
    pub selection: FeatureSelect,
    pub projector: Projector,
    pub lm: CausalLm,
    trainable: Trainable,
    device: Device,
}

impl LlavaModel {
    /// Builds the model from `config`, loading what `source` holds (already in the current key
    /// layout) and initialising the rest from `options.seed`.
    pub fn build(
        config: &LlavaConfig,
        source: Arc<WeightSource>,
        options: &BuildOptions,
    ) -> Result<Self> {
        let store = ParamStore::new();
        let root = ParamBuilder::new(&store, source, options.seed, &options.device)
            .frozen_dtype(options.frozen_dtype)
            .lora(options.lora.clone());
        let module = |prefix: &'static str, trainable: bool| {
            root.pp(prefix)
                .trainable(trainable)
                .strict(options.require.contains(&prefix))
        };
        let t = options.trainable;
        let vision_pb =
            ParamBuilder::new(&store, root.source(), options.vision_seed, &options.device)
                .frozen_dtype(options.frozen_dtype)
                .lora(options.lora.clone())
                .pp(VISION_PREFIX)
                .trainable(t.vision)
                .strict(options.require.contains(&VISION_PREFIX));
        let vision = VisionTower::new(&vision_pb, &config.vision_config)
            .context("building the vision tower")?;
        let selection = config.feature_selection()?;
        let projector = Projector::new(
            &module(PROJECTOR_PREFIX, t.projector),
            config.projector_type,
            selection.feature_dim(&config.vision_config),
            config.text_config.hidden_size,
            config.multimodal_projector_bias,
            config.projector_hidden_act,
        )
        .context("building the projector")?;
        let lm_pb = module(LM_PREFIX, t.llm);
        // lm_head sits at the top level (`lm_head.weight`) but belongs to the LLM.
        let head_pb = root
            .trainable(t.llm)
            .strict(options.require.contains(&LM_PREFIX));
        let lm = CausalLm::new(&lm_pb, &head_pb, &config.text_config)
            .context("building the language model")?;
        // A module with adapters trains (through them) even when its own weights are frozen.
        let trains = |prefix: &str| {
            store
                .trainable_vars()
                .iter()
                .any(|(name, _)| name.starts_with(prefix))
        };
        let trainable = Trainable {
            vision: t.vision || trains(VISION_PREFIX),
            projector: t.projector || trains(PROJECTOR_PREFIX),
            llm: t.llm || trains(LM_PREFIX) || trains("lm_head"),
        };
        Ok(Self {
            config: config.clone(),
            store,
            vision,
            selection,
            projector,
            lm,
            trainable,
            device: options.device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn trainable(&self) -> Trainable {
        self.trainable
    }

    pub fn image_token_id(&self) -> u32 {
        self.config.image_token_id
    }

    /// Visual tokens each image occupies in the text.
    pub fn tokens_per_image(&self) -> usize {
        self.selection.tokens_per_image(&self.config.vision_config)
    }

    /// Projected features `[n, tokens, hidden]` for pixel values `[n, 3, H, W]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.project(&self.tower_features(pixel_values)?)
    }

    /// The tower's selected features `[n, tokens, vision hidden]` (f32) for pixel values
    /// `[n, 3, H, W]`. With a frozen tower they are detached and depend on no trained weight,
    /// so a trainer can compute them ahead of the step that uses them ([`ImageInput::Tower`]).
    pub fn tower_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixels = pixel_values.to_dtype(self.vision_dtype())?;
        // Only the encoder layers the selection reads are run (LLaVA never uses the rest).
        let mut features = self
            .selection
            .features(&self.vision, &pixels)?
            .to_dtype(DType::F32)?;
        if !self.trainable.vision {
            // Nothing upstream is trainable: cut the graph so backward stops here.
            features = features.detach();
        }
        Ok(features)
    }

    /// [`LlavaModel::tower_features`] when the tower is frozen, `None` when it trains (its
    /// features then belong to the step's graph and cannot be computed ahead).
    pub fn frozen_tower_features(&self, pixel_values: &Tensor) -> Result<Option<Tensor>> {
        if self.trainable.vision {
            return Ok(None);
        }
        self.tower_features(pixel_values).map(Some)
    }

    /// The projector on tower features.
    pub fn project(&self, tower_features: &Tensor) -> Result<Tensor> {
        self.projector.forward(tower_features)
    }

    fn vision_dtype(&self) -> DType {
        self.store
            .get(&format!(
                "{VISION_PREFIX}.vision_model.embeddings.patch_embedding.weight"
            ))
            .map(|p| p.tensor.dtype())
            .unwrap_or(DType::F32)
    }

    /// Input embeddings with image features spliced in.
    pub fn embed(
        &self,
        batch: &TokenBatch,
        pixel_values: Option<&Tensor>,
    ) -> Result<(Tensor, VisualPositions)> {
        self.embed_images(batch, pixel_values.map(ImageInput::Pixels))
    }

    /// [`LlavaModel::embed`] from pixels or from precomputed tower features.
    pub fn embed_images(
        &self,
        batch: &TokenBatch,
        images: Option<ImageInput<'_>>,
    ) -> Result<(Tensor, VisualPositions)> {
        let (embeds, visual, _) = self.embed_parts(batch, images)?;
        Ok((embeds, visual))
    }

    /// [`LlavaModel::embed_images`] and the visual tokens it spliced in.
    fn embed_parts(
        &self,
        batch: &TokenBatch,
        images: Option<ImageInput<'_>>,
    ) -> Result<(Tensor, VisualPositions, Option<Tensor>)> {
        let visual = VisualPositions::find(&batch.ids, self.config.image_token_id);
        // Image positions are overwritten; look up id 0 there so ids beyond the vocabulary work.
        let lookup: Vec<u32> = batch
            .ids
            .iter()
            .flatten()
            .map(|&t| {
                if t == self.config.image_token_id {
                    0
                } else {
                    t
                }
            })
            .collect();
        let ids = Tensor::from_vec(lookup, (batch.batch_size(), batch.seq_len()), &self.device)?;
        let text = self.lm.embed(&ids)?;
        let features = match images {
            None => None,
            Some(ImageInput::Pixels(p)) => Some(self.image_features(p)?),
            Some(ImageInput::Tower(f)) => Some(self.project(f)?),
            // Another model's tokens join this one's embeddings in their dtype.
            Some(ImageInput::Projected(f)) => Some(f.to_dtype(text.dtype())?),
        };
        let embeds = splice_image_features(&text, &visual, features.as_ref())?;
        Ok((embeds, visual, features))
    }

    /// Full forward of a right-padded batch: hidden states and logits at every position.
    pub fn forward(
        &self,
        batch: &TokenBatch,
        pixel_values: Option<&Tensor>,
    ) -> Result<LlavaOutput> {
        self.forward_images(batch, pixel_values.map(ImageInput::Pixels))
    }

    /// [`LlavaModel::forward`] from pixels or from precomputed tower features.
    pub fn forward_images(
        &self,
        batch: &TokenBatch,
        images: Option<ImageInput<'_>>,
    ) -> Result<LlavaOutput> {
        self.forward_images_layers(batch, images, &[])
    }

    /// [`LlavaModel::forward_images`] that also keeps the decoder's hidden states at `layers`
    /// (0 = the input embeddings, i = after decoder layer i).
    pub fn forward_images_layers(
        &self,
        batch: &TokenBatch,
        images: Option<ImageInput<'_>>,
        layers: &[usize],
    ) -> Result<LlavaOutput> {
        self.forward_traced(batch, images, LayerStates::wanted(layers))
    }

    /// [`LlavaModel::forward_images`] keeping what `trace` asks for and routing its sparse
    /// blocks as it says.
    pub fn forward_traced(
        &self,
        batch: &TokenBatch,
        images: Option<ImageInput<'_>>,
        mut kept: LayerStates,
    ) -> Result<LlavaOutput> {
        let (embeds, visual, image_features) = self.embed_parts(batch, images)?;
        let positions = arange_positions(batch.batch_size(), batch.seq_len(), 0, &self.device)?;
        let hidden = self
            .lm
            .forward_layers(&embeds, &batch.mask, &positions, None, &mut kept)?;
        let logits = self.lm.logits(&hidden)?;
        Ok(LlavaOutput {
            hidden,
            logits,
            visual,
            layers: kept,
            image_features,
        })
    }

    /// [`LlavaModel::forward_images`] without the LM head.
    pub fn forward_images_hidden(
        &self,
        batch: &TokenBatch,
        images: Option<ImageInput<'_>>,
    ) -> Result<LlavaHidden> {
        let (embeds, visual) = self.embed_images(batch, images)?;
        let positions = arange_positions(batch.batch_size(), batch.seq_len(), 0, &self.device)?;
        let mut trace = LayerStates::default();
        let hidden = self
            .lm
            .forward_layers(&embeds, &batch.mask, &positions, None, &mut trace)?;
        Ok(LlavaHidden {
            hidden,
            visual,
            router_logits: trace.router_logits,
        })
    }

    /// A fresh KV cache for generation.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.lm.num_layers())
    }
}
