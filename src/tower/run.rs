//! The tower stage from start to finish: the tower and its objective built (or resumed), the
//! learner's step over shuffled batches with metrics, progress and atomic checkpoints, then the
//! held-out figures, the rescaling and the standalone checkpoint; the summary last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use mmkd_nn::rng::SeededRng;
use mmkd_nn::{ParamBuilder, ParamStore, WeightSource};
use serde::{Deserialize, Serialize};

use super::contrastive::ContrastiveTask;
use super::encoder::{ImageRef, TowerEncoder};
use super::export::{feature_rms, write_tower};
use super::labels::LabelsTask;
use super::TowerTask;
use crate::checkpoint::lock::OutputLock;
use crate::checkpoint::write_files_into;
use crate::config::tower::{TowerObjective, TowerSettings};
use crate::config::ModelSpec;
use crate::stages::output::OutputDir;
use crate::stages::progress::step_bar;
use crate::stages::SUMMARY_FILE;
use crate::train::interrupt::InterruptGuard;
use crate::train::metrics::{plot_losses, read_metrics, MetricsLog, StepMetrics};
use crate::train::state::{
    digest, explain_storage_fault, save_checkpoint_with, TrainerState, OPTIMIZER_FILE,
};
use crate::train::step::{MicroBatch, OneMicroBatch, TrainStep};
use crate::train::{AdamW, AdamWConfig};

/// Every parameter of the stage (tower, heads or text side), unscaled, in a checkpoint.
const PARAMETERS_FILE: &str = "parameters.safetensors";

/// The tower's features are measured on at most this many training images for the rescaling.
const RMS_SAMPLE: usize = 512;

/// One tower stage as the CLI (or the demo) asks for it.
#[derive(Clone, Debug)]
pub struct TowerRun {
    pub settings: TowerSettings,
    /// The model whose tower is trained: its `vision_config`, image statistics, the layer LLaVA
    /// reads and the seed of the initial weights.
    pub model: ModelSpec,
    /// `scenes.jsonl` (labels) or LLaVA JSON/JSONL with captions (contrastive).
    pub data: PathBuf,
    /// The root the data's image paths are relative to.
    pub images: PathBuf,
    /// Held-out data of the same kind: accuracy (labels) or loss and retrieval (contrastive).
    pub val_data: Option<PathBuf>,
    /// The text encoder's tokenizer (contrastive).
    pub tokenizer: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub force: bool,
    pub progress: bool,
}

/// What a finished tower stage reports (also `OUT/summary.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TowerSummary {
    pub objective: TowerObjective,
    pub steps: usize,
    pub samples_seen: usize,
    pub first_loss: f32,
    pub final_loss: f32,
    /// Mean loss of each epoch's steps.
    pub epoch_losses: Vec<f64>,
    /// Held-out figures: per-attribute patch accuracy (labels), or loss and image→text top-1
    /// within a batch against chance (contrastive); percentages 0–100.
    pub validation: BTreeMap<String, f64>,
    pub data_records: usize,
    pub data_kept: usize,
    /// Records not trained on (and captions cut), by reason.
    pub data_skipped: BTreeMap<String, usize>,
    /// RMS of the selected features before the rescaling, and the factor applied.
    pub feature_rms_trained: f64,
    pub scale: f64,
    pub wall_seconds: f64,
    pub settings: serde_json::Value,
    pub model: serde_json::Value,
}

/// A batch of training examples by index (their ids are looked up only for an error message).
struct IndexBatch<'a> {
    indices: Vec<usize>,
    task: &'a dyn TowerTask,
}

impl MicroBatch for IndexBatch<'_> {
    fn samples(&self) -> usize {
        self.indices.len()
    }

    fn sample_ids(&self) -> Vec<String> {
        self.indices
            .iter()
            .map(|&i| self.task.image(i).id.clone())
            .collect()
    }
}

/// The digest a checkpoint records so that a resume with other settings is refused (how
/// often checkpoints are written changes no number).
fn settings_digest(run: &TowerRun) -> String {
    let mut settings = run.settings.as_json();
    if let Some(table) = settings.as_object_mut() {
        table.remove("save_every");
        table.remove("keep_last");
    }
    digest(&serde_json::json!({
        "settings": settings, "model": run.model, "data": run.data, "images": run.images,
        "tokenizer": run.tokenizer,
    }))
}

