//! Per-step metrics: `metrics.jsonl` (one line per optimizer step, every loss term by name) and
//! a PNG plot of the loss curves when a stage ends.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::objective::TermValues;

/// One optimizer step: the loss, each term of the stage's objective by its logged name (in the
/// objective's order; `null` where no micro-batch of the step had the term), and the step's
/// bookkeeping. A line of `metrics.jsonl` lists the fields in that order.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: u64,
    pub loss: f32,
    pub terms: TermValues,
    pub grad_norm: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub samples: usize,
    /// The answers the step's micro-batches got from the student or the teacher (stages with
    /// `[rollout]`).
    pub rollouts: Option<RolloutCounts>,
}

/// What the rollouts of one or more steps did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutCounts {
    /// Micro-batches the student answered (on-policy).
    pub student_micro_batches: usize,
    /// Micro-batches the teacher answered (sequence-level KD).
    pub teacher_micro_batches: usize,
    /// Answers generated.
    pub answers: usize,
    /// Answers cut by `rollout.max_new_tokens` before they stopped.
    pub capped: usize,
    /// Tokens generated (ends of answer included).
    pub tokens: usize,
    /// The student's answers equal to the data's (VQA-normalised), where a policy-gradient
    /// term scored them.
    pub matches: usize,
}

impl std::ops::AddAssign for RolloutCounts {
    fn add_assign(&mut self, other: Self) {
        self.student_micro_batches += other.student_micro_batches;
        self.teacher_micro_batches += other.teacher_micro_batches;
        self.answers += other.answers;
        self.capped += other.capped;
        self.tokens += other.tokens;
        self.matches += other.matches;
    }
}

impl StepMetrics {
    /// The value of the term logged as `name` at this step.
    pub fn term(&self, name: &str) -> Option<f32> {
        self.terms.get(name)
    }
}

/// The fields every line has; any other key is an objective term.
const FIXED: [&str; 7] = [
    "step",
    "epoch",
    "loss",
    "grad_norm",
    "lr",
    "samples_per_s",
    "samples",
];

