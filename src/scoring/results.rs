//! A task-independent metrics report (serde) and its markdown rendering, shared by
//! `mmkd metrics` and the model-driven evaluation runs.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::caption::{CaptionScores, METEOR_NOTE};
use super::choice::ChoiceSummary;
use super::pope::{PopeMetrics, PopeSummary};
use super::vqa::{GroupAccuracy, VqaProcessor, VqaSummary};

/// How a metric's value is scaled (decides how it is printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricScale {
    /// 0–100, printed with 2 decimals.
    Percent,
    /// pycocoevalcap's scale (BLEU, ROUGE-L in 0–1; CIDEr-D), printed with 4 decimals.
    Score,
}

/// One named number; `None` = not computed (printed as "n/a").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    pub name: String,
    pub value: Option<f64>,
    pub scale: MetricScale,
}

impl MetricValue {
    pub fn percent(name: &str, value: f64) -> Self {
        MetricValue {
            name: name.to_string(),
            value: Some(value),
            scale: MetricScale::Percent,
        }
    }
    pub fn score(name: &str, value: f64) -> Self {
        MetricValue {
            name: name.to_string(),
            value: Some(value),
            scale: MetricScale::Score,
        }
    }
    pub fn absent(name: &str, scale: MetricScale) -> Self {
        MetricValue {
            name: name.to_string(),
            value: None,
            scale,
        }
    }
    pub fn formatted(&self) -> String {
        match (self.value, self.scale) {
            (None, _) => "n/a".to_string(),
            (Some(v), MetricScale::Percent) => format!("{v:.2}"),
            (Some(v), MetricScale::Score) => format!("{v:.4}"),
        }
    }
}

/// A breakdown row: a group (answer type, category, split) with its size and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakdownRow {
    pub key: String,
    pub count: usize,
    pub values: Vec<MetricValue>,
}

/// Metrics per group, e.g. VQA accuracy per answer type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    pub name: String,
    pub rows: Vec<BreakdownRow>,
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    /// "vqa", "caption", "pope", "multiple_choice".
    pub task: String,
    pub model: Option<String>,
    pub dataset: Option<String>,
    /// Number of scored samples.
    pub count: usize,
    pub metrics: Vec<MetricValue>,
    pub breakdowns: Vec<Breakdown>,
    /// Caveats printed under the tables (e.g. METEOR not computed).
    pub notes: Vec<String>,
}

fn group_rows(groups: &BTreeMap<String, GroupAccuracy>) -> Vec<BreakdownRow> {
    groups
        .iter()
        .map(|(k, g)| BreakdownRow {
            key: k.clone(),
            count: g.count,
            values: vec![MetricValue::percent("accuracy", g.accuracy)],
        })
        .collect()
}

fn pope_values(m: &PopeMetrics) -> Vec<MetricValue> {
    vec![
        MetricValue::percent("accuracy", m.accuracy),
        MetricValue::percent("precision", m.precision),
        MetricValue::percent("recall", m.recall),
        MetricValue::percent("f1", m.f1),
        MetricValue::percent("yes_ratio", m.yes_ratio),
    ]
}

