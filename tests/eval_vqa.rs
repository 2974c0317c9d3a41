//! VQA accuracy: one test per rule of the official `vqaEval.py` normalization, hand-checked
//! accuracies, and a fixture computed by `tests/fixtures/eval/make_vqa_fixture.py`.

use std::path::PathBuf;

use mmkd::scoring::readers::{load_vqa_examples, read_vqa_questions};
use mmkd::scoring::vqa::normalize::evalai_normalize;
use mmkd::scoring::vqa::normalize::{
    normalize_prediction, process_digit_article, process_ground_truths, process_punctuation,
    CONTRACTIONS,
};
use mmkd::scoring::vqa::{
    evaluate_vqa, evaluate_vqa_with, score_vqa_answer, score_vqa_answer_with, VqaProcessor,
    VqaScoring,
};
use serde::Deserialize;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ten(groups: &[(usize, &str)]) -> Vec<String> {
    let v: Vec<String> = groups
        .iter()
        .flat_map(|(n, a)| std::iter::repeat_n(a.to_string(), *n))
        .collect();
    assert_eq!(v.len(), 10);
    v
}

fn acc(pred: &str, answers: &[String]) -> f64 {
    score_vqa_answer(pred, answers).expect("score").accuracy
}

// ---- processPunctuation ----

#[test]
fn rule_newlines_tabs_become_spaces_and_the_answer_is_stripped() {
    assert_eq!(normalize_prediction("  yes\n"), "yes");
    assert_eq!(normalize_prediction("\tred\tcar "), "red car");
    assert_eq!(normalize_prediction("two\ndogs"), "2 dogs");
}

#[test]
fn rule_mark_next_to_a_space_is_deleted_everywhere() {
    // "red, white": ',' touches a space, so every ',' is deleted.
    assert_eq!(process_punctuation("red, white,blue"), "red whiteblue");
    assert_eq!(process_punctuation("black / white"), "black  white");
    assert_eq!(process_punctuation("yes !"), "yes ");
}

#[test]
fn rule_mark_not_next_to_a_space_becomes_a_space() {
    assert_eq!(process_punctuation("red,white"), "red white");
    assert_eq!(process_punctuation("black/white"), "black white");
    assert_eq!(process_punctuation("t-shirt"), "t shirt");
    assert_eq!(process_punctuation("yes!"), "yes ");
    // Each mark decides for itself: '(' touches a space, ')' does not, '-' does not.
    assert_eq!(process_punctuation("a-b (c)"), "a b c ");
}

#[test]
fn rule_digit_comma_digit_anywhere_deletes_every_mark() {
    assert_eq!(process_punctuation("1,000"), "1000");
    // The digit,digit test covers the whole text, so the hyphen is deleted too.
    assert_eq!(process_punctuation("1,000-ish"), "1000ish");
    // Python's \d includes other decimal digits (Arabic-Indic here).
    assert_eq!(process_punctuation("\u{663},\u{665}"), "\u{663}\u{665}");
}

