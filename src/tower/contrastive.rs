//! The `contrastive` objective: SigLIP's sigmoid loss ([`super::siglip`]) between the tower's
//! images and their captions, for any image–text data. The image embedding is the mean of the
//! features LLaVA reads, projected; the text embedding is the last caption token of a small
//! Qwen2-style decoder (causal, so the last token has read the whole caption, as CLIP's EOS
//! token), projected. Text encoder, projections, t′ and b are thrown away after training.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use mmkd_datasets::{LlavaDataset, Role as Speaker};
use mmkd_nn::Init;
use mmkd_nn::{Linear, ParamBuilder};
use tokenizers::Tokenizer;

use super::encoder::{ImageRef, TowerEncoder};
use super::siglip::{normalise_rows, pair_logits, sigmoid_loss};
use super::TowerTask;
use crate::config::tower::{TextEncoderSettings, TowerSettings};
use crate::models::decoder::{arange_positions, CausalLm};
use crate::models::text_config::TextConfig;
use crate::objective::TermValues;
use crate::train::step::MicroLoss;

/// Image–caption pairs read from LLaVA data, with the records left out counted by reason.
struct Pairs {
    images: Vec<ImageRef>,
    captions: Vec<String>,
    tokens: Vec<Vec<u32>>,
    records: usize,
    skipped: BTreeMap<String, usize>,
    truncated: usize,
}

impl Pairs {
    /// Each sample's image and the first answer of its conversation (the caption of LLaVA
    /// pre-training data).
    fn read(path: &Path, images: &Path, tokenizer: &Tokenizer, max_length: usize) -> Result<Self> {
        let data = LlavaDataset::read(path, images)?;
        let mut pairs = Pairs {
            images: Vec::new(),
            captions: Vec::new(),
            tokens: Vec::new(),
            records: data.records,
            skipped: BTreeMap::new(),
            truncated: 0,
        };
        for problem in &data.problems {
            *pairs
                .skipped
                .entry(format!("{:?}", problem.kind))
                .or_default() += 1;
        }
        for sample in &data.samples {
            let caption = sample
                .turns
                .iter()
                .find(|t| t.role == Speaker::Gpt)
                .map(|t| t.value.trim());
            let reason = match (sample.images.as_slice(), caption) {
                ([], _) => Some("no image"),
                ([_, _, ..], _) => Some("more than one image"),
                (_, None | Some("")) => Some("no caption"),
                _ => None,
            };
            if let Some(reason) = reason {
                *pairs.skipped.entry(reason.into()).or_default() += 1;
                continue;
            }
            let caption = caption.unwrap_or_default();
            let mut ids = tokenizer
                .encode(caption, false)
                .map_err(|e| {
                    let at = path.display();
                    anyhow::anyhow!("{at}: tokenizing the caption of {}: {e}", sample.reference)
                })?
                .get_ids()
                .to_vec();
            if ids.is_empty() {
                *pairs.skipped.entry("no caption".into()).or_default() += 1;
                continue;
            }
            if ids.len() > max_length {
                ids.truncate(max_length);
                pairs.truncated += 1;
            }
            pairs.images.push(ImageRef {
                id: sample
                    .reference
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("#{}", sample.reference.index)),
                path: sample.images[0].clone(),
            });
            pairs.captions.push(caption.to_string());
            pairs.tokens.push(ids);
        }
        if pairs.images.is_empty() {
            bail!(
                "{}: no sample with one image and a caption ({} records: {:?})",
                path.display(),
                pairs.records,
                pairs.skipped
            );
        }
        Ok(pairs)
    }
}

pub struct ContrastiveTask {
    text: CausalLm,
    text_proj: Linear,
    image_proj: Linear,
    /// t′ = `init_logit_scale` + this (a learnt offset, zero at start), and likewise b.
    log_scale_offset: Tensor,
    bias_offset: Tensor,
    init_log_scale: f64,
    init_bias: f64,
    train: Pairs,
    val: Option<Pairs>,
}

/// The text encoder's config: a Qwen2 decoder of the settings' size over the tokenizer.
fn text_config(text: &TextEncoderSettings, vocab_size: usize) -> Result<TextConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_attention_heads,
        "tie_word_embeddings": true,
        "rope_theta": 10000.0,
        "max_position_embeddings": text.max_length.max(64),
    }))?)
}

