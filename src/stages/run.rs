//! A stage run from start to finish: models, teacher signal, data, then the learner's step in
//! a loop with metrics, progress, atomic checkpoints and resume; the trained model and the
//! summary last.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Var;
use mmkd_datasets::{BatchSampler, SampleShape, SamplerConfig};
use mmkd_nn::ParamStore;
use serde::Serialize;

use super::batches::{StageBatches, StageMicroBatch};
use super::memory::{available_memory, BatchShape, MemoryEstimate};
use super::progress::step_bar;
use super::rollout::{micro_batch_seed, RolloutLog, Rollouts};
use super::setup::{
    lm_shape, load_student, objective_params, open_cache_manifest, optimizer_groups, plan_teacher,
    settings_digest, trainable_modules, TeacherPlan,
};
use super::shard::Shard;
use super::validate::{Validation, ValidationRecord};
use super::{StageRun, SUMMARY_FILE};
use crate::batch::{prepare_data, training_tokenize_config};
use crate::checkpoint::lock::OutputLock;
use crate::checkpoint::training::TrainingRecord;
use crate::checkpoint::{write_files_into, write_llava_files, SaveAssets};
use crate::config::Stage;
use crate::objective::{Binding, Objective, TermValues};
use crate::runtime::data_parallel::DataParallel;
use crate::runtime::parse_dtype;
use crate::runtime::world::world;
use crate::teacher::{teacher_rows, CachedSignal, TeacherSignal};
use crate::train::forward::objective_loss;
use crate::train::guard::{Spike, SpikeLimits};
use crate::train::interrupt::{InterruptGuard, Interruption};
use crate::train::metrics::{plot_losses, read_metrics, MetricsLog, RolloutCounts, StepMetrics};
use crate::train::state::{
    describe_last_checkpoint, explain_storage_fault, save_checkpoint_with, TrainerState,
    OBJECTIVE_FILE, OPTIMIZER_FILE,
};
use crate::train::step::{MicroLoss, NotFinite, TrainStep};
use crate::train::{AdamW, AdamWConfig, LrSchedule};

/// What a finished stage reports (also written to `OUT/summary.json`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StageSummary {
    pub stage: Stage,
    pub steps: usize,
    pub samples_seen: usize,
    pub wall_seconds: f64,
    pub samples_per_s: f64,
    pub first_loss: f32,
    pub final_loss: f32,
    /// Each objective term's value at the first and the last step, by logged name.
    pub first_terms: TermValues,
    pub final_terms: TermValues,
    pub data_records: usize,
    pub data_kept: usize,
    pub data_truncated: usize,
    /// Records not trained on, by reason.
    pub data_skipped: std::collections::BTreeMap<String, usize>,
    pub model_origin: String,
    pub parameters_trained: usize,
    /// What the rollouts of every step did (stages with `[rollout]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollouts: Option<RolloutCounts>,
    /// The last validation pass (`train.validate_every`), also in `validation.jsonl`.
    pub validation: Option<ValidationRecord>,
    /// The process's peak resident memory during the stage (Linux; since the stage started
    /// where the peak could be reset, else since the process did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    pub settings: serde_json::Value,
    /// Where each setting came from: `--set`, a preset table (role tables included), a default.
    pub settings_source: std::collections::BTreeMap<String, String>,
}

/// Runs one stage to completion (or resumes it) and writes the trained model to `run.out`.
/// A write refused by the storage (a full disk, a read-only OUT) says what was kept.
pub fn run_stage(run: &StageRun) -> Result<StageSummary> {
    train_stage(run).map_err(|e| explain_storage_fault(e, &run.out))
}

