//! `mmkd bench`: times the LLaVA-KD distilled fine-tuning step described by a benchmark spec
//! (`shared/bench/spec.json`) with random weights and data, for comparison with the PyTorch peer
//! (`torch_dft_step.py`) on the same machine. See `docs/performance.md`.
//!
//! - [`spec`]: the spec file and the LLaVA configs it stands for.
//! - [`data`]: the seeded random batch.
//! - [`step`]: the step itself, timed by phase.
//! - [`flops`]: the step's analytic FLOP count.
//! - [`report`]: medians, samples/s, GFLOP/s, peak memory.
//! - [`memory`], [`cpu_time`], [`matmul_peak`]: peak RSS, process CPU time and a matmul
//!   throughput ceiling.

pub mod cpu_time;
pub mod data;
pub mod flops;
pub mod matmul_peak;
pub mod memory;
pub mod report;
pub mod spec;
pub mod step;

use crate::runtime::DeviceSpec;
use anyhow::{ensure, Context, Result};

pub use flops::StepFlops;
pub use report::BenchReport;
pub use spec::BenchSpec;
pub use step::{DftStep, StepOutcome, StepTimes};

/// How a benchmark run is carried out.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Timed steps (the report gives their median).
    pub steps: usize,
    /// Untimed steps first (allocator and thread-pool warm-up).
    pub warmup: usize,
    pub seed: u64,
    /// Side of the square matmul used for the peak measurement; `None` skips it.
    pub matmul_peak_size: Option<usize>,
    /// Run the frozen teacher's forward for the next batch alongside the student's update
    /// (what the distillation stages do); `false` runs the phases one after another.
    pub teacher_overlap: bool,
    /// Row ranges of the batch whose student forward and backward run concurrently, their
    /// gradients averaged (1: the whole batch at once).
    pub student_shards: usize,
    /// Train the student's LLM through adapters of this rank instead of fully.
    pub lora_rank: Option<usize>,
    /// Where the models run (`--device`).
    pub device: DeviceSpec,
    /// Logit rows the loss computes at once (`train.loss_chunk_rows`: `Some(0)` all at once,
    /// `None` the device's default).
    pub loss_chunk_rows: Option<usize>,
}

impl Default for BenchOptions {
    /// The peer's defaults: 6 timed steps after 1 warm-up step.
    fn default() -> Self {
        Self {
            steps: 6,
            warmup: 1,
            seed: 0,
            matmul_peak_size: Some(1024),
            teacher_overlap: true,
            student_shards: 1,
            lora_rank: None,
            device: DeviceSpec::Cpu,
            loss_chunk_rows: None,
        }
    }
}

/// Runs `warmup + steps` steps, calling `on_step` after each, and summarises the timed ones.
pub fn run(
    spec: &BenchSpec,
    options: &BenchOptions,
    mut on_step: impl FnMut(usize, &StepOutcome),
) -> Result<BenchReport> {
    ensure!(options.steps > 0, "`--steps` must be at least 1");
    let device = options.device.open()?;
    let mut step = DftStep::on_device(spec, options.seed, options.lora_rank, &device)?;
    step.chunk_loss(crate::config::settings::loss_chunk_rows_on(
        options.loss_chunk_rows,
        &device,
    ));
    // Under mpirun: this rank's rows of the spec's batch, gradients all-reduced.
    let reduced_bytes = step.join_data_parallel()?;
    step.set_teacher_overlap(options.teacher_overlap);
    step.set_student_shards(options.student_shards)?;
    // The steps' own peak, apart from building the models (which may peak higher).
    let build_peak = memory::peak_rss_bytes()?;
    let steps_peak_known = memory::reset_peak_rss();
    let mut timed = Vec::with_capacity(options.steps);
    let mut cpu_start = 0.0;
    for i in 0..options.warmup + options.steps {
        if i == options.warmup {
            cpu_start = cpu_time::process_cpu_seconds()?;
        }
        let outcome = step.run().with_context(|| format!("benchmark step {i}"))?;
        on_step(i, &outcome);
        if i >= options.warmup {
            timed.push(outcome);
        }
    }
    let cpu_per_step = (cpu_time::process_cpu_seconds()? - cpu_start) / options.steps as f64;
    // Peak memory of the training steps, before the matmul measurement allocates its own.
    let steps_peak = memory::peak_rss_bytes()?;
    let peak = build_peak.max(steps_peak);
    let matmul_peak = options
        .matmul_peak_size
        .map(|n| matmul_peak::matmul_peak_gflops(n, 10))
        .transpose()?;
    let mut report = BenchReport::new(
        spec,
        options.warmup,
        &timed,
        cpu_per_step,
        peak,
        matmul_peak,
        None,
    )?;
    report.teacher_overlap = options.teacher_overlap;
    report.lora_rank = options.lora_rank;
    report.trainable_parameters = step.trainable_parameters();
    report.ranks = crate::runtime::world::world().size();
    report.allreduced_bytes_per_step = reduced_bytes;
    report.device = options.device.to_string();
    report.loss_chunk_rows = step.loss_chunk_rows();
    report.steps_peak_rss_mib = steps_peak_known.then_some(steps_peak as f64 / (1024.0 * 1024.0));
    Ok(report)
}

