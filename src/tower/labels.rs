//! The `labels` objective: the shapes world's ground truth. Per patch token, linear heads
//! classify the shape, colour and size of the object in the patch's grid cell (or "empty");
//! the loss is the sum of the three heads' cross-entropies. The heads are thrown away after
//! training.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use mmkd_datasets::{read_scene_cells, Attribute, SceneCells};
use mmkd_nn::{Linear, ParamBuilder};

use super::encoder::{ImageRef, TowerEncoder};
use super::TowerTask;
use crate::objective::TermValues;
use crate::train::step::MicroLoss;

/// Scenes (`scenes.jsonl` of `mmkd data synth`) with their images resolved.
struct Scenes {
    cells: Vec<SceneCells>,
    images: Vec<ImageRef>,
}

impl Scenes {
    fn read(path: &Path, images: &Path) -> Result<Self> {
        let cells = read_scene_cells(path)?;
        let images = cells
            .iter()
            .map(|s| ImageRef {
                id: s.id.clone(),
                path: images.join(&s.image),
            })
            .collect();
        Ok(Self { cells, images })
    }
}

pub struct LabelsTask {
    heads: Vec<(Attribute, Linear)>,
    grid: usize,
    train: Scenes,
    val: Option<Scenes>,
}

impl LabelsTask {
    /// The heads (parameters `heads.<attribute>.*` from `pb`) and the scenes of `data` (and
    /// `val`), image paths relative to `images`.
    pub fn new(
        pb: &ParamBuilder,
        encoder: &TowerEncoder,
        data: &Path,
        val: Option<&Path>,
        images: &Path,
    ) -> Result<Self> {
        let grid = encoder.config.grid_size();
        let tokens = encoder.select.tokens_per_image(&encoder.config);
        ensure!(
            tokens == grid * grid,
            "the labels objective labels patch tokens, but the feature selection gives {tokens} \
             tokens per image for {} patches (a class token kept? use select_strategy \"default\")",
            grid * grid
        );
        let dim = encoder.feature_dim();
        let heads = Attribute::ALL
            .iter()
            .map(|&a| {
                let head = Linear::new(&pb.pp("heads").pp(a.name()), dim, a.classes(), true, 0.02)?;
                Ok((a, head))
            })
            .collect::<Result<Vec<_>>>()?;
        let train = Scenes::read(data, images)
            .context("the labels objective reads `scenes.jsonl` of `mmkd data synth`")?;
        let val = val.map(|v| Scenes::read(v, images)).transpose()?;
        Ok(Self {
            heads,
            grid,
            train,
            val,
        })
    }

    /// Each head's logits `[n · tokens, classes]`.
    fn logits(&self, features: &Tensor) -> Result<Vec<Tensor>> {
        let (n, t, d) = features.dims3()?;
        let rows = features.reshape((n * t, d))?;
        self.heads
            .iter()
            .map(|(_, h)| Ok(h.forward(&rows)?))
            .collect()
    }

    /// Per attribute, the labels of a batch's patches `[n · tokens]` (u32).
    fn labels(&self, scenes: &[&SceneCells]) -> Result<Vec<Tensor>> {
        self.heads
            .iter()
            .map(|(a, _)| {
                let all: Vec<u32> = scenes
                    .iter()
                    .flat_map(|s| s.patch_labels(self.grid, *a))
                    .collect();
                Ok(Tensor::new(all, &Device::Cpu)?)
            })
            .collect()
    }

    fn batch_loss(&self, features: &Tensor, scenes: &[&SceneCells]) -> Result<Tensor> {
        let labels = self.labels(scenes)?;
        let mut loss: Option<Tensor> = None;
        for (logits, labels) in self.logits(features)?.iter().zip(&labels) {
            let ce = mmkd_nn::fused::cross_entropy_rows(logits, labels)?.mean_all()?;
            loss = Some(match loss {
                Some(l) => (l + ce)?,
                None => ce,
            });
        }
        loss.context("no attribute head")
    }