impl MetricsReport {
    fn new(task: &str, count: usize, metrics: Vec<MetricValue>) -> Self {
        MetricsReport {
            task: task.to_string(),
            model: None,
            dataset: None,
            count,
            metrics,
            breakdowns: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn from_vqa(s: &VqaSummary) -> Self {
        let mut r = Self::new(
            "vqa",
            s.count,
            vec![MetricValue::percent("accuracy", s.accuracy)],
        );
        if !s.per_answer_type.is_empty() {
            r.breakdowns.push(Breakdown {
                name: "answer type".into(),
                rows: group_rows(&s.per_answer_type),
            });
        }
        if !s.per_category.is_empty() {
            r.breakdowns.push(Breakdown {
                name: "category".into(),
                rows: group_rows(&s.per_category),
            });
        }
        if s.processor == VqaProcessor::EvalAi {
            r.notes.push(
                "answers normalized with EvalAI's processor (as LLaVA's m4c_evaluator), not vqaEval.py's"
                    .to_string(),
            );
        }
        if s.exact_match_count > 0 {
            r.notes.push(format!(
                "{} of {} questions have a single reference answer and are scored by exact match",
                s.exact_match_count, s.count
            ));
        }
        r
    }

    pub fn from_captions(s: &CaptionScores) -> Self {
        let mut metrics: Vec<MetricValue> = (0..4)
            .map(|k| MetricValue::score(&format!("bleu_{}", k + 1), s.bleu[k]))
            .collect();
        metrics.push(MetricValue::absent("meteor", MetricScale::Score));
        metrics.push(MetricValue::score("rouge_l", s.rouge_l));
        metrics.push(MetricValue::score("cider", s.cider));
        let mut r = Self::new("caption", s.count, metrics);
        r.notes.push(METEOR_NOTE.to_string());
        r
    }

    pub fn from_pope(s: &PopeSummary) -> Self {
        let mut r = Self::new("pope", s.overall.count, pope_values(&s.overall));
        if !s.per_split.is_empty() {
            r.breakdowns.push(Breakdown {
                name: "split".into(),
                rows: s
                    .per_split
                    .iter()
                    .map(|(k, m)| BreakdownRow {
                        key: k.clone(),
                        count: m.count,
                        values: pope_values(m),
                    })
                    .collect(),
            });
        }
        r
    }

    pub fn from_choices(s: &ChoiceSummary) -> Self {
        let mut r = Self::new(
            "multiple_choice",
            s.count,
            vec![MetricValue::percent("accuracy", s.accuracy)],
        );
        if s.unreadable > 0 {
            r.notes.push(format!(
                "{} of {} answers named no option and count as wrong",
                s.unreadable, s.count
            ));
        }
        r
    }

    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    pub fn with_dataset(mut self, dataset: impl Into<String>) -> Self {
        self.dataset = Some(dataset.into());
        self
    }

    /// The value of a top-level metric, if present and computed.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.value)
    }

    /// The report as markdown: a title line, the metrics table, one table per breakdown, notes.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let mut title = self.task.clone();
        if let Some(d) = &self.dataset {
            let _ = write!(title, " — {d}");
        }
        if let Some(m) = &self.model {
            let _ = write!(title, " — {m}");
        }
        let _ = writeln!(out, "**{title}** ({} samples)\n", self.count);
        let names: Vec<&str> = self.metrics.iter().map(|m| m.name.as_str()).collect();
        let cells: Vec<String> = self.metrics.iter().map(MetricValue::formatted).collect();
        out.push_str(&table(&names, &[cells]));
        for b in &self.breakdowns {
            let mut header = vec![b.name.as_str(), "count"];
            let value_names: Vec<&str> = b
                .rows
                .first()
                .map(|r| r.values.iter().map(|v| v.name.as_str()).collect())
                .unwrap_or_default();
            header.extend(value_names);
            let rows: Vec<Vec<String>> = b
                .rows
                .iter()
                .map(|r| {
                    let mut cells = vec![r.key.clone(), r.count.to_string()];
                    cells.extend(r.values.iter().map(MetricValue::formatted));
                    cells
                })
                .collect();
            out.push('\n');
            out.push_str(&table(&header, &rows));
        }
        for n in &self.notes {
            let _ = write!(out, "\nNote: {n}\n");
        }
        out
    }
}

/// Escape the characters that would break a markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn table<S: AsRef<str>>(header: &[S], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let head: Vec<String> = header.iter().map(|h| cell(h.as_ref())).collect();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(head.len()));
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// Several reports side by side (e.g. teacher vs students): one row per report, one column per
/// metric name (in order of first appearance; "n/a" where a report lacks it).
pub fn markdown_comparison(reports: &[MetricsReport]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in reports {
        for m in &r.metrics {
            if !names.contains(&m.name.as_str()) {
                names.push(&m.name);
            }
        }
    }
    let mut header = vec!["model", "task", "dataset", "count"];
    header.extend(names.iter().copied());
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.model.clone().unwrap_or_else(|| "-".into()),
                r.task.clone(),
                r.dataset.clone().unwrap_or_else(|| "-".into()),
                r.count.to_string(),
            ];
            for n in &names {
                cells.push(
                    r.metrics
                        .iter()
                        .find(|m| m.name == *n)
                        .map(MetricValue::formatted)
                        .unwrap_or_else(|| "n/a".into()),
                );
            }
            cells
        })
        .collect();
    table(&header, &rows)
}