#[test]
fn rule_all_twenty_one_marks_are_handled() {
    for p in [
        ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`',
        ',', '?', '!',
    ] {
        assert_eq!(process_punctuation(&format!("a{p}b")), "a b", "mark {p:?}");
        assert_eq!(process_punctuation(&format!("a {p}b")), "a b", "mark {p:?}");
    }
}

#[test]
fn rule_apostrophe_and_colon_are_kept() {
    assert_eq!(process_punctuation("man's"), "man's");
    assert_eq!(process_punctuation("10:30"), "10:30");
}

#[test]
fn rule_periods_not_followed_by_a_digit_are_deleted() {
    assert_eq!(process_punctuation("yes."), "yes");
    assert_eq!(process_punctuation("e.g."), "eg");
    assert_eq!(process_punctuation("2.5."), "2.5");
    // A period before a digit stays even after another period: lookahead sees the original.
    assert_eq!(process_punctuation("..5"), ".5");
}

#[test]
fn rule_at_most_32_periods_are_deleted() {
    // `periodStrip.sub("", text, re.UNICODE)` passes re.UNICODE (= 32) as the count.
    let text = format!("a{}", ".".repeat(40));
    assert_eq!(process_punctuation(&text), format!("a{}", ".".repeat(8)));
}

// ---- processDigitArticle ----

#[test]
fn rule_lowercase() {
    assert_eq!(process_digit_article("Red CAR"), "red car");
}

#[test]
fn rule_number_words_become_digits() {
    assert_eq!(
        process_digit_article("none zero one two three four five six seven eight nine ten"),
        "0 0 1 2 3 4 5 6 7 8 9 10"
    );
    assert_eq!(process_digit_article("eleven twenty"), "eleven twenty");
}

#[test]
fn rule_articles_are_dropped() {
    assert_eq!(
        process_digit_article("a dog and an apple on the table"),
        "dog and apple on table"
    );
    assert_eq!(process_digit_article("The"), "");
}

#[test]
fn rule_contractions_are_restored() {
    assert_eq!(CONTRACTIONS.len(), 120);
    assert_eq!(process_digit_article("dont know"), "don't know");
    assert_eq!(
        process_digit_article("isnt wont youre oclock"),
        "isn't won't you're o'clock"
    );
    // Keys written with a capital in the official table never match the lowercased words.
    assert_eq!(process_digit_article("Im Ive"), "im ive");
    // The table's reversed entry is kept as it is.
    assert_eq!(process_digit_article("somebody'd"), "somebodyd");
}

#[test]
fn rule_ground_truths_get_punctuation_only_when_answers_disagree() {
    let same = ten(&[(10, "T-Shirt")]);
    assert_eq!(process_ground_truths(&same), same);
    let mixed = ten(&[(6, "T-Shirt"), (4, "shirt")]);
    let processed = process_ground_truths(&mixed);
    // Punctuation only: no lowercasing.
    assert_eq!(processed[0], "T Shirt");
    assert_eq!(processed[9], "shirt");
}

// ---- accuracy ----

#[test]
fn soft_accuracy_is_0_3_6_9_1_for_0_to_4_matching_humans() {
    let expected = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0];
    for (k, want) in expected.iter().enumerate() {
        let answers = ten(&[(k, "cat"), (10 - k, "dog")]);
        let got = acc("cat", &answers);
        assert!((got - want).abs() < 1e-12, "{k} matches: {got}");
    }
}

#[test]
fn leave_one_out_is_averaged_for_other_answer_counts() {
    // 3 answers, 1 match: leave out the match → 0 matches, leave out another → 1 → (0 + 1/3 + 1/3)/3.
    let got = acc("cat", &strings(&["cat", "dog", "dog"]));
    assert!((got - 2.0 / 9.0).abs() < 1e-12);
}

#[test]
fn identical_capitalised_ground_truths_never_match() {
    // Official quirk (EvalAI's processor would score 1.0).
    assert_eq!(acc("yes", &ten(&[(10, "Yes")])), 0.0);
    assert_eq!(acc("t-shirt", &ten(&[(10, "t-shirt")])), 0.0);
    assert_eq!(acc("t-shirt", &ten(&[(6, "t-shirt"), (4, "shirt")])), 1.0);
}

#[test]
fn a_single_reference_is_scored_by_exact_match_after_normalizing_both() {
    let s = score_vqa_answer("A Cat.", &strings(&["cat"])).expect("score");
    assert_eq!((s.accuracy, s.scoring), (1.0, VqaScoring::ExactMatch));
    assert_eq!(acc("dog", &strings(&["Cat"])), 0.0);
    assert!(score_vqa_answer("x", &[]).is_err());
}

#[test]
fn summary_breaks_down_by_answer_type_and_category() {
    use mmkd::scoring::ids::SampleId;
    use mmkd::scoring::vqa::VqaExample;
    let ex = |id: &str, pred: &str, k: usize, t: &str, c: Option<&str>| VqaExample {
        id: SampleId(id.into()),
        prediction: pred.into(),
        answers: ten(&[(k, "yes"), (10 - k, "no")]),
        accepted: vec![],
        answer_type: Some(t.into()),
        category: c.map(String::from),
    };
    let s = evaluate_vqa(&[
        ex("1", "yes", 10, "yes/no", Some("is")), // 1.0
        ex("2", "yes", 1, "yes/no", Some("is")),  // 0.3
        ex("3", "yes", 2, "other", None),         // 0.6
    ])
    .expect("summary");
    assert!((s.accuracy - 100.0 * 1.9 / 3.0).abs() < 1e-9);
    assert_eq!(s.count, 3);
    assert!((s.per_answer_type["yes/no"].accuracy - 65.0).abs() < 1e-9);
    assert_eq!(s.per_answer_type["yes/no"].count, 2);
    assert!((s.per_answer_type["other"].accuracy - 60.0).abs() < 1e-9);
    assert_eq!(s.per_category.len(), 1);
    assert!((s.per_category["is"].accuracy - 65.0).abs() < 1e-9);
}

// ---- fixture from the Python port of the official logic ----

#[derive(Deserialize)]
struct ExpectedQuestion {
    question_id: String,
    accuracy: f64,
    normalized_prediction: String,
    accuracy_evalai: f64,
    normalized_evalai: String,
}

#[derive(Deserialize)]
struct Group {
    accuracy: f64,
    count: usize,
}

#[derive(Deserialize)]
struct Fixture {
    accuracy: f64,
    accuracy_evalai: f64,
    count: usize,
    per_answer_type: std::collections::BTreeMap<String, Group>,
    per_category: std::collections::BTreeMap<String, Group>,
    questions: Vec<ExpectedQuestion>,
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(name)
}

fn check_fixture(pred: &str, answers: &str) {
    let f: Fixture = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("vqa_fixture.json")).expect("read"),
    )
    .expect("json");
    let examples = load_vqa_examples(&fixture_path(pred), &fixture_path(answers)).expect("load");
    let s = evaluate_vqa(&examples).expect("summary");
    assert_eq!(s.count, f.count);
    for (want, (id, got)) in f.questions.iter().zip(&s.questions) {
        assert_eq!(id.as_str(), want.question_id);
        assert!(
            (got.accuracy - want.accuracy).abs() < 1e-12,
            "question {id}: {} vs {}",
            got.accuracy,
            want.accuracy
        );
        assert_eq!(
            got.normalized_prediction, want.normalized_prediction,
            "question {id}"
        );
    }
    assert!((s.accuracy - f.accuracy).abs() < 1e-9);
    for (groups, want) in [
        (&s.per_answer_type, &f.per_answer_type),
        (&s.per_category, &f.per_category),
    ] {
        assert_eq!(groups.len(), want.len());
        for (k, g) in want {
            assert!((groups[k].accuracy - g.accuracy).abs() < 1e-9, "{k}");
            assert_eq!(groups[k].count, g.count, "{k}");
        }
    }
}

#[test]
fn matches_python_port_of_official_logic_jsonl_files() {
    check_fixture("vqa_pred.jsonl", "vqa_answers.jsonl");
}

#[test]
fn matches_python_port_of_official_logic_official_files() {
    // Official results array + official annotation file (question_type → category).
    check_fixture("vqa_results.json", "vqa_annotations.json");
}

#[test]
fn reads_the_official_question_file() {
    let q = read_vqa_questions(&fixture_path("vqa_questions.json")).expect("questions");
    assert_eq!(q.len(), 39);
    assert_eq!(q[0].id.as_str(), "1000");
    assert_eq!(q[0].value.image_id.as_str(), "42");
    assert_eq!(q[0].value.question, "Question 0?");
}

#[test]
fn evalai_processor_matches_python_port_of_m4c_evaluator() {
    let f: Fixture = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("vqa_fixture.json")).expect("read"),
    )
    .expect("json");
    let examples = load_vqa_examples(
        &fixture_path("vqa_pred.jsonl"),
        &fixture_path("vqa_answers.jsonl"),
    )
    .expect("load");
    let s = evaluate_vqa_with(&examples, VqaProcessor::EvalAi).expect("summary");
    for (want, (id, got)) in f.questions.iter().zip(&s.questions) {
        assert!(
            (got.accuracy - want.accuracy_evalai).abs() < 1e-12,
            "question {id}: {} vs {}",
            got.accuracy,
            want.accuracy_evalai
        );
        assert_eq!(
            got.normalized_prediction, want.normalized_evalai,
            "question {id}"
        );
    }
    assert!((s.accuracy - f.accuracy_evalai).abs() < 1e-9);
}

#[test]
fn evalai_processor_differs_where_documented() {
    // Lowercases and processes every ground truth: capitalised identical answers now match.
    let yes = ten(&[(10, "Yes")]);
    assert_eq!(
        score_vqa_answer_with("yes", &yes, VqaProcessor::EvalAi)
            .expect("score")
            .accuracy,
        1.0
    );
    // Deletes ',' and '?' before anything else, and splits "'s".
    assert_eq!(evalai_normalize("red,white?"), "redwhite");
    assert_eq!(evalai_normalize("The man's hat"), "man 's hat");
    assert_eq!(evalai_normalize("1,000"), "1000");
}

#[test]
fn accepted_forms_are_scored_by_exact_match_against_any() {
    use mmkd::scoring::ids::SampleId;
    use mmkd::scoring::vqa::{VqaExample, VqaScoring};
    let ex = |pred: &str| VqaExample {
        id: SampleId("q".into()),
        prediction: pred.into(),
        answers: vec!["3".into()],
        accepted: vec!["3".into(), "three".into()],
        answer_type: None,
        category: Some("count".into()),
    };
    // Under VQA's soft accuracy a synonym list would give a correct "3" only 1/3; any accepted
    // form is fully correct here, after the official normalization ("Three." → "3").
    for (pred, acc) in [
        ("3", 100.0),
        ("three", 100.0),
        ("Three.", 100.0),
        ("4", 0.0),
    ] {
        let s = evaluate_vqa(&[ex(pred)]).unwrap();
        assert_eq!(s.accuracy, acc, "{pred}");
        assert_eq!(s.questions[0].1.scoring, VqaScoring::AnyAccepted);
        assert_eq!(s.exact_match_count, 1);
    }
}