impl Serialize for StepMetrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let entries = FIXED.len() + self.terms.0.len() + usize::from(self.rollouts.is_some());
        let mut map = serializer.serialize_map(Some(entries))?;
        map.serialize_entry("step", &self.step)?;
        map.serialize_entry("epoch", &self.epoch)?;
        map.serialize_entry("loss", &self.loss)?;
        for (name, value) in &self.terms.0 {
            map.serialize_entry(name, value)?;
        }
        map.serialize_entry("grad_norm", &self.grad_norm)?;
        map.serialize_entry("lr", &self.lr)?;
        map.serialize_entry("samples_per_s", &self.samples_per_s)?;
        map.serialize_entry("samples", &self.samples)?;
        if let Some(rollouts) = &self.rollouts {
            map.serialize_entry("rollouts", rollouts)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for StepMetrics {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = StepMetrics;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a metrics record (step, epoch, loss, terms, grad_norm, lr, ...)")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StepMetrics, A::Error> {
                use serde::de::Error;
                let (mut step, mut epoch, mut loss) = (None, None, None);
                let (mut grad_norm, mut lr, mut rate, mut samples) = (None, None, None, None);
                let mut terms = Vec::new();
                let mut rollouts = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "step" => step = Some(map.next_value()?),
                        "epoch" => epoch = Some(map.next_value()?),
                        // A diverged step logs its NaN loss as null.
                        "loss" => loss = Some(map.next_value::<Option<f32>>()?.unwrap_or(f32::NAN)),
                        "grad_norm" => {
                            grad_norm = Some(map.next_value::<Option<f64>>()?.unwrap_or(f64::NAN))
                        }
                        "lr" => lr = Some(map.next_value()?),
                        "samples_per_s" => rate = Some(map.next_value()?),
                        "samples" => samples = Some(map.next_value()?),
                        "rollouts" => rollouts = Some(map.next_value()?),
                        _ => {
                            let value: Option<f32> = map.next_value()?;
                            terms.push((key, value));
                        }
                    }
                }
                Ok(StepMetrics {
                    step: step.ok_or_else(|| A::Error::missing_field("step"))?,
                    epoch: epoch.ok_or_else(|| A::Error::missing_field("epoch"))?,
                    loss: loss.ok_or_else(|| A::Error::missing_field("loss"))?,
                    terms: TermValues(terms),
                    grad_norm: grad_norm.ok_or_else(|| A::Error::missing_field("grad_norm"))?,
                    lr: lr.ok_or_else(|| A::Error::missing_field("lr"))?,
                    samples_per_s: rate.ok_or_else(|| A::Error::missing_field("samples_per_s"))?,
                    samples: samples.ok_or_else(|| A::Error::missing_field("samples"))?,
                    rollouts,
                })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// Appends lines to `metrics.jsonl`, flushing each so a killed run keeps what it logged.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log; on resume, keeps only the lines up to `resume_step` (steps after the last
    /// checkpoint are re-run and re-logged).
    pub fn open(path: &Path, resume_step: Option<usize>) -> Result<Self> {
        let kept: Vec<StepMetrics> = match resume_step {
            Some(step) if path.exists() => read_metrics(path)?
                .into_iter()
                .filter(|m| m.step <= step)
                .collect(),
            _ => Vec::new(),
        };
        let mut file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for m in &kept {
            writeln!(file, "{}", serde_json::to_string(m)?)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn append(&mut self, m: &StepMetrics) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(m)?)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// Colour of the loss curve.
pub const LOSS_COLOUR: [u8; 3] = [20, 20, 20];

/// Colours of the objective's terms, in the order they first appear in the log (the built-in
/// objectives' ce, l_res, l_vis, l_rel get blue, orange, green, red).
pub const TERM_COLOURS: &[[u8; 3]] = &[
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// The plotted series: the loss, then every term the log names, with their colours.
fn series(metrics: &[StepMetrics]) -> Vec<(String, [u8; 3])> {
    let mut names: Vec<String> = Vec::new();
    for m in metrics {
        for name in m.terms.names() {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    std::iter::once(("loss".to_string(), LOSS_COLOUR))
        .chain(
            names
                .into_iter()
                .enumerate()
                .map(|(i, n)| (n, TERM_COLOURS[i % TERM_COLOURS.len()])),
        )
        .collect()
}

fn series_value(m: &StepMetrics, name: &str) -> Option<f32> {
    match name {
        "loss" => Some(m.loss),
        term => m.term(term),
    }
}

/// Draws every loss term against the step on a log-scaled y axis (light grid at powers of
/// ten), smoothed with a running mean so noisy curves stay readable. The loss is black; the
/// terms take [`TERM_COLOURS`] in order (ce blue, l_res orange, l_vis green, l_rel red for the
/// built-in objectives).
pub fn plot_losses(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    const W: u32 = 640;
    const H: u32 = 360;
    const PAD: f32 = 24.0;
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let series = series(metrics);
    let values: Vec<f32> = metrics
        .iter()
        .flat_map(|m| series.iter().filter_map(|(n, _)| series_value(m, n)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if metrics.len() >= 2 && !values.is_empty() {
        let lo = values
            .iter()
            .cloned()
            .fold(f32::INFINITY, f32::min)
            .log10()
            .floor();
        let hi = values
            .iter()
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let max_step = metrics.last().map(|m| m.step).unwrap_or(1).max(1) as f32;
        let min_step = metrics.first().map(|m| m.step).unwrap_or(0) as f32;
        let x_of = |step: f32| {
            PAD + (step - min_step) / (max_step - min_step).max(1.0) * (W as f32 - 2.0 * PAD)
        };
        let y_of = |v: f32| H as f32 - PAD - (v.log10() - lo) / (hi - lo) * (H as f32 - 2.0 * PAD);
        for decade in (lo as i32)..=(hi as i32) {
            let y = y_of(10f32.powi(decade));
            draw_line(&mut img, (PAD, y), (W as f32 - PAD, y), [225, 225, 225]);
        }
        draw_line(&mut img, (PAD, PAD), (PAD, H as f32 - PAD), [120, 120, 120]);
        draw_line(
            &mut img,
            (PAD, H as f32 - PAD),
            (W as f32 - PAD, H as f32 - PAD),
            [120, 120, 120],
        );
        let window = (metrics.len() / 50).max(1);
        for (name, colour) in &series {
            let points: Vec<(f32, f32)> = metrics
                .iter()
                .filter_map(|m| series_value(m, name).map(|v| (m.step as f32, v)))
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            let smoothed: Vec<(f32, f32)> = points
                .iter()
                .enumerate()
                .map(|(i, &(s, _))| {
                    let from = i.saturating_sub(window - 1);
                    let mean =
                        points[from..=i].iter().map(|p| p.1).sum::<f32>() / (i + 1 - from) as f32;
                    (x_of(s), y_of(mean))
                })
                .collect();
            for pair in smoothed.windows(2) {
                draw_line(&mut img, pair[0], pair[1], *colour);
            }
        }
    }
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}

fn draw_line(img: &mut RgbImage, from: (f32, f32), to: (f32, f32), colour: [u8; 3]) {
    let steps = ((to.0 - from.0).abs().max((to.1 - from.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let x = from.0 + (to.0 - from.0) * t;
        let y = from.1 + (to.1 - from.1) * t;
        for (dx, dy) in [(0.0, 0.0), (0.0, 1.0)] {
            let (px, py) = ((x + dx).round(), (y + dy).round());
            if px >= 0.0 && py >= 0.0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgb(colour));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: usize, loss: f32) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0,
            loss,
            terms: TermValues(vec![
                ("ce".into(), Some(loss * 0.5)),
                ("l_res".into(), None),
            ]),
            grad_norm: 1.0,
            lr: 1e-3,
            samples_per_s: 10.0,
            samples: 4,
            rollouts: None,
        }
    }

    #[test]
    fn resume_truncates_the_log_and_the_plot_draws_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for s in 1..=5 {
            log.append(&m(s, 5.0 / s as f32)).unwrap();
        }
        drop(log);
        let log = MetricsLog::open(&path, Some(3)).unwrap();
        drop(log);
        let kept = read_metrics(&path).unwrap();
        assert_eq!(
            kept.iter().map(|m| m.step).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let png = dir.path().join("loss.png");
        plot_losses(&kept, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        let black = img.pixels().filter(|p| p.0 == [20, 20, 20]).count();
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(black > 50 && blue > 50, "curves not drawn: {black} {blue}");
    }

    #[test]
    fn lines_keep_the_objectives_terms_in_order_and_read_back() {
        let metrics = StepMetrics {
            terms: TermValues(vec![
                ("ce".into(), Some(1.5)),
                ("gkd".into(), None),
                ("l_rel".into(), Some(0.25)),
            ]),
            ..m(7, 2.0)
        };
        let line = serde_json::to_string(&metrics).unwrap();
        assert_eq!(
            line,
            "{\"step\":7,\"epoch\":0,\"loss\":2.0,\"ce\":1.5,\"gkd\":null,\"l_rel\":0.25,\
             \"grad_norm\":1.0,\"lr\":0.001,\"samples_per_s\":10.0,\"samples\":4}"
        );
        let back: StepMetrics = serde_json::from_str(&line).unwrap();
        assert_eq!(back, metrics);
        assert_eq!(back.term("l_rel"), Some(0.25));
        assert_eq!(back.term("gkd"), None);
        // A step with rollouts logs their counts after the fixed fields.
        let rolled = StepMetrics {
            rollouts: Some(RolloutCounts {
                student_micro_batches: 1,
                answers: 2,
                capped: 1,
                tokens: 9,
                ..Default::default()
            }),
            ..metrics
        };
        let line = serde_json::to_string(&rolled).unwrap();
        assert!(line.ends_with(
            "\"samples\":4,\"rollouts\":{\"student_micro_batches\":1,\"teacher_micro_batches\":0,\
             \"answers\":2,\"capped\":1,\"tokens\":9,\"matches\":0}}"
        ), "{line}");
        assert_eq!(serde_json::from_str::<StepMetrics>(&line).unwrap(), rolled);
        let err = serde_json::from_str::<StepMetrics>("{\"step\":1}").unwrap_err();
        assert!(err.to_string().contains("missing field `epoch`"), "{err}");
    }
}