fn train_stage(run: &StageRun) -> Result<StageSummary> {
    let settings = &run.settings;
    let stage = settings.stage;
    let started = Instant::now();
    crate::bench::memory::reset_peak_rss();
    // In a data-parallel job rank 0 alone writes (checkpoints, metrics, progress, the model).
    let world = world();
    let leader = world.is_leader();
    let shard = Shard::of(world, settings.train.grad_accum);
    // One run per directory: held until the stage returns.
    let _lock = leader.then(|| OutputLock::acquire(&run.out)).transpose()?;
    let mut objective = Objective::new(&settings.objective, &settings.distill)
        .with_context(|| format!("the objective of `{}`", stage.name()))?;
    let cache_manifest = open_cache_manifest(run, &objective)?;
    let settings_digest = settings_digest(run, cache_manifest.as_ref(), world.size());
    world.agree(&settings_digest)?;
    let frozen_dtype = parse_dtype(&settings.train.frozen_dtype)?;
    let device = settings.train.device.open()?;
    let data_parallel = DataParallel::for_device(&device)?;

    let layout = shard.layout(settings.train.batch_size);
    let resume_from = run.output().resume_point(&settings_digest, Some(layout))?;

    // Models.
    let student = load_student(
        run,
        resume_from.as_ref().map(|(ckpt, _)| ckpt.as_path()),
        trainable_modules(settings),
        frozen_dtype,
        &device,
    )?;
    // Shared with the validation pass, which answers questions with it.
    let student = Arc::new(student);
    let plan = plan_teacher(run, &objective, &student, cache_manifest)?;
    let model = &student.model;

    // Data.
    let template = mmkd_datasets::Template::by_name_or_path(&settings.template())?;
    // A chat model continued with another chat template: say so (its answers were learnt in
    // the recorded one).
    if let Some(r) = student
        .training
        .as_ref()
        .filter(|r| r.chat && !stage.is_pretraining())
    {
        if r.template != template {
            eprintln!(
                "warning: `{}` trains with template {}, the model was trained with {} (recorded in \
                 its {})",
                stage.name(),
                settings.template(),
                r.template_name,
                crate::checkpoint::training::TRAINING_FILE
            );
        }
    }
    let data = prepare_data(
        &run.data,
        &run.images,
        &student.tokenizer,
        &template,
        &training_tokenize_config(model, settings.data.max_length),
        stage.name(),
    )?;
    let report = &data.report;
    let mut teacher = match plan {
        TeacherPlan::None => None,
        TeacherPlan::Online(mut t) => {
            // A teacher with another tokenizer reads its own tokenization of the same records.
            t.tokenize_data(
                &run.data,
                &run.images,
                &template,
                &data.samples,
                settings.data.max_length,
            )?;
            Some(TeacherSignal::Online(t))
        }
        TeacherPlan::Cached(dir, manifest) => Some(TeacherSignal::Cached(CachedSignal::open(
            &dir,
            &manifest,
            &student,
            settings,
            &objective,
            &run.data,
            &run.images,
            &template,
        )?)),
    };

    // The objective's own parameters (hidden-state projections, ...), and the teacher layers
    // it reads.
    let objective_store = ParamStore::new();
    let objective_params = objective_params(
        &objective_store,
        resume_from.as_ref().map(|(ckpt, _)| ckpt.as_path()),
        settings.train.seed,
        &device,
    )?;
    let binding = Binding {
        student: lm_shape(&model.config.text_config),
        teacher: teacher
            .as_ref()
            .and_then(TeacherSignal::online_text_config)
            .map(lm_shape),
        params: objective_params,
        shared_vocab: teacher.as_ref().and_then(TeacherSignal::shared_vocab),
    };
    objective.bind(&binding)?;
    objective.chunk_loss(settings.train.loss_chunk_rows_on(&device));
    if let Some(TeacherSignal::Online(t)) = &mut teacher {
        t.layers = objective.layers().1;
        // Rollouts score the teacher's logits.
        t.hidden_only = objective.loss_chunk_rows().is_some() && settings.train.rollout.is_none();
    }
    if objective.needs_rollouts() && settings.train.rollout.is_none() {
        bail!(
            "the objective of `{}` reads the student's sampled answers (MiniLLM's terms), but \
             the stage samples none: add a `[stages.{}.rollout]` table (or run `mmkd minillm`)",
            stage.name(),
            stage.name()
        );
    }
    let rollouts = match &settings.train.rollout {
        Some(plan) => {
            check_rollout_teacher(teacher.as_ref(), stage)?;
            Some(Rollouts::new(
                plan.clone(),
                settings.train.seed,
                &student,
                &template,
            )?)
        }
        None => None,
    };

    // Refuse a run that cannot fit before it starts.
    let estimate = MemoryEstimate::of(
        model,
        match &teacher {
            Some(TeacherSignal::Online(t)) => Some(&t.model.model),
            _ => None,
        },
        BatchShape {
            batch: settings.train.batch_size,
            seq: data
                .samples
                .iter()
                .map(|s| s.input_ids.len())
                .max()
                .unwrap_or(1),
            parallel: settings
                .train
                .parallel_micro_batches
                .clamp(1, settings.train.grad_accum),
        },
    );
    if run.progress && leader {
        eprintln!("memory: {}", estimate.describe());
        if let Some(dp) = &data_parallel {
            eprintln!("data-parallel: {layout}, gradients over {}", dp.backend());
        }
    }
    if let Some(available) = available_memory() {
        estimate.check(available)?;
    }

    let validation = if !leader {
        None
    } else {
        Validation::prepare(
            settings,
            &student,
            &template,
            &run.images,
            (binding.teacher.is_some()
                && !teacher
                    .as_ref()
                    .is_some_and(TeacherSignal::reads_own_tokens))
            .then_some(&binding),
            &run.out,
        )?
    };
    let mut last_validation = None;

    let mut sampler_cfg = SamplerConfig::new(settings.train.batch_size, settings.train.seed);
    sampler_cfg.group_by_modality_length = settings.train.group_by_modality_length;
    let cursor = resume_from
        .as_ref()
        .map(|(_, s)| s.cursor)
        .unwrap_or_default();
    let mut sampler = BatchSampler::new(SampleShape::of(&data.samples), sampler_cfg, cursor)?;
    let accum_steps = settings.train.grad_accum;
    let total_steps = match settings.train.max_steps {
        Some(n) => n,
        None => (settings.train.epochs * sampler.batches_per_epoch())
            .div_ceil(shard.global_micro_batches())
            .max(1),
    };

    // Optimisation.
    let mut vars = model.store.trainable_vars();
    vars.extend(objective_store.trainable_vars());
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWConfig {
            weight_decay: settings.train.weight_decay,
            groups: optimizer_groups(settings, &vars),
            ..Default::default()
        },
    )?;
    let (start_step, mut samples_seen) = match &resume_from {
        Some((ckpt, state)) => {
            optimizer.load(&ckpt.join(OPTIMIZER_FILE))?;
            (state.step, state.samples_seen)
        }
        None => (0, 0),
    };
    let mut learner = TrainStep::new(vars.clone(), optimizer, settings.train.max_grad_norm)
        .with_spike_guard(SpikeLimits {
            loss: settings.train.max_loss_spike,
            grad_norm: settings.train.max_grad_norm_spike,
        });
    if let Some(dp) = data_parallel {
        learner = learner.with_sync(Box::new(dp));
    }
    let schedule = LrSchedule::new(&settings.train.schedule, settings.train.lr, total_steps)?;
    let resumed_step = resume_from.as_ref().map(|(_, s)| s.step);
    if leader {
        run.output().claim()?;
    }
    // No rank reads OUT's checkpoints any more, and nothing is written before this.
    world.barrier("the barrier after claiming the output directory")?;
    if let Some(v) = &validation {
        v.truncate_log(resumed_step)?;
    }
    let mut log = leader
        .then(|| MetricsLog::open(&run.out.join("metrics.jsonl"), resumed_step))
        .transpose()?;
    let mut rollout_log = rollouts
        .as_ref()
        .filter(|_| leader)
        .map(|_| RolloutLog::open(&run.out, resumed_step))
        .transpose()?;
    let record = TrainingRecord {
        stage: stage.name().into(),
        chat: !stage.is_pretraining(),
        template_name: settings.template(),
        template: template.clone(),
        max_length: settings.data.max_length,
    };
    let assets = SaveAssets {
        tokenizer_dir: Some(&student.dir),
        tokenizer: Some(&student.tokenizer),
        processor: Some(&student.processor),
        training: Some(&record),
    };

    let bar = step_bar(total_steps, stage.name(), run.progress && leader);
    let interrupt = InterruptGuard::install();
    bar.set_position(start_step as u64);

    let parallel = settings.train.parallel_micro_batches.clamp(1, accum_steps);
    let mut batches = StageBatches {
        samples: &data.samples,
        student: &student,
        teacher: teacher.as_ref(),
        look_ahead: teacher.as_ref().is_some_and(TeacherSignal::is_online)
            || !model.trainable().vision,
        parallel,
        rollouts: rollouts.as_ref(),
        keeps_data_answers: objective.needs_data_answers(),
        needs_policy: objective.needs_rollouts(),
        step_index: start_step,
        rolled: RolloutCounts::default(),
        rolled_records: Vec::new(),
        step: Vec::new(),
        next_step: Vec::new(),
        ahead: Vec::new(),
    };
    // The student's forward and objective on one micro-batch.
    let current_step = AtomicUsize::new(start_step);
    let loss_of = |mb: &StageMicroBatch| -> Result<MicroLoss> {
        let cached = match &teacher {
            Some(TeacherSignal::Cached(c)) => Some(c.rows(&mb.inputs, &data.samples)?),
            _ => None,
        };
        let rows = teacher_rows(teacher.as_ref(), mb.teacher_out.as_ref(), cached.as_ref())?;
        let forward = || objective_loss(model, mb.student_batch(), rows, &objective);
        // LoRA dropout: masks drawn from the step and the micro-batch's samples.
        let seed = dropout_seed(
            settings.train.seed,
            current_step.load(Ordering::Relaxed),
            &mb.inputs.collated.sample_indices,
        );
        mmkd_nn::lora::with_dropout(seed, forward)
    };
    for step in start_step..total_steps {
        current_step.store(step, Ordering::Relaxed);
        batches.step_index = step;
        let step_started = Instant::now();
        batches.step = shard.next_step(&mut sampler);
        batches.next_step = if step + 1 < total_steps {
            shard.peek(&sampler, parallel)
        } else {
            Vec::new()
        };
        let lr = schedule.lr(step);
        let report = learner.run(&mut batches, lr, &loss_of).or_else(|e| {
            let ids: Vec<String> = batches
                .step
                .iter()
                .flatten()
                .map(|&i| data.samples[i].id.clone())
                .collect();
            stop_with_context(e, step, &ids, &run.out)
        })?;
        samples_seen += report.samples;
        let step_rollouts = rollouts
            .as_ref()
            .map(|_| std::mem::take(&mut batches.rolled));
        if let Some(log) = &mut rollout_log {
            log.append(&std::mem::take(&mut batches.rolled_records))?;
        }

        let metrics = StepMetrics {
            step: step + 1,
            epoch: sampler.cursor().epoch,
            loss: report.loss,
            terms: report.terms,
            grad_norm: report.grad_norm,
            lr,
            samples_per_s: report.samples as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
            samples: samples_seen,
            rollouts: step_rollouts,
        };
        if let Some(log) = &mut log {
            log.append(&metrics)?;
        }
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.1} samples/s",
            metrics.loss, lr, metrics.samples_per_s
        ));
        bar.inc(1);

        let done = step + 1;
        if let Some(v) = validation.as_ref().filter(|v| v.due(done, total_steps)) {
            let record = v.run(done, &student, teacher.as_ref())?;
            bar.println(describe_validation(&record));
            last_validation = Some(record);
        }
        // A signal stops the run after this step, with a checkpoint to resume from (a signal
        // to any rank stops the whole job at the same step).
        let mut interrupted = interrupt.requested(done).filter(|_| done < total_steps);
        if world.size() > 1
            && done < total_steps
            && world.any(interrupted.is_some(), "the interrupt check")?
        {
            interrupted = interrupted.or(Some(Interruption { signal: 0 }));
        }
        let due = settings.train.save_every > 0 && done % settings.train.save_every == 0;
        if !leader {
            if let Some(stop) = interrupted {
                // The job stops once rank 0's checkpoint is in place.
                world.barrier("the checkpoint of the interrupted job")?;
                bail!(
                    "`{}` interrupted by {} after step {done} of {total_steps}: rank 0 wrote \
                     the checkpoint",
                    stage.name(),
                    stop.name()
                );
            }
        } else if (due || interrupted.is_some()) && done < total_steps {
            // Never checkpoint weights an overflowing update has already ruined.
            ensure_finite_params(&vars, step, &run.out)?;
            let state = TrainerState {
                stage: stage.name().into(),
                step: done,
                total_steps,
                cursor: sampler.cursor(),
                samples_seen,
                settings_digest: settings_digest.clone(),
                layout: Some(layout),
            };
            let dir = save_checkpoint_with(
                &run.out,
                |dir| {
                    write_llava_files(model, dir, assets)?;
                    let params = objective_store.tensors();
                    if !params.is_empty() {
                        mmkd_nn::weights::save_safetensors(&params, &dir.join(OBJECTIVE_FILE))?;
                    }
                    Ok(())
                },
                learner.optimizer(),
                &state,
                settings.train.keep_last,
            )?;
            if let Some(stop) = interrupted {
                bar.finish_and_clear();
                world.barrier("the checkpoint of the interrupted job")?;
                bail!(
                    "`{}` interrupted by {} after step {done} of {total_steps}: its checkpoint is \
                     {}; continue with the same command and --resume",
                    stage.name(),
                    stop.name(),
                    dir.display()
                );
            }
        }
    }
    bar.finish_and_clear();

    // The final model goes into OUT itself; the summary, written last, marks the stage as
    // finished.
    if leader {
        match super::lora::plan(settings) {
            Some(plan) => {
                let base = super::lora::adapter_base(run)?;
                write_files_into(&run.out, |dir| {
                    super::lora::write_adapter_files(model, dir, assets, &base, &plan)
                })?
            }
            None => write_files_into(&run.out, |dir| write_llava_files(model, dir, assets))?,
        }
    }
    // The other ranks read the metrics rank 0 logged once it has written them.
    world.barrier("the barrier at the end of the stage")?;
    let all_metrics = read_metrics(&run.out.join("metrics.jsonl"))?;
    if leader {
        plot_losses(&all_metrics, &run.out.join("loss.png"))?;
    }
    let wall = started.elapsed().as_secs_f64();
    let summary = StageSummary {
        stage,
        steps: total_steps,
        samples_seen,
        wall_seconds: wall,
        samples_per_s: median(all_metrics.iter().map(|m| m.samples_per_s).collect()),
        first_loss: all_metrics.first().map(|m| m.loss).unwrap_or(f32::NAN),
        final_loss: all_metrics.last().map(|m| m.loss).unwrap_or(f32::NAN),
        first_terms: all_metrics
            .first()
            .map(|m| m.terms.clone())
            .unwrap_or_default(),
        final_terms: all_metrics
            .last()
            .map(|m| m.terms.clone())
            .unwrap_or_default(),
        data_records: report.records,
        data_kept: report.kept,
        data_truncated: report.truncated,
        data_skipped: report
            .skipped_by_kind()
            .into_iter()
            .map(|(k, n)| (format!("{k:?}"), n))
            .collect(),
        rollouts: rollouts.as_ref().map(|_| {
            let mut total = RolloutCounts::default();
            for m in &all_metrics {
                total += m.rollouts.unwrap_or_default();
            }
            total
        }),
        model_origin: student.origin.clone(),
        parameters_trained: model.store.count_trainable(),
        validation: last_validation,
        peak_rss_bytes: crate::bench::memory::peak_rss_bytes().ok(),
        settings: settings.as_json(),
        settings_source: settings.sources.clone(),
    };
    if leader {
        std::fs::write(
            run.out.join(SUMMARY_FILE),
            serde_json::to_string_pretty(&summary)?,
        )?;
    }
    Ok(summary)
}

