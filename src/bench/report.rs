//! Summary of a benchmark run: medians over the timed steps, throughput, GFLOP/s, memory.

use anyhow::{ensure, Result};
use serde::Serialize;

use super::flops::StepFlops;
use super::spec::BenchSpec;
use super::step::{StepOutcome, StepTimes};

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// `mmkd-dft-step` (online teacher) or `mmkd-dft-step-cached` (teacher read from a cache).
    pub bench: &'static str,
    /// k of the teacher cache the cached step reads (`None`: online teacher).
    pub teacher_cache_top_k: Option<usize>,
    /// Whether the online teacher's forward for the next step ran alongside the student's
    /// update (its time then overlaps the other phases instead of adding to them).
    pub teacher_overlap: bool,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    pub batch: usize,
    /// candle's matmul threads (`RAYON_NUM_THREADS`, default: physical cores).
    pub threads: usize,
    /// `CANDLE_NUM_THREADS` (threads of candle's element-wise pool), when set.
    pub candle_num_threads: Option<String>,
    pub step_s_median: f64,
    pub step_s_min: f64,
    pub step_s_max: f64,
    /// `batch / step_s_median`.
    pub samples_per_s: f64,
    /// CPU time of all threads per timed step (the work, independent of other processes).
    pub cpu_s_per_step: f64,
    /// Median of each phase over the timed steps.
    pub split_s: StepTimes,
    pub flops: StepFlops,
    pub gflop_per_step: f64,
    /// `gflop_per_step / step_s_median`.
    pub gflops: f64,
    pub matmul_peak_gflops: Option<f64>,
    /// Peak resident memory of the process (VmHWM).
    pub peak_rss_mib: f64,
    /// Peak resident memory during the steps alone (`VmHWM` reset once the models are built;
    /// `None` where it cannot be reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_peak_rss_mib: Option<f64>,
    pub loss_first: f32,
    pub loss_last: f32,
    /// Rank of the student LLM's adapters (`--lora-rank`); `None`: full DFT. With adapters the
    /// FLOP count above (full DFT's) overstates the work: the frozen weights get no gradient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// Parameters the optimizer updates (and keeps state for).
    pub trainable_parameters: usize,
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    /// Processes of the data-parallel job (`mpirun -np N mmkd bench`): each ran its rows of
    /// the batch; `batch`, samples/s and FLOP/s are the job's.
    pub ranks: usize,
    /// Bytes each rank hands to the all-reduces per step (0 in one process).
    pub allreduced_bytes_per_step: u64,
    /// Logit rows the loss computed at once from hidden states (`None`: all at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_chunk_rows: Option<usize>,
}

impl BenchReport {
    pub fn new(
        spec: &BenchSpec,
        warmup: usize,
        timed: &[StepOutcome],
        cpu_s_per_step: f64,
        peak_rss_bytes: u64,
        matmul_peak_gflops: Option<f64>,
        teacher_cache_top_k: Option<usize>,
    ) -> Result<Self> {
        ensure!(!timed.is_empty(), "no timed step to report");
        let phase = |f: fn(&StepTimes) -> f64| median(timed.iter().map(|o| f(&o.times)));
        let totals: Vec<f64> = timed.iter().map(|o| o.wall).collect();
        let step_s_median = median(totals.iter().copied());
        let mut flops = StepFlops::of(spec);
        if teacher_cache_top_k.is_some() {
            // The cached step does not run the teacher.
            flops.teacher_forward = 0.0;
        }
        let gflop_per_step = flops.total() / 1e9;
        Ok(Self {
            bench: if teacher_cache_top_k.is_some() {
                "mmkd-dft-step-cached"
            } else {
                "mmkd-dft-step"
            },
            teacher_cache_top_k,
            teacher_overlap: false,
            steps: timed.len(),
            warmup,
            batch: spec.batch,
            threads: candle_core::utils::get_num_threads(),
            candle_num_threads: std::env::var("CANDLE_NUM_THREADS").ok(),
            step_s_median,
            step_s_min: totals.iter().copied().fold(f64::INFINITY, f64::min),
            step_s_max: totals.iter().copied().fold(0.0, f64::max),
            samples_per_s: spec.batch as f64 / step_s_median,
            cpu_s_per_step,
            split_s: StepTimes {
                teacher_forward: phase(|t| t.teacher_forward),
                student_forward: phase(|t| t.student_forward),
                loss: phase(|t| t.loss),
                backward: phase(|t| t.backward),
                optimizer: phase(|t| t.optimizer),
            },
            flops,
            gflop_per_step,
            gflops: gflop_per_step / step_s_median,
            matmul_peak_gflops,
            peak_rss_mib: peak_rss_bytes as f64 / (1024.0 * 1024.0),
            steps_peak_rss_mib: None,
            loss_first: timed[0].loss,
            loss_last: timed[timed.len() - 1].loss,
            lora_rank: None,
            trainable_parameters: 0,
            device: "cpu".into(),
            ranks: 1,
            allreduced_bytes_per_step: 0,
            loss_chunk_rows: None,
        })
    }