/// [`run`] with the teacher read from an offline cache: the spec's random teacher is run once
/// on the batch and its top-`top_k` rows written to a temporary cache (not timed), then each
/// step reads the memory-mapped cache instead of running the teacher.
pub fn run_cached(
    spec: &BenchSpec,
    options: &BenchOptions,
    top_k: usize,
    mut on_step: impl FnMut(usize, &StepOutcome),
) -> Result<BenchReport> {
    ensure!(options.steps > 0, "`--steps` must be at least 1");
    let mut step = DftStep::with_student_lora(spec, options.seed, options.lora_rank)?;
    step.set_student_shards(options.student_shards)?;
    step.chunk_loss(crate::config::settings::loss_chunk_rows_on(
        options.loss_chunk_rows,
        &candle_core::Device::Cpu,
    ));
    let dir = std::env::temp_dir().join(format!("mmkd-bench-cache-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let result = (|| {
        step.write_teacher_cache(&dir, top_k)
            .context("writing the benchmark's teacher cache")?;
        let cache = crate::teacher_cache::TeacherCache::open(&dir)?;
        let mut timed = Vec::with_capacity(options.steps);
        let mut cpu_start = 0.0;
        for i in 0..options.warmup + options.steps {
            if i == options.warmup {
                cpu_start = cpu_time::process_cpu_seconds()?;
            }
            let outcome = step
                .run_cached(&cache)
                .with_context(|| format!("cached benchmark step {i}"))?;
            on_step(i, &outcome);
            if i >= options.warmup {
                timed.push(outcome);
            }
        }
        let cpu_per_step = (cpu_time::process_cpu_seconds()? - cpu_start) / options.steps as f64;
        let mut report = BenchReport::new(
            spec,
            options.warmup,
            &timed,
            cpu_per_step,
            memory::peak_rss_bytes()?,
            None,
            Some(top_k),
        )?;
        report.lora_rank = options.lora_rank;
        report.trainable_parameters = step.trainable_parameters();
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every size small, but every feature of the real spec present (GQA, several layers).
    pub(crate) fn tiny_spec() -> BenchSpec {
        BenchSpec::from_json_str(
            r#"{
              "vocab": 50, "batch": 2, "prefix_tokens": 2, "prompt_tokens": 3, "response_tokens": 4,
              "vision": {"image_size": 16, "patch": 8, "hidden": 16, "intermediate": 32, "layers": 2, "heads": 2},
              "student": {"hidden": 16, "intermediate": 32, "layers": 2, "heads": 4, "kv_heads": 2},
              "teacher": {"hidden": 24, "intermediate": 40, "layers": 2, "heads": 4, "kv_heads": 2}
            }"#,
        )
        .unwrap()
    }

    /// The terms that read more of the teacher than its logits, on real (tiny) models: the
    /// visual switch trains the student's visual path through the frozen teacher's decoder and
    /// nothing else; with CE and the hidden-state term every trainable parameter learns.
    #[test]
    fn switch_and_hidden_terms_reach_the_students_modules_through_a_real_teacher() {
        use crate::models::llava::{ImageInput, Trainable, LM_PREFIX, PROJECTOR_PREFIX};
        use crate::objective::{Binding, LmShape, Objective, TermSpec};
        use crate::train::forward::{objective_loss, StudentBatch, TeacherRows};
        use candle_core::Device;
        use mmkd_nn::grad_check::params_without_gradient_in;
        use mmkd_nn::{ParamBuilder, ParamStore};

        let spec = tiny_spec();
        let dev = Device::Cpu;
        let teacher = step::build(&spec, &spec.teacher, Trainable::NONE, 1, None, &dev).unwrap();
        let student = step::build(
            &spec,
            &spec.student,
            Trainable::PROJECTOR_AND_LLM,
            2,
            None,
            &dev,
        )
        .unwrap();
        let batch = data::BenchBatch::random(&spec, 0, &dev).unwrap();
        let run = |terms: &str| {
            #[derive(serde::Deserialize)]
            struct Doc {
                objective: Vec<TermSpec>,
            }
            let specs = toml::from_str::<Doc>(terms).unwrap().objective;
            let mut objective = Objective::new(&specs, &Default::default()).unwrap();
            let store = ParamStore::new();
            objective
                .bind(&Binding {
                    student: LmShape {
                        layers: 2,
                        width: 16,
                    },
                    teacher: Some(LmShape {
                        layers: 2,
                        width: 24,
                    }),
                    params: ParamBuilder::fresh(&store, 0, &dev).pp("objective"),
                    shared_vocab: None,
                })
                .unwrap();
            let output = teacher
                .forward_images_layers(
                    &batch.tokens,
                    Some(ImageInput::Pixels(&batch.pixels)),
                    &objective.layers().1,
                )
                .unwrap();
            let loss = objective_loss(
                &student,
                StudentBatch::of_data(
                    &batch.tokens,
                    &batch.labels,
                    &batch.visual_mask,
                    Some(ImageInput::Pixels(&batch.pixels)),
                ),
                TeacherRows::Online {
                    output: &output,
                    teacher: &teacher,
                    truncate: None,
                    aligned: None,
                },
                &objective,
            )
            .unwrap();
            assert!(loss.value.is_finite() && loss.value > 0.0, "{}", loss.value);
            let grads = loss.total.backward().unwrap();
            (
                params_without_gradient_in(&student.store, &grads).unwrap(),
                params_without_gradient_in(&store, &grads).unwrap(),
                store.len(),
            )
        };
        let (student_missing, own_missing, own) =
            run("[[objective]]\nterm = \"switch\"\ndivergence = \"dbild\"");
        assert_eq!((own, own_missing.len()), (1, 0), "{own_missing:?}");
        assert!(student_missing
            .iter()
            .all(|n| n.starts_with(LM_PREFIX) || n.starts_with("lm_head")));
        assert!(student_missing.iter().any(|n| n.starts_with(LM_PREFIX)));
        assert!(!student_missing
            .iter()
            .any(|n| n.starts_with(PROJECTOR_PREFIX)));
        let (student_missing, own_missing, own) = run("[[objective]]\nterm = \"ce\"\n\
             [[objective]]\nterm = \"switch\"\n[[objective]]\nterm = \"hidden\"\n\
             positions = \"both\"");
        assert_eq!(student_missing, Vec::<String>::new());
        // The bridge and one projection per student layer.
        assert_eq!((own, own_missing.len()), (3, 0), "{own_missing:?}");
    }

    #[test]
    fn one_step_on_a_tiny_spec_reports_finite_positive_numbers() {
        let spec = tiny_spec();
        let options = BenchOptions {
            steps: 2,
            warmup: 1,
            seed: 3,
            matmul_peak_size: Some(16),
            ..Default::default()
        };
        let mut seen = Vec::new();
        let report = run(&spec, &options, |i, _| seen.push(i)).unwrap();
        assert_eq!(seen, vec![0, 1, 2]);
        assert_eq!((report.steps, report.warmup, report.batch), (2, 1, 2));
        let s = &report.split_s;
        for (name, x) in [
            ("samples_per_s", report.samples_per_s),
            ("step_s_median", report.step_s_median),
            ("gflops", report.gflops),
            ("gflop_per_step", report.gflop_per_step),
            ("peak_rss_mib", report.peak_rss_mib),
            ("cpu_s_per_step", report.cpu_s_per_step),
            ("matmul_peak", report.matmul_peak_gflops.unwrap()),
            ("teacher_forward", s.teacher_forward),
            ("student_forward", s.student_forward),
            ("loss", s.loss),
            ("backward", s.backward),
            ("optimizer", s.optimizer),
            ("loss value", report.loss_last as f64),
        ] {
            assert!(x.is_finite() && x > 0.0, "{name} = {x}");
        }
        assert!(report.step_s_min <= report.step_s_median);
        assert!(report.step_s_median <= report.step_s_max);
        // AdamW moved the student: the same batch gives a different loss the next step.
        assert_ne!(report.loss_first, report.loss_last);
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["samples_per_s"].as_f64().unwrap() > 0.0);
        assert!(json["split_s"]["backward"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn the_cached_step_trains_every_parameter_and_equals_the_online_loss_at_full_vocabulary() {
        let spec = tiny_spec();
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let mut online = DftStep::new(&spec, 4).unwrap();
        let mut cached = DftStep::new(&spec, 4).unwrap();
        cached.write_teacher_cache(&cache_dir, spec.vocab).unwrap();
        let cache = crate::teacher_cache::TeacherCache::open(&cache_dir).unwrap();
        // `run_cached` fails when a trainable parameter gets no gradient.
        let (a, b) = (online.run().unwrap(), cached.run_cached(&cache).unwrap());
        assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
        let (a, b) = (online.run().unwrap(), cached.run_cached(&cache).unwrap());
        assert!(
            (a.loss - b.loss).abs() < 1e-4,
            "after one update: {} vs {}",
            a.loss,
            b.loss
        );
        let options = BenchOptions {
            steps: 1,
            warmup: 0,
            seed: 0,
            matmul_peak_size: None,
            ..Default::default()
        };
        let report = run_cached(&spec, &options, 8, |_, _| {}).unwrap();
        assert_eq!(report.bench, "mmkd-dft-step-cached");
        assert_eq!(report.flops.teacher_forward, 0.0);
        assert!(report.samples_per_s > 0.0);
    }

    #[test]
    fn overlapping_the_teacher_with_the_update_changes_no_number() {
        let spec = tiny_spec();
        let mut overlapped = DftStep::new(&spec, 5).unwrap();
        let mut sequential = DftStep::new(&spec, 5).unwrap();
        sequential.set_teacher_overlap(false);
        for step in 0..3 {
            let (a, b) = (overlapped.run().unwrap(), sequential.run().unwrap());
            assert_eq!(a.loss, b.loss, "step {step}");
        }
    }

    #[test]
    fn computing_the_frozen_tower_a_step_ahead_changes_no_cached_number() {
        let spec = tiny_spec();
        let dir = tempfile::tempdir().unwrap();
        let mut ahead = DftStep::new(&spec, 7).unwrap();
        ahead.set_student_shards(2).unwrap();
        let mut inline = DftStep::new(&spec, 7).unwrap();
        inline.set_student_shards(2).unwrap();
        inline.set_teacher_overlap(false);
        ahead.write_teacher_cache(dir.path(), spec.vocab).unwrap();
        let cache = crate::teacher_cache::TeacherCache::open(dir.path()).unwrap();
        // From the second step on, `ahead` reads the tower features it computed during the
        // previous step's update.
        for step in 0..3 {
            let (a, b) = (
                ahead.run_cached(&cache).unwrap(),
                inline.run_cached(&cache).unwrap(),
            );
            assert_eq!(a.loss, b.loss, "step {step}");
        }
        assert!(!ahead.pending.is_empty() && ahead.pending.iter().all(|s| s.tower.is_some()));
        assert!(inline.pending.is_empty());
    }

    #[test]
    fn a_chunked_loss_trains_as_the_whole_one() {
        // LLaVA-KD's objective (CE, L_res, L_vis, L_rel) with logits formed 3 rows at a time
        // from both models' hidden states, against an online teacher and a cache: the same
        // losses, step after step (so the same updates).
        let spec = tiny_spec();
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let writer = DftStep::new(&spec, 8).unwrap();
        writer.write_teacher_cache(&cache_dir, 8).unwrap();
        let cache = crate::teacher_cache::TeacherCache::open(&cache_dir).unwrap();
        for cached in [false, true] {
            let mut whole = DftStep::new(&spec, 8).unwrap();
            let mut chunked = DftStep::new(&spec, 8).unwrap();
            chunked.chunk_loss(Some(3));
            assert_eq!(chunked.loss_chunk_rows(), Some(3));
            for step in 0..3 {
                let (a, b) = match cached {
                    false => (whole.run().unwrap(), chunked.run().unwrap()),
                    true => (
                        whole.run_cached(&cache).unwrap(),
                        chunked.run_cached(&cache).unwrap(),
                    ),
                };
                assert!(
                    (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs().max(1.0),
                    "cached {cached}, step {step}: {} vs {}",
                    a.loss,
                    b.loss
                );
            }
        }
    }

    #[test]
    fn sharding_the_student_batch_keeps_the_loss_and_the_update() {
        let spec = tiny_spec();
        let mut whole = DftStep::new(&spec, 6).unwrap();
        let mut halves = DftStep::new(&spec, 6).unwrap();
        halves.set_student_shards(2).unwrap();
        // Every sample has as many response tokens, so the mean of the halves' losses is
        // the whole batch's loss, and the mean of their gradients its gradient.
        for step in 0..3 {
            let (a, b) = (whole.run().unwrap(), halves.run().unwrap());
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs().max(1.0),
                "step {step}: {} vs {}",
                a.loss,
                b.loss
            );
        }
        assert!(halves.set_student_shards(0).is_err());
        assert!(halves.set_student_shards(spec.batch + 1).is_err());
    }

    #[test]
    fn the_step_trains_every_student_parameter_and_nothing_else() {
        let spec = tiny_spec();
        let mut step = DftStep::new(&spec, 1).unwrap();
        let names: Vec<String> = step
            .student()
            .store
            .trainable_vars()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.iter().all(|n| !n.starts_with("model.vision_tower")));
        assert!(names
            .iter()
            .any(|n| n.starts_with("model.multi_modal_projector")));
        assert!(names.iter().any(|n| n == "lm_head.weight"));
        // `run` fails when a trainable parameter gets no gradient.
        step.run().unwrap();
    }
}