/// The seed of a micro-batch's dropout masks: its step and samples, so it is the same however
/// micro-batches are scheduled and after a resume.
fn dropout_seed(seed: u64, step: usize, samples: &[usize]) -> u64 {
    micro_batch_seed(seed, step, samples, b"")
}

/// Rollouts are scored by an online teacher of the student's tokenizer: a cache holds only
/// the data's answers, and another tokenizer's teacher reads its own tokens of the data.
fn check_rollout_teacher(teacher: Option<&TeacherSignal>, stage: Stage) -> Result<()> {
    match teacher {
        Some(TeacherSignal::Online(t)) if t.own_tokens.is_none() => Ok(()),
        Some(TeacherSignal::Online(_)) => bail!(
            "`{}` trains on generated answers (`[rollout]`), which the teacher must read in the \
             student's tokens: this teacher has another tokenizer",
            stage.name()
        ),
        Some(TeacherSignal::Cached(_)) => bail!(
            "`{}` trains on generated answers (`[rollout]`), which a teacher cache cannot score \
             (it holds the data's answers only): give the teacher checkpoint with --teacher",
            stage.name()
        ),
        None => bail!(
            "`{}` trains on generated answers (`[rollout]`) scored by a teacher: give one with \
             --teacher",
            stage.name()
        ),
    }
}