impl ContrastiveTask {
    /// The text side's parameters (`text.*`, `text_proj`, `image_proj`, `logit_scale`,
    /// `logit_bias` from `pb`) and the pairs of `data` (and `val`).
    pub fn new(
        pb: &ParamBuilder,
        encoder: &TowerEncoder,
        settings: &TowerSettings,
        tokenizer: &Tokenizer,
        data: &Path,
        val: Option<&Path>,
        images: &Path,
    ) -> Result<Self> {
        let t = &settings.text;
        let config = text_config(t, tokenizer.get_vocab_size(true))?;
        let text = CausalLm::new(&pb.pp("text").pp("model"), &pb.pp("text"), &config)?;
        let text_proj = Linear::new(&pb.pp("text_proj"), t.hidden_size, t.embed_dim, false, 0.02)?;
        let image_proj = Linear::new(
            &pb.pp("image_proj"),
            encoder.feature_dim(),
            t.embed_dim,
            false,
            0.02,
        )?;
        let log_scale_offset = pb.get((), "logit_scale", Init::Zeros)?;
        let bias_offset = pb.get((), "logit_bias", Init::Zeros)?;
        let train = Pairs::read(data, images, tokenizer, t.max_length)?;
        let val = val
            .map(|v| Pairs::read(v, images, tokenizer, t.max_length))
            .transpose()?;
        Ok(Self {
            text,
            text_proj,
            image_proj,
            log_scale_offset,
            bias_offset,
            init_log_scale: settings.init_logit_scale,
            init_bias: settings.init_logit_bias,
            train,
            val,
        })
    }

    /// Normalised caption embeddings `[n, embed]`: the decoder's state at each caption's last
    /// token (right padding: a causal decoder's real tokens never read the padding).
    fn text_embeddings(&self, captions: &[&Vec<u32>]) -> Result<Tensor> {
        let n = captions.len();
        let s = captions.iter().map(|c| c.len()).max().unwrap_or(1);
        let mut ids = vec![0u32; n * s];
        let mut key_mask = vec![vec![0u8; s]; n];
        let mut last = Vec::with_capacity(n);
        for (row, caption) in captions.iter().enumerate() {
            ids[row * s..row * s + caption.len()].copy_from_slice(caption);
            key_mask[row][..caption.len()].fill(1);
            last.push((row * s + caption.len() - 1) as u32);
        }
        let ids = Tensor::from_vec(ids, (n, s), &Device::Cpu)?;
        let positions = arange_positions(n, s, 0, &Device::Cpu)?;
        let hidden =
            self.text
                .forward_hidden(&self.text.embed(&ids)?, &key_mask, &positions, None)?;
        let width = hidden.dim(D::Minus1)?;
        let pooled = hidden
            .reshape((n * s, width))?
            .index_select(&Tensor::new(last, &Device::Cpu)?, 0)?;
        normalise_rows(&self.text_proj.forward(&pooled)?)
    }

    /// Normalised image embeddings `[n, embed]`: the mean of the selected features, projected.
    fn image_embeddings(&self, encoder: &TowerEncoder, images: &[&ImageRef]) -> Result<Tensor> {
        let features = encoder.features(&encoder.pixels(&ImageRef::pairs(images))?)?;
        normalise_rows(&self.image_proj.forward(&features.mean(1)?)?)
    }

    fn logits(&self, encoder: &TowerEncoder, pairs: &Pairs, batch: &[usize]) -> Result<Tensor> {
        let images: Vec<&ImageRef> = batch.iter().map(|&i| &pairs.images[i]).collect();
        let captions: Vec<&Vec<u32>> = batch.iter().map(|&i| &pairs.tokens[i]).collect();
        let x = self.image_embeddings(encoder, &images)?;
        let y = self.text_embeddings(&captions)?;
        let log_scale = (&self.log_scale_offset + self.init_log_scale)?;
        let bias = (&self.bias_offset + self.init_bias)?;
        pair_logits(&x, &y, &log_scale, &bias)
    }
}

impl TowerTask for ContrastiveTask {
    fn train_len(&self) -> usize {
        self.train.images.len()
    }

    fn image(&self, index: usize) -> &ImageRef {
        &self.train.images[index]
    }

    fn records(&self) -> (usize, BTreeMap<String, usize>) {
        let mut skipped = self.train.skipped.clone();
        if self.train.truncated > 0 {
            // Kept, but cut: reported next to the records left out.
            skipped.insert("caption truncated (kept)".into(), self.train.truncated);
        }
        (self.train.records, skipped)
    }

