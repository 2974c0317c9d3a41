//! POPE (counts checked by hand) and multiple-choice scoring.

use mmkd::scoring::choice::{
    evaluate_choices, extract_choice, pick_by_likelihood, ChoiceExample, ChoiceRule,
    LikelihoodRule, OptionLogLikelihood,
};
use mmkd::scoring::pope::{evaluate_pope, pope_answer_to_label, PopeExample, YesNo};

#[test]
fn pope_answer_rule_is_the_official_one() {
    use YesNo::*;
    let cases = [
        ("Yes, there is a dog in the image.", Yes),
        ("No, there is no dog.", No),
        ("There is not a dog in the image.", No),
        ("no", No),
        ("No.", No),
        ("no, it is a cat", No),
        // Only the first sentence counts.
        ("Yes. There is no cat.", Yes),
        // Case-sensitive, whole words split on spaces: these read as yes.
        ("NO", Yes),
        ("Not at all", Yes),
        ("no!", Yes),
        ("Nope", Yes),
        ("I don't think so", Yes),
        ("", Yes),
    ];
    for (answer, want) in cases {
        assert_eq!(pope_answer_to_label(answer), want, "{answer:?}");
    }
}

fn ex(answer: &str, label: YesNo, split: &str) -> PopeExample {
    PopeExample {
        answer: answer.into(),
        label,
        split: Some(split.into()),
    }
}

#[test]
fn pope_metrics_from_hand_counted_confusion() {
    use YesNo::*;
    // random:      TP TP FP TN FN      popular: TP TN TN FN FN
    let examples = vec![
        ex("Yes.", Yes, "random"),
        ex("Yes, there is.", Yes, "random"),
        ex("Yes", No, "random"),
        ex("No.", No, "random"),
        ex("There is not.", Yes, "random"),
        ex("yes", Yes, "popular"),
        ex("no", No, "popular"),
        ex("No", No, "popular"),
        ex("no", Yes, "popular"),
        ex("No, it is not.", Yes, "popular"),
    ];
    let s = evaluate_pope(&examples).expect("pope");
    // Overall: TP 3, FP 1, TN 3, FN 3.
    let c = s.overall.counts;
    assert_eq!(
        (c.true_pos, c.false_pos, c.true_neg, c.false_neg),
        (3, 1, 3, 3)
    );
    let (p, r) = (3.0 / 4.0, 3.0 / 6.0);
    assert!((s.overall.accuracy - 60.0).abs() < 1e-9);
    assert!((s.overall.precision - 100.0 * p).abs() < 1e-9);
    assert!((s.overall.recall - 100.0 * r).abs() < 1e-9);
    assert!((s.overall.f1 - 100.0 * 2.0 * p * r / (p + r)).abs() < 1e-9);
    assert!((s.overall.yes_ratio - 40.0).abs() < 1e-9);
    // random: TP 2, FP 1, TN 1, FN 1 → acc 60, precision 66.67, recall 66.67, yes 60.
    let rnd = &s.per_split["random"];
    assert!((rnd.accuracy - 60.0).abs() < 1e-9);
    assert!((rnd.precision - 200.0 / 3.0).abs() < 1e-9);
    assert!((rnd.recall - 200.0 / 3.0).abs() < 1e-9);
    assert!((rnd.yes_ratio - 60.0).abs() < 1e-9);
    // popular: TP 1, FP 0, TN 2, FN 2 → precision 100, recall 33.33, yes 20.
    let pop = &s.per_split["popular"];
    assert!((pop.precision - 100.0).abs() < 1e-9);
    assert!((pop.recall - 100.0 / 3.0).abs() < 1e-9);
    assert!((pop.f1 - 50.0).abs() < 1e-9);
    assert!((pop.yes_ratio - 20.0).abs() < 1e-9);
}

#[test]
fn pope_undefined_ratios_are_zero_not_nan() {
    let s = evaluate_pope(&[ex("no", YesNo::Yes, "adversarial")]).expect("pope");
    assert_eq!(
        (s.overall.precision, s.overall.recall, s.overall.f1),
        (0.0, 0.0, 0.0)
    );
    assert!(evaluate_pope(&[]).is_err());
}

