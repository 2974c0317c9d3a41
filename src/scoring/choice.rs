//! Multiple-choice scoring (ScienceQA, MMBench, SEED style): options are lettered A, B, C, …
//!
//! Two ways to score:
//! - **Generated letter**: [`extract_choice`] reads the option a model named in free text.
//! - **Option likelihood**: [`pick_by_likelihood`] takes, per option, the log-probability the
//!   model assigns to the option's continuation tokens given the prompt (sum over those tokens)
//!   and picks the argmax — either of the sum, or of the mean per token (length-normalized, which
//!   avoids favouring short options). Ties go to the earliest option.

use anyhow::{bail, Result};
use serde::Serialize;

/// Which rule recognised the answer (kept so evaluation reports can show how answers were read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChoiceRule {
    /// The whole answer is a letter, possibly bracketed or followed by '.', ':' or ')'.
    BareLetter,
    /// The answer starts with a delimited letter: "B. cat", "(B) cat", "B) cat", "B: cat".
    LeadingLetter,
    /// An explicit phrase: "the answer is B", "Answer: (B)", "option B", "choice B".
    AnswerPhrase,
    /// Exactly one standalone option letter appears in the text.
    LoneLetter,
    /// The answer equals one option's text, or contains exactly one option's text.
    OptionText,
}

/// A recognised choice: index into the options (0 = A) and the rule that found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExtractedChoice {
    pub index: usize,
    pub rule: ChoiceRule,
}

impl ExtractedChoice {
    pub fn letter(&self) -> char {
        option_letter(self.index)
    }
}

/// The letter of option `index` (0 → 'A').
pub fn option_letter(index: usize) -> char {
    (b'A' + (index % 26) as u8) as char
}

fn letter_index(c: char, num_options: usize) -> Option<usize> {
    let i = (c as u32).checked_sub('A' as u32)? as usize;
    (c.is_ascii_uppercase() && i < num_options).then_some(i)
}

const WRAPPERS: &[char] = &['(', ')', '[', ']', '.', ',', ':', ';', '*', '"', '\''];

/// A word that is exactly one option letter once wrapping punctuation is removed.
fn word_letter(word: &str, num_options: usize) -> Option<usize> {
    let core = word.trim_matches(WRAPPERS);
    let mut chars = core.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => letter_index(c, num_options),
        _ => None,
    }
}

fn bare_letter(text: &str, num_options: usize) -> Option<usize> {
    let t = text
        .trim()
        .trim_end_matches(['.', ':', ')'])
        .trim_start_matches('(');
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => letter_index(c, num_options),
        _ => None,
    }
}

fn leading_letter(text: &str, num_options: usize) -> Option<usize> {
    let t = text.trim_start();
    let chars: Vec<char> = t.chars().take(4).collect();
    // "(B) ..." / "(B)..."
    if chars.len() >= 3 && chars[0] == '(' && chars[2] == ')' {
        return letter_index(chars[1], num_options);
    }
    // "B. ...", "B) ...", "B: ..." — a delimiter is required so that "A man" is not option A.
    if chars.len() >= 2 && matches!(chars[1], '.' | ')' | ':') {
        let after = chars.get(2);
        // "B.5" or "A.M." are not option labels.
        if after.is_none_or(|c| c.is_whitespace()) {
            return letter_index(chars[0], num_options);
        }
    }
    None
}

fn answer_phrase(text: &str, num_options: usize) -> Option<usize> {
    let words: Vec<&str> = text.split_whitespace().collect();
    const CUES: [&str; 4] = ["answer", "option", "choice", "answer:"];
    for (i, w) in words.iter().enumerate() {
        let cue = w.to_lowercase();
        let cue = cue.trim_matches(['(', ')', '"', '*', ',']);
        if !CUES.contains(&cue) && !cue.ends_with("answer:") {
            continue;
        }
        // Skip linking words: "the answer is (B)", "the correct option is: B", "answer: B".
        let mut j = i + 1;
        while j < words.len()
            && matches!(
                words[j].to_lowercase().as_str(),
                "is" | "is:" | "would" | "be" | "should" | ":" | "-" | "="
            )
        {
            j += 1;
        }
        if let Some(idx) = words.get(j).and_then(|w| word_letter(w, num_options)) {
            return Some(idx);
        }
    }
    None
}

