//! The shared report type: markdown rendering and serde round trip.

use mmkd::scoring::caption::CaptionScores;
use mmkd::scoring::pope::{evaluate_pope, PopeExample, YesNo};
use mmkd::scoring::results::{markdown_comparison, MetricScale, MetricsReport};

fn caption_report() -> MetricsReport {
    let scores = CaptionScores {
        bleu: [0.7, 0.5, 0.35, 0.25],
        rouge_l: 0.5123456,
        cider: 1.0512,
        count: 5000,
        per_image: Vec::new(),
    };
    MetricsReport::from_captions(&scores)
        .with_model("student")
        .with_dataset("coco-karpathy-test")
}

#[test]
fn caption_report_marks_meteor_as_not_computed() {
    let r = caption_report();
    assert_eq!(r.metric("bleu_4"), Some(0.25));
    assert_eq!(r.metric("meteor"), None);
    let meteor = r
        .metrics
        .iter()
        .find(|m| m.name == "meteor")
        .expect("meteor listed");
    assert_eq!((meteor.value, meteor.scale), (None, MetricScale::Score));
    let md = r.to_markdown();
    assert!(
        md.starts_with("**caption — coco-karpathy-test — student** (5000 samples)"),
        "{md}"
    );
    assert!(
        md.contains("| bleu_1 | bleu_2 | bleu_3 | bleu_4 | meteor | rouge_l | cider |"),
        "{md}"
    );
    assert!(
        md.contains("| 0.7000 | 0.5000 | 0.3500 | 0.2500 | n/a | 0.5123 | 1.0512 |"),
        "{md}"
    );
    assert!(md.contains("Note: METEOR not computed"), "{md}");
}

#[test]
fn pope_report_has_a_split_table() {
    let ex = |a: &str, l, s: &str| PopeExample {
        answer: a.into(),
        label: l,
        split: Some(s.into()),
    };
    let summary = evaluate_pope(&[
        ex("yes", YesNo::Yes, "random"),
        ex("yes", YesNo::No, "adversarial"),
    ])
    .expect("pope");
    let md = MetricsReport::from_pope(&summary).to_markdown();
    assert!(
        md.contains("| accuracy | precision | recall | f1 | yes_ratio |"),
        "{md}"
    );
    assert!(
        md.contains("| 50.00 | 50.00 | 100.00 | 66.67 | 100.00 |"),
        "{md}"
    );
    assert!(
        md.contains("| split | count | accuracy | precision | recall | f1 | yes_ratio |"),
        "{md}"
    );
    assert!(md.contains("| adversarial | 1 | 0.00 |"), "{md}");
    assert!(md.contains("| random | 1 | 100.00 |"), "{md}");
}

#[test]
fn comparison_table_aligns_metrics_across_reports() {
    let a = caption_report();
    let b = MetricsReport {
        model: Some("teacher | big".into()),
        ..caption_report()
    };
    let mut c = caption_report().with_model("other");
    c.metrics.retain(|m| m.name != "cider");
    let md = markdown_comparison(&[a, b, c]);
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines[0], "| model | task | dataset | count | bleu_1 | bleu_2 | bleu_3 | bleu_4 | meteor | rouge_l | cider |");
    assert_eq!(lines.len(), 5);
    // '|' inside a cell is escaped; a missing metric is n/a.
    assert!(lines[3].starts_with("| teacher \\| big |"), "{}", lines[3]);
    assert!(lines[4].ends_with("| 0.5123 | n/a |"), "{}", lines[4]);
}

#[test]
fn report_round_trips_through_json() {
    let r = caption_report();
    let json = serde_json::to_string(&r).expect("serialize");
    let back: MetricsReport = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, r);
    assert!(json.contains("\"value\":null"), "{json}");
}