/// One line for the progress output.
fn describe_validation(r: &ValidationRecord) -> String {
    let mut parts = vec![format!("validation at step {}:", r.step)];
    if let Some(loss) = r.loss {
        parts.push(format!("held-out loss {loss:.4} ({} samples)", r.samples));
    }
    if let Some(acc) = r.vqa_accuracy {
        parts.push(format!("VQA {acc:.2} % ({} questions)", r.vqa_questions));
    }
    parts.join(" ")
}

/// A step that fails stops the run: a loss or gradient that is not a finite number, or a
/// spike, names the step, its samples and the last good checkpoint; any other error gets the
/// step and samples as context.
fn stop_with_context<T>(err: anyhow::Error, step: usize, ids: &[String], out: &Path) -> Result<T> {
    if let Some(nf) = err.downcast_ref::<NotFinite>() {
        let ids = if nf.sample_ids.is_empty() {
            ids
        } else {
            &nf.sample_ids
        };
        finite_or_stop(nf.value, &nf.what, step, ids, out)?;
        return Err(err);
    }
    if let Some(spike) = err.downcast_ref::<Spike>() {
        bail!(
            "{spike} at step {} (samples {}): stopped before its update; {}. Lower the learning \
             rate, check these samples, or raise train.max_loss_spike / train.max_grad_norm_spike",
            step + 1,
            ids.join(", "),
            describe_last_checkpoint(out)?
        );
    }
    Err(err.context(format!("step {} (samples {})", step + 1, ids.join(", "))))
}

fn finite_or_stop(value: f64, what: &str, step: usize, ids: &[String], out: &Path) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    let last = describe_last_checkpoint(out)?;
    bail!(
        "{what} is {value} at step {} (samples {}): stopping; {last}. Lower the learning rate or check the data",
        step + 1,
        ids.join(", ")
    )
}

fn ensure_finite_params(vars: &[(String, Var)], step: usize, out: &Path) -> Result<()> {
    for (name, var) in vars {
        let sum = var
            .as_tensor()
            .abs()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            finite_or_stop(sum, &format!("parameter `{name}`"), step, &[], out)?;
        }
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