    fn loss(&self, encoder: &TowerEncoder, batch: &[usize]) -> Result<MicroLoss> {
        let loss = sigmoid_loss(&self.logits(encoder, &self.train, batch)?)?;
        let value = loss.to_scalar::<f32>()?;
        let terms = TermValues(vec![("sigmoid".into(), Some(value))]);
        Ok(MicroLoss::new(loss, value, terms))
    }

    /// The held-out loss and image→text retrieval within each batch: the share of images whose
    /// best-scoring caption is their own (or the same text), against chance 1/batch.
    fn validate(&self, encoder: &TowerEncoder, batch: usize) -> Result<BTreeMap<String, f64>> {
        let Some(val) = &self.val else {
            return Ok(BTreeMap::new());
        };
        let all: Vec<usize> = (0..val.images.len()).collect();
        let (mut loss_sum, mut right, mut batches) = (0f64, 0usize, 0usize);
        for chunk in all.chunks(batch) {
            let logits = self.logits(encoder, val, chunk)?.detach();
            loss_sum += sigmoid_loss(&logits)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let best = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (row, &j) in best.iter().enumerate() {
                if val.captions[chunk[row]] == val.captions[chunk[j as usize]] {
                    right += 1;
                }
            }
            batches += 1;
        }
        let n = val.images.len().max(1) as f64;
        Ok(BTreeMap::from([
            ("val_loss".to_string(), loss_sum / batches.max(1) as f64),
            ("image_to_text_top1".to_string(), 100.0 * right as f64 / n),
            // Each image of a batch guesses right with chance 1/len: one right per batch.
            (
                "image_to_text_chance".to_string(),
                100.0 * batches as f64 / n,
            ),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tower::tests::{max_abs_diff, tiny_data, tiny_spec};
    use mmkd_nn::ParamStore;

    fn task(dir: &Path, store: &ParamStore) -> (TowerEncoder, ContrastiveTask) {
        let pb = ParamBuilder::fresh(store, 5, &Device::Cpu);
        let encoder = TowerEncoder::new(&pb, &tiny_spec()).unwrap();
        let mut settings = TowerSettings::default();
        settings.text.hidden_size = 16;
        settings.text.num_attention_heads = 2;
        settings.text.intermediate_size = 32;
        settings.text.embed_dim = 8;
        settings.text.max_length = 6;
        let tokenizer = mmkd_datasets::load_tokenizer(&dir.join("tokenizer.json")).unwrap();
        let data = dir.join("train").join("pretrain.json");
        let val = dir.join("val").join("pretrain.json");
        let task =
            ContrastiveTask::new(&pb, &encoder, &settings, &tokenizer, &data, Some(&val), dir)
                .unwrap();
        (encoder, task)
    }

    #[test]
    fn every_parameter_the_loss_reads_gets_a_gradient() {
        let dir = tempfile::tempdir().unwrap();
        tiny_data(dir.path());
        let store = ParamStore::new();
        let (encoder, task) = task(dir.path(), &store);
        let loss = task.loss(&encoder, &[0, 1, 2, 3]).unwrap();
        assert!(loss.value.is_finite());
        let missing = mmkd_nn::grad_check::params_without_gradient(&store, &loss.total).unwrap();
        assert_eq!(
            missing,
            vec![
                "vision_model.post_layernorm.bias (no gradient)".to_string(),
                "vision_model.post_layernorm.weight (no gradient)".to_string()
            ]
        );
    }

    #[test]
    fn a_caption_embedding_ignores_the_padding_and_long_captions_are_cut_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        tiny_data(dir.path());
        let store = ParamStore::new();
        let (encoder, task) = task(dir.path(), &store);
        let short = vec![5u32, 9, 11];
        let long = vec![7u32, 8, 9, 10, 12, 13];
        let alone = task.text_embeddings(&[&short]).unwrap();
        let batched = task.text_embeddings(&[&long, &short]).unwrap();
        let diff = max_abs_diff(&alone.get(0).unwrap(), &batched.get(1).unwrap());
        assert!(diff < 1e-6, "padding changed the embedding by {diff}");
        assert!(task.train.tokens.iter().all(|t| t.len() <= 6));
        let (records, skipped) = task.records();
        assert_eq!(records, 64);
        assert!(skipped["caption truncated (kept)"] > 0, "{skipped:?}");
        let metrics = task.validate(&encoder, 8).unwrap();
        assert!(
            (metrics["image_to_text_chance"] - 12.5).abs() < 1e-9,
            "{metrics:?}"
        );
        assert!(metrics["val_loss"].is_finite());
    }
}