fn opts(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|s| s.to_string()).collect()
}

#[test]
fn choice_letters_are_read_from_common_answer_forms() {
    let o = opts(&["a cat", "a dog", "a bird", "a fish"]);
    let cases = [
        ("B", 1, ChoiceRule::BareLetter),
        ("B.", 1, ChoiceRule::BareLetter),
        ("(C)", 2, ChoiceRule::BareLetter),
        (" D ", 3, ChoiceRule::BareLetter),
        ("B. a dog", 1, ChoiceRule::LeadingLetter),
        ("(A) a cat", 0, ChoiceRule::LeadingLetter),
        ("C) a bird", 2, ChoiceRule::LeadingLetter),
        ("The answer is C.", 2, ChoiceRule::AnswerPhrase),
        ("Answer: (D)", 3, ChoiceRule::AnswerPhrase),
        (
            "I think the correct option is B because dogs bark.",
            1,
            ChoiceRule::AnswerPhrase,
        ),
        ("It must be D, the fish.", 3, ChoiceRule::LoneLetter),
        ("a dog", 1, ChoiceRule::OptionText),
        ("It is a bird, clearly.", 2, ChoiceRule::OptionText),
    ];
    for (answer, index, rule) in cases {
        let got =
            extract_choice(answer, &o).unwrap_or_else(|| panic!("no choice read from {answer:?}"));
        assert_eq!((got.index, got.rule), (index, rule), "{answer:?}");
    }
}

#[test]
fn choice_extraction_refuses_ambiguous_or_foreign_answers() {
    let o = opts(&["cat", "dog", "bird"]);
    // "A" as an article is not option A; two options named; a letter beyond the options.
    assert_eq!(extract_choice("A horse", &o), None);
    assert_eq!(extract_choice("B or C", &o), None);
    assert_eq!(extract_choice("E", &o), None);
    assert_eq!(extract_choice("a cat and a dog", &o), None);
    assert_eq!(extract_choice("", &o), None);
    // The article does not hide a real option letter later on.
    assert_eq!(extract_choice("A dog, so B", &o).map(|c| c.index), Some(1));
}

#[test]
fn choice_accuracy_counts_unreadable_answers_as_wrong() {
    let o = opts(&["red", "green"]);
    let ex = |a: &str, correct| ChoiceExample {
        answer: a.into(),
        options: o.clone(),
        correct,
    };
    let s = evaluate_choices(&[ex("A", 0), ex("B", 0), ex("maybe", 1), ex("green", 1)])
        .expect("summary");
    assert_eq!((s.count, s.correct, s.unreadable), (4, 2, 1));
    assert!((s.accuracy - 50.0).abs() < 1e-12);
    assert!(evaluate_choices(&[ex("A", 5)]).is_err());
}

#[test]
fn likelihood_scoring_picks_the_argmax() {
    let opt = |sum_logprob: f64, num_tokens| OptionLogLikelihood {
        sum_logprob,
        num_tokens,
    };
    // Sum favours the short option; the per-token mean favours the long, fluent one.
    let options = [opt(-2.0, 1), opt(-3.0, 6)];
    assert_eq!(
        pick_by_likelihood(&options, LikelihoodRule::Sum).expect("pick"),
        0
    );
    assert_eq!(
        pick_by_likelihood(&options, LikelihoodRule::MeanPerToken).expect("pick"),
        1
    );
    // Ties go to the earliest option.
    assert_eq!(
        pick_by_likelihood(&[opt(-1.0, 1), opt(-1.0, 1)], LikelihoodRule::Sum).expect("pick"),
        0
    );
    assert!(pick_by_likelihood(&[], LikelihoodRule::Sum).is_err());
    assert!(pick_by_likelihood(&[opt(f64::NAN, 1)], LikelihoodRule::Sum).is_err());
    assert!(pick_by_likelihood(&[opt(-1.0, 0)], LikelihoodRule::MeanPerToken).is_err());
}