fn build_task(
    run: &TowerRun,
    pb: &ParamBuilder,
    encoder: &TowerEncoder,
) -> Result<Box<dyn TowerTask>> {
    let val = run.val_data.as_deref();
    Ok(match run.settings.objective {
        TowerObjective::Labels => {
            Box::new(LabelsTask::new(pb, encoder, &run.data, val, &run.images)?)
        }
        TowerObjective::Contrastive => {
            let path = run.tokenizer.as_ref().context(
                "the contrastive objective's text encoder needs a tokenizer: pass --tokenizer \
                 FILE (or set data.tokenizer)",
            )?;
            let tokenizer = mmkd_datasets::load_tokenizer(path)?;
            Box::new(ContrastiveTask::new(
                pb,
                encoder,
                &run.settings,
                &tokenizer,
                &run.data,
                val,
                &run.images,
            )?)
        }
    })
}

/// Trains the tower (or resumes it) and writes it, rescaled, to `run.out` with `metrics.jsonl`,
/// `loss.png` and `summary.json`.
/// A write refused by the storage (a full disk, a read-only OUT) says what was kept.
pub fn run_tower(run: &TowerRun) -> Result<TowerSummary> {
    train_tower(run).map_err(|e| explain_storage_fault(e, &run.out))
}

fn train_tower(run: &TowerRun) -> Result<TowerSummary> {
    let settings = &run.settings;
    let started = Instant::now();
    // One run per directory: held until the stage returns.
    let _lock = OutputLock::acquire(&run.out)?;
    let output = OutputDir {
        path: &run.out,
        resume: run.resume,
        force: run.force,
    };
    let digest = settings_digest(run);
    let resume_from = output.resume_point(&digest, None)?;

    // The tower and its objective's parameters: fresh from the model's seed, or resumed.
    let store = ParamStore::new();
    let pb = match &resume_from {
        Some((ckpt, _)) => {
            let source = WeightSource::from_file(&ckpt.join(PARAMETERS_FILE), &Device::Cpu)?;
            ParamBuilder::new(&store, Arc::new(source), 0, &Device::Cpu).strict(true)
        }
        None => ParamBuilder::fresh(&store, run.model.seed, &Device::Cpu),
    };
    let encoder = TowerEncoder::new(&pb, &run.model)?;
    let task = build_task(run, &pb, &encoder)?;
    let examples = task.train_len();
    let (records, skipped) = task.records();

    let vars = store.trainable_vars();
    let mut optimizer = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let (start_step, mut samples_seen) = match &resume_from {
        Some((ckpt, state)) => {
            optimizer.load(&ckpt.join(OPTIMIZER_FILE))?;
            (state.step, state.samples_seen)
        }
        None => (0, 0),
    };
    // No clipping: the stage's update is plain AdamW on the batch's gradient.
    let mut learner = TrainStep::new(vars, optimizer, 0.0);
    output.claim()?;
    let mut log = MetricsLog::open(
        &run.out.join("metrics.jsonl"),
        resume_from.as_ref().map(|(_, s)| s.step),
    )?;

    let batch_size = settings.batch_size;
    let batches_per_epoch = examples.div_ceil(batch_size);
    let total_steps = settings
        .max_steps
        .unwrap_or(settings.epochs * batches_per_epoch);
    let loss_of = |b: &IndexBatch| task.loss(&encoder, &b.indices);
    let bar = step_bar(total_steps, "tower", run.progress);
    bar.set_position(start_step as u64);
    let interrupt = InterruptGuard::install();
    // Each epoch shuffles the previous epoch's order: replayed from the seed on resume.
    let mut rng = SeededRng::new(settings.seed);
    let mut order: Vec<usize> = (0..examples).collect();
    let mut epochs_drawn = 0;
    for step in start_step..total_steps {
        let step_started = Instant::now();
        let (epoch, batch) = (step / batches_per_epoch, step % batches_per_epoch);
        while epochs_drawn <= epoch {
            rng.shuffle(&mut order);
            epochs_drawn += 1;
        }
        let indices = order[batch * batch_size..((batch + 1) * batch_size).min(examples)].to_vec();
        let mut micro = OneMicroBatch(Some(IndexBatch {
            indices,
            task: task.as_ref(),
        }));
        let report = learner
            .run(&mut micro, settings.lr, &loss_of)
            .context("tower pre-training")?;
        samples_seen += report.samples;
        log.append(&StepMetrics {
            step: step + 1,
            epoch: epoch as u64,
            loss: report.loss,
            terms: report.terms,
            grad_norm: report.grad_norm,
            lr: settings.lr,
            samples_per_s: report.samples as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            samples: samples_seen,
            rollouts: None,
        })?;
        bar.inc(1);
        bar.set_message(format!("loss {:.4}", report.loss));

        let done = step + 1;
        // A signal stops the run after this step, with a checkpoint to resume from.
        let interrupted = interrupt.requested(done).filter(|_| done < total_steps);
        let due = settings.save_every > 0 && done % settings.save_every == 0;
        if (due || interrupted.is_some()) && done < total_steps {
            let state = TrainerState {
                stage: "tower".into(),
                step: done,
                total_steps,
                cursor: Default::default(),
                samples_seen,
                settings_digest: digest.clone(),
                layout: None,
            };
            let write = |dir: &Path| {
                let path = dir.join(PARAMETERS_FILE);
                Ok(mmkd_nn::weights::save_safetensors(&store.tensors(), &path)?)
            };
            let dir = save_checkpoint_with(
                &run.out,
                write,
                learner.optimizer(),
                &state,
                settings.keep_last,
            )?;
            if let Some(stop) = interrupted {
                bar.finish_and_clear();
                anyhow::bail!(
                    "`tower` interrupted by {} after step {done} of {total_steps}: its checkpoint \
                     is {}; continue with the same command and --resume",
                    stop.name(),
                    dir.display()
                );
            }
        }
    }
    bar.finish_and_clear();

    let validation = task.validate(&encoder, batch_size)?;
    let sample: Vec<&ImageRef> = (0..examples.min(RMS_SAMPLE))
        .map(|i| task.image(i))
        .collect();
    let rms = feature_rms(&encoder, &sample, batch_size)?;
    ensure!(
        rms.is_finite() && rms > 0.0,
        "the trained tower's features have RMS {rms}"
    );
    let scale = settings.feature_rms / rms;

    // The tower goes into OUT itself; the summary, written last, marks the stage as finished.
    write_files_into(&run.out, |dir| write_tower(&encoder, &store, scale, dir))?;
    let metrics = read_metrics(&run.out.join("metrics.jsonl"))?;
    plot_losses(&metrics, &run.out.join("loss.png"))?;
    let summary = TowerSummary {
        objective: settings.objective,
        steps: total_steps,
        samples_seen,
        first_loss: metrics.first().map_or(f32::NAN, |m| m.loss),
        final_loss: metrics.last().map_or(f32::NAN, |m| m.loss),
        epoch_losses: epoch_means(&metrics),
        validation,
        data_records: records,
        data_kept: examples,
        data_skipped: skipped,
        feature_rms_trained: rms,
        scale,
        wall_seconds: started.elapsed().as_secs_f64(),
        settings: settings.as_json(),
        model: serde_json::to_value(&run.model)?,
    };
    std::fs::write(
        run.out.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// The mean loss of each epoch's steps, in epoch order.
fn epoch_means(metrics: &[StepMetrics]) -> Vec<f64> {
    let mut sums: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for m in metrics {
        let entry = sums.entry(m.epoch).or_default();
        entry.0 += m.loss as f64;
        entry.1 += 1;
    }
    sums.values().map(|(s, n)| s / *n as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tower::tests::{max_abs_diff, tiny_data, tiny_spec};
    use candle_core::{DType, Tensor};

    fn labels_run(data: &Path, out: &Path) -> TowerRun {
        let settings = TowerSettings {
            objective: TowerObjective::Labels,
            epochs: 4,
            lr: 3e-3,
            batch_size: 16,
            seed: 7,
            ..TowerSettings::default()
        };
        TowerRun {
            settings,
            model: tiny_spec(),
            data: data.join("train").join("scenes.jsonl"),
            images: data.to_path_buf(),
            val_data: Some(data.join("val").join("scenes.jsonl")),
            tokenizer: None,
            out: out.to_path_buf(),
            resume: false,
            force: false,
            progress: false,
        }
    }

    fn weights(dir: &Path) -> BTreeMap<String, Tensor> {
        let source = WeightSource::from_file(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
        source
            .names()
            .map(|n| (n.to_string(), source.get(n).unwrap().clone()))
            .collect()
    }

    #[test]
    fn pretraining_learns_and_writes_a_rescaled_tower_the_teacher_composes() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        tiny_data(&data);
        let out = dir.path().join("tower");
        let summary = run_tower(&labels_run(&data, &out)).unwrap();
        assert!(crate::stages::stage_finished(&out));
        assert_eq!(summary.steps, 4 * 4);
        let losses = &summary.epoch_losses;
        assert_eq!(losses.len(), 4);
        assert!(
            losses[3] < 0.8 * losses[0],
            "the loss should fall over 4 epochs: {losses:?}"
        );
        assert_eq!(
            summary.validation.keys().collect::<Vec<_>>(),
            ["color_accuracy", "shape_accuracy", "size_accuracy"]
        );
        assert_eq!(read_metrics(&out.join("metrics.jsonl")).unwrap().len(), 16);

        // The checkpoint is a standalone SigLIP tower: a teacher composes it with a fresh LLM,
        // and its features have the RMS asked for.
        let mut teacher = tiny_spec();
        teacher.vision = Some(out.display().to_string());
        let prepared = crate::stages::init::from_spec(
            &teacher,
            Some(&data.join("tokenizer.json")),
            crate::models::llava::Trainable::PROJECTOR_AND_LLM,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let saved = weights(&out);
        let name = "vision_model.embeddings.patch_embedding.weight";
        let in_model = prepared
            .model
            .store
            .get(&format!("model.vision_tower.{name}"))
            .unwrap();
        let diff = max_abs_diff(&in_model.tensor, &saved[name]);
        assert_eq!(diff, 0.0, "the teacher's tower is the saved one");
        let scenes =
            mmkd_datasets::read_scene_cells(&data.join("train").join("scenes.jsonl")).unwrap();
        let paths: Vec<PathBuf> = scenes.iter().map(|s| data.join(&s.image)).collect();
        let arrays: Vec<_> = paths
            .iter()
            .map(|p| prepared.processor.preprocess_file(p).unwrap())
            .collect();
        let pixels = mmkd_vision::to_tensor(&arrays, &Device::Cpu).unwrap();
        let features = prepared.model.tower_features(&pixels).unwrap();
        let rms = features
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((rms - 1.0).abs() < 0.05, "feature RMS {rms}");

        // A finished tower is not overwritten by accident.
        let err = run_tower(&labels_run(&data, &out)).unwrap_err().to_string();
        assert!(
            err.contains("holds a finished stage") && err.contains("--force"),
            "{err}"
        );
    }

    #[test]
    fn a_killed_run_resumes_to_the_same_tower_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        tiny_data(&data);
        let mut run = labels_run(&data, &dir.path().join("whole"));
        run.settings.max_steps = Some(5);
        run.settings.save_every = 2;
        let whole = run_tower(&run).unwrap();
        // The same run killed after its checkpoint at step 4: only the checkpoints survive.
        let killed = dir.path().join("killed");
        std::fs::create_dir_all(&killed).unwrap();
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(run.out.join("checkpoints"))
            .arg(&killed)
            .status()
            .unwrap();
        assert!(status.success());
        run.out = killed.clone();
        let err = run_tower(&run).unwrap_err().to_string();
        assert!(err.contains("--resume"), "{err}");
        run.resume = true;
        let resumed = run_tower(&run).unwrap();
        assert_eq!(resumed.steps, 5);
        assert_eq!(resumed.final_loss, whole.final_loss);
        let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
        assert!(bytes(&killed) == bytes(&dir.path().join("whole")));
        // Other settings do not resume.
        run.settings.lr = 1e-2;
        std::fs::remove_file(killed.join(SUMMARY_FILE)).unwrap();
        let err = run_tower(&run).unwrap_err().to_string();
        assert!(err.contains("other settings"), "{err}");
    }
}
