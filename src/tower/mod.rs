//! `mmkd tower`: vision pre-training as a stage, the project's stand-in for SigLIP.
//!
//! LLaVA-KD's teacher and student share a vision encoder that was pre-trained on web-scale
//! image–text pairs before any LLaVA stage. Where no such encoder exists (the synthetic shapes
//! world, or a user's own domain) a random frozen tower leaves the models little to read, so
//! this stage trains a fresh tower of the preset's architecture first:
//! - `labels` ([`labels`]): per patch token, linear heads classify the shapes world's ground
//!   truth (shape, colour and size of each grid cell);
//! - `contrastive` ([`contrastive`]): SigLIP's sigmoid loss against a small text encoder on the
//!   captions of LLaVA pre-training data, for any image–text data.
//!
//! Either way the heads are thrown away and the tower, rescaled ([`export`]), is written as a
//! standalone SigLIP/CLIP vision checkpoint that a fresh model composes with its LLM
//! (`--vision DIR` or `models.<role>.vision`), exactly as it would
//! `google/siglip-so400m-patch14-384`. The demo calls the same stage.

pub mod contrastive;
pub mod encoder;
pub mod export;
pub mod labels;
mod run;
pub mod siglip;

pub use run::{run_tower, TowerRun, TowerSummary};

use std::collections::BTreeMap;

use anyhow::Result;

use crate::train::step::MicroLoss;
use encoder::{ImageRef, TowerEncoder};

/// What an objective of the tower stage provides: its training examples, the loss of a batch
/// of them, and the held-out figures.
pub trait TowerTask: Sync {
    /// Training examples.
    fn train_len(&self) -> usize;

    /// The image of training example `index`.
    fn image(&self, index: usize) -> &ImageRef;

    /// Records read, and those not trained on (or cut) by reason.
    fn records(&self) -> (usize, BTreeMap<String, usize>);

    /// The loss of the training examples `batch`, part of the graph.
    fn loss(&self, encoder: &TowerEncoder, batch: &[usize]) -> Result<MicroLoss>;

    /// Held-out figures (empty without held-out data), evaluated `batch` examples at a time.
    fn validate(&self, encoder: &TowerEncoder, batch: usize) -> Result<BTreeMap<String, f64>>;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use crate::config::{load_document, ModelSpec, Role, Stage, StageSettings};

    /// The teacher of `shapes-tiny`: a SigLIP tower of 32-pixel images in 8-pixel patches.
    pub fn tiny_spec() -> ModelSpec {
        let doc = load_document("shapes-tiny").unwrap();
        StageSettings::resolve(&doc, Stage::Pretrain, Role::Teacher)
            .unwrap()
            .model
    }

    pub use mmkd_nn::grad_check::max_abs_diff;

    /// 64 train / 16 val shapes scenes and a tokenizer in `dir`.
    pub fn tiny_data(dir: &Path) {
        let cfg = mmkd_datasets::SynthConfig {
            seed: 3,
            train: 64,
            val: 16,
            test: 4,
            image_size: 32,
        };
        mmkd_datasets::generate_synth(dir, &cfg, &mmkd_datasets::NoProgress).unwrap();
        let (texts, _) = mmkd_datasets::collect_training_text(&dir.join("train")).unwrap();
        let tokenizer = mmkd_datasets::train_bpe(&texts, 384).unwrap();
        mmkd_datasets::save_tokenizer(&tokenizer, &dir.join("tokenizer.json")).unwrap();
    }
}