    /// Per attribute, the percentage of `scenes`' patches classified right.
    fn accuracy(
        &self,
        encoder: &TowerEncoder,
        scenes: &Scenes,
        batch: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let mut right = vec![0usize; self.heads.len()];
        let mut total = 0usize;
        let all: Vec<usize> = (0..scenes.cells.len()).collect();
        for chunk in all.chunks(batch) {
            let refs: Vec<&ImageRef> = chunk.iter().map(|&i| &scenes.images[i]).collect();
            let cells: Vec<&SceneCells> = chunk.iter().map(|&i| &scenes.cells[i]).collect();
            let features = encoder
                .features(&encoder.pixels(&ImageRef::pairs(&refs))?)?
                .detach();
            let labels = self.labels(&cells)?;
            for (i, logits) in self.logits(&features)?.iter().enumerate() {
                let predicted = logits.argmax(D::Minus1)?;
                right[i] += predicted
                    .eq(&labels[i])?
                    .to_dtype(DType::U32)?
                    .sum_all()?
                    .to_scalar::<u32>()? as usize;
            }
            total += labels[0].elem_count();
        }
        Ok(self
            .heads
            .iter()
            .zip(right)
            .map(|((a, _), r)| {
                (
                    format!("{}_accuracy", a.name()),
                    100.0 * r as f64 / total.max(1) as f64,
                )
            })
            .collect())
    }
}

impl TowerTask for LabelsTask {
    fn train_len(&self) -> usize {
        self.train.cells.len()
    }

    fn image(&self, index: usize) -> &ImageRef {
        &self.train.images[index]
    }

    fn records(&self) -> (usize, BTreeMap<String, usize>) {
        (self.train.cells.len(), BTreeMap::new())
    }

    fn loss(&self, encoder: &TowerEncoder, batch: &[usize]) -> Result<MicroLoss> {
        let refs: Vec<&ImageRef> = batch.iter().map(|&i| &self.train.images[i]).collect();
        let cells: Vec<&SceneCells> = batch.iter().map(|&i| &self.train.cells[i]).collect();
        let features = encoder.features(&encoder.pixels(&ImageRef::pairs(&refs))?)?;
        let loss = self.batch_loss(&features, &cells)?;
        let value = loss.to_scalar::<f32>()?;
        let terms = TermValues(vec![("labels".into(), Some(value))]);
        Ok(MicroLoss::new(loss, value, terms))
    }

    fn validate(&self, encoder: &TowerEncoder, batch: usize) -> Result<BTreeMap<String, f64>> {
        match &self.val {
            Some(val) => self.accuracy(encoder, val, batch),
            None => Ok(BTreeMap::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tower::tests::{tiny_data, tiny_spec};
    use mmkd_nn::ParamStore;

    #[test]
    fn every_parameter_the_loss_reads_gets_a_gradient() {
        let dir = tempfile::tempdir().unwrap();
        tiny_data(dir.path());
        let spec = tiny_spec();
        let store = ParamStore::new();
        let pb = ParamBuilder::fresh(&store, 5, &Device::Cpu);
        let encoder = TowerEncoder::new(&pb, &spec).unwrap();
        let data = dir.path().join("train").join("scenes.jsonl");
        let task = LabelsTask::new(&pb, &encoder, &data, None, dir.path()).unwrap();
        let loss = task.loss(&encoder, &[0, 1, 2]).unwrap();
        let missing = mmkd_nn::grad_check::params_without_gradient(&store, &loss.total).unwrap();
        // LLaVA reads the last layer before post_layernorm (feature_layer -1), as transformers.
        assert_eq!(
            missing,
            vec![
                "vision_model.post_layernorm.bias (no gradient)".to_string(),
                "vision_model.post_layernorm.weight (no gradient)".to_string()
            ]
        );
    }
}