    /// A few human-readable lines.
    pub fn to_text(&self) -> String {
        let s = &self.split_s;
        let pct = |x: f64| 100.0 * x / self.step_s_median;
        let peak = match self.matmul_peak_gflops {
            Some(p) => format!(
                " ({:.0}% of a {p:.1} GFLOP/s matmul peak)",
                100.0 * self.gflops / p
            ),
            None => String::new(),
        };
        format!(
            "samples/s   {:.2}  (median step {:.3} s over {} steps, min {:.3}, max {:.3}; batch {}, {} matmul threads, element-wise threads {})\n\
             CPU time    {:.3} s per step (all threads)\n\
             GFLOP/s     {:.1}{peak}  ({:.1} GFLOP per step)\n\
             split       {} {:.3} s ({:.0}%) | student fwd {:.3} s ({:.0}%) | loss {:.3} s ({:.0}%) | backward {:.3} s ({:.0}%) | optimizer {:.3} s ({:.0}%)\n\
             peak memory {:.0} MiB (VmHWM){}\n\
             loss        {:.4} → {:.4}",
            self.samples_per_s,
            self.step_s_median,
            self.steps,
            self.step_s_min,
            self.step_s_max,
            self.batch,
            self.threads,
            self.candle_num_threads.as_deref().unwrap_or("default"),
            self.cpu_s_per_step,
            self.gflops,
            self.gflop_per_step,
            if self.teacher_cache_top_k.is_some() {
                "cache read"
            } else if self.teacher_overlap {
                "teacher fwd (overlapped, for the next step)"
            } else {
                "teacher fwd"
            },
            s.teacher_forward,
            pct(s.teacher_forward),
            s.student_forward,
            pct(s.student_forward),
            s.loss,
            pct(s.loss),
            s.backward,
            pct(s.backward),
            s.optimizer,
            pct(s.optimizer),
            self.peak_rss_mib,
            match self.steps_peak_rss_mib {
                Some(m) => format!("; {m:.0} MiB during the steps"),
                None => String::new(),
            },
            self.loss_first,
            self.loss_last,
        ) + &self.job_line()
    }

    /// Where it ran, and for a data-parallel job its ranks and the bytes each all-reduces.
    fn job_line(&self) -> String {
        let mut line = format!("\ndevice      {}", self.device);
        if self.ranks > 1 {
            line += &format!(
                ", {} ranks (MPI), each its {} of the batch; {:.2} MiB all-reduced per rank per \
                 step (a ring sends and receives 2·(N−1)/N of it)",
                self.ranks,
                if self.ranks == 2 { "half" } else { "share" },
                self.allreduced_bytes_per_step as f64 / (1024.0 * 1024.0)
            );
        }
        if let Some(rows) = self.loss_chunk_rows {
            line += &format!("; loss computed {rows} logit rows at a time");
        }
        line
    }
}

/// Median (mean of the two middle values for an even count).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }
}
