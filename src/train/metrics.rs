//! Per-step metrics: `metrics.jsonl` (one line per optimizer step, every loss term by name) and
//! a PNG plot of the loss curves when a stage ends.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// One optimizer step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: u64,
    pub loss: f32,
    pub ce: Option<f32>,
    pub l_res: Option<f32>,
    pub l_vis: Option<f32>,
    pub l_rel: Option<f32>,
    pub grad_norm: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub samples: usize,
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

/// Colours of the plotted series, in the order of [`SERIES`].
pub const SERIES: &[(&str, [u8; 3])] = &[
    ("loss", [20, 20, 20]),
    ("ce", [31, 119, 180]),
    ("l_res", [255, 127, 14]),
    ("l_vis", [44, 160, 44]),
    ("l_rel", [214, 39, 40]),
];

fn series_value(m: &StepMetrics, name: &str) -> Option<f32> {
    match name {
        "loss" => Some(m.loss),
        "ce" => m.ce,
        "l_res" => m.l_res,
        "l_vis" => m.l_vis,
        "l_rel" => m.l_rel,
        _ => None,
    }
}

/// Draws every loss term against the step on a log-scaled y axis (light grid at powers of
/// ten), smoothed with a running mean so noisy curves stay readable. Series colours:
/// loss black, ce blue, l_res orange, l_vis green, l_rel red.
pub fn plot_losses(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    const W: u32 = 640;
    const H: u32 = 360;
    const PAD: f32 = 24.0;
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let values: Vec<f32> = metrics
        .iter()
        .flat_map(|m| SERIES.iter().filter_map(|(n, _)| series_value(m, n)))
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
        for (name, colour) in SERIES {
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
            ce: Some(loss * 0.5),
            l_res: None,
            l_vis: None,
            l_rel: None,
            grad_norm: 1.0,
            lr: 1e-3,
            samples_per_s: 10.0,
            samples: 4,
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
}