fn lone_letter(text: &str, num_options: usize) -> Option<usize> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut found: Option<usize> = None;
    for (i, w) in words.iter().enumerate() {
        let Some(idx) = word_letter(w, num_options) else {
            continue;
        };
        // "A" and "I" followed by a lowercase word are the article / pronoun, not an option.
        let plain = w.trim_matches(WRAPPERS) == *w;
        let next_lower = words
            .get(i + 1)
            .and_then(|n| n.chars().next())
            .is_some_and(|c| c.is_lowercase());
        if plain && matches!(*w, "A" | "I") && next_lower {
            continue;
        }
        match found {
            Some(prev) if prev != idx => return None,
            _ => found = Some(idx),
        }
    }
    found
}

fn simplify(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    lowered.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn option_text(text: &str, options: &[String]) -> Option<usize> {
    let answer = simplify(text);
    if answer.is_empty() {
        return None;
    }
    let simplified: Vec<String> = options.iter().map(|o| simplify(o)).collect();
    if let Some(i) = simplified.iter().position(|o| *o == answer) {
        return Some(i);
    }
    let padded = format!(" {answer} ");
    let contained: Vec<usize> = simplified
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.is_empty() && padded.contains(&format!(" {o} ")))
        .map(|(i, _)| i)
        .collect();
    match contained.as_slice() {
        [only] => Some(*only),
        _ => None,
    }
}

/// Read the option a generated answer names. `options` are the option texts in letter order.
/// Rules are tried in the order of [`ChoiceRule`]; `None` when no rule gives a single answer.
pub fn extract_choice(answer: &str, options: &[String]) -> Option<ExtractedChoice> {
    let n = options.len().min(26);
    let found = |index, rule| Some(ExtractedChoice { index, rule });
    if let Some(i) = bare_letter(answer, n) {
        return found(i, ChoiceRule::BareLetter);
    }
    if let Some(i) = leading_letter(answer, n) {
        return found(i, ChoiceRule::LeadingLetter);
    }
    if let Some(i) = answer_phrase(answer, n) {
        return found(i, ChoiceRule::AnswerPhrase);
    }
    if let Some(i) = lone_letter(answer, n) {
        return found(i, ChoiceRule::LoneLetter);
    }
    option_text(answer, options).and_then(|i| found(i, ChoiceRule::OptionText))
}

/// One option's likelihood under the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptionLogLikelihood {
    /// Σ log p(token | prompt, earlier option tokens) over the option's tokens.
    pub sum_logprob: f64,
    pub num_tokens: usize,
}

/// How options' likelihoods are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LikelihoodRule {
    /// Total log-probability of the option tokens.
    Sum,
    /// Log-probability per token (length-normalized).
    MeanPerToken,
}

/// Index of the most likely option. Errors on no options, a non-finite log-probability, or an
/// option with zero tokens under `MeanPerToken`.
pub fn pick_by_likelihood(options: &[OptionLogLikelihood], rule: LikelihoodRule) -> Result<usize> {
    if options.is_empty() {
        bail!("no options to choose from");
    }
    let mut best: Option<(usize, f64)> = None;
    for (i, o) in options.iter().enumerate() {
        if !o.sum_logprob.is_finite() {
            bail!(
                "option {} has a non-finite log-probability {}",
                option_letter(i),
                o.sum_logprob
            );
        }
        let score = match rule {
            LikelihoodRule::Sum => o.sum_logprob,
            LikelihoodRule::MeanPerToken => {
                if o.num_tokens == 0 {
                    bail!("option {} has no tokens", option_letter(i));
                }
                o.sum_logprob / o.num_tokens as f64
            }
        };
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((i, score));
        }
    }
    Ok(best.map(|(i, _)| i).unwrap_or(0))
}

/// One multiple-choice question to score from a generated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceExample {
    pub answer: String,
    pub options: Vec<String>,
    /// Index of the correct option.
    pub correct: usize,
}

/// Accuracy over generated answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChoiceSummary {
    /// In [0, 100]; unreadable answers count as wrong.
    pub accuracy: f64,
    pub count: usize,
    pub correct: usize,
    /// Answers no rule could read.
    pub unreadable: usize,
}

pub fn evaluate_choices(examples: &[ChoiceExample]) -> Result<ChoiceSummary> {
    if examples.is_empty() {
        bail!("no multiple-choice questions to score");
    }
    let mut correct = 0;
    let mut unreadable = 0;
    for (i, ex) in examples.iter().enumerate() {
        if ex.correct >= ex.options.len() {
            bail!(
                "question {i}: correct option index {} but only {} options",
                ex.correct,
                ex.options.len()
            );
        }
        match extract_choice(&ex.answer, &ex.options) {
            Some(c) if c.index == ex.correct => correct += 1,
            Some(_) => {}
            None => unreadable += 1,
        }
    }
    Ok(ChoiceSummary {
        accuracy: 100.0 * correct as f64 / examples.len() as f64,
        count: examples.len(),
        correct,
        unreadable,
    })
}
