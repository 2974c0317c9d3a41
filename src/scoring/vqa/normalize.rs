//! Answer normalization of the official VQA evaluation (`vqaEval.py`, GT-Vision-Lab/VQA master).
//!
//! Which processor this is, and how it differs from the others in use:
//! - **Followed by default: the official `vqaEval.py`** (the VQAv2 challenge script). The prediction is
//!   cleaned (newlines/tabs → space, strip), then `processPunctuation`, then
//!   `processDigitArticle`. Ground-truth answers are left untouched when all of a question's
//!   answers are identical, and get `processPunctuation` only (no lowercasing, no number words,
//!   no articles, no contractions) when they disagree. A prediction therefore matches a ground-truth
//!   answer only if its fully normalized form equals that answer's (punctuation-processed) text.
//! - **EvalAI's `EvalAIAnswerProcessor`** (used by LLaVA's `m4c_evaluator.py` for TextVQA and by the
//!   EvalAI server): first lowercases, deletes `,` and `?`, splits `'s` off as ` 's`, strips; then
//!   the same punctuation / digit-article steps; and it processes **every** ground-truth answer
//!   with the full pipeline, whether or not the answers agree. The two disagree e.g. when ground
//!   truths are capitalised ("Yes" × 10 never matches in vqaEval.py, always in EvalAI).
//!   It is available here as [`VqaProcessor::EvalAi`] (for TextVQA numbers comparable to LLaVA's).
//! - An older revision of `vqaEval.py` had a different punctuation list (with `'` and `:`, without
//!   `{ } - !`); the master revision's list is used here.
//!
//! Two literal quirks of the official script are kept: the period rule's `re.sub` receives
//! `re.UNICODE` (= 32) as its `count`, so at most 32 periods are removed; and the contraction table
//! has keys with capitals (`Im`, `Ive`, `Id've`, `I'dve`) that can never match the lowercased words.

use super::super::pytext::{is_decimal_digit, py_split_whitespace, py_strip};

/// The punctuation marks `processPunctuation` handles (period and apostrophe are not among them).
pub const PUNCTUATION: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `periodStrip` is applied through `re.sub(..., re.UNICODE)`, whose third argument is `count`.
pub const MAX_PERIODS_REMOVED: usize = 32;

/// Number words mapped to digits (`manualMap`).
pub const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// Words dropped by `processDigitArticle`.
pub const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// The official contraction table: a word written without its apostrophe(s) → the contraction.
/// Kept verbatim in content, including `somebody'd → somebodyd` (reversed in the original) and the
/// capitalised keys that can never match.
pub const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

fn lookup<'a>(table: &'a [(&'a str, &'a str)], word: &str) -> Option<&'a str> {
    table.iter().find(|(k, _)| *k == word).map(|(_, v)| *v)
}

/// Which answer processor to apply (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VqaProcessor {
    /// The official `vqaEval.py`: full normalization of the prediction, ground truths
    /// punctuation-processed only when they disagree.
    #[default]
    Official,
    /// EvalAI's `EvalAIAnswerProcessor` (LLaVA's `m4c_evaluator.py`): lowercase, drop ',' and
    /// '?', split "'s", then the same steps; applied to the prediction and every ground truth.
    EvalAi,
}

/// `commaStrip` = `(\d)(,)(\d)`: does the text contain digit, comma, digit anywhere?
fn has_digit_comma_digit(chars: &[char]) -> bool {
    chars
        .windows(3)
        .any(|w| is_decimal_digit(w[0]) && w[1] == ',' && is_decimal_digit(w[2]))
}

/// EvalAI's `COMMA_STRIP` = `(?<=\d)(\,)+(?=\d)`: a digit, one or more commas, a digit.
fn has_digit_commas_digit(chars: &[char]) -> bool {
    chars.iter().enumerate().any(|(i, &c)| {
        if !is_decimal_digit(c) {
            return false;
        }
        let commas = chars[i + 1..].iter().take_while(|&&x| x == ',').count();
        commas > 0
            && chars
                .get(i + 1 + commas)
                .is_some_and(|&d| is_decimal_digit(d))
    })
}

/// `processPunctuation`. For each mark: if the *original* text has the mark next to a space
/// (`p + ' '` or `' ' + p`), or the original text contains digit,digit anywhere, every occurrence
/// of the mark is deleted; otherwise every occurrence becomes a space. Then periods not followed
/// by a digit are deleted (at most [`MAX_PERIODS_REMOVED`]). Case is untouched.
pub fn process_punctuation(text: &str) -> String {
    let original: Vec<char> = text.chars().collect();
    punctuation_with(text, has_digit_comma_digit(&original))
}

fn punctuation_with(text: &str, digit_comma_digit: bool) -> String {
    let original: Vec<char> = text.chars().collect();
    let mut out = text.to_string();
    for p in PUNCTUATION {
        let touches_space = original
            .windows(2)
            .any(|w| (w[0] == p && w[1] == ' ') || (w[0] == ' ' && w[1] == p));
        let replacement = if touches_space || digit_comma_digit {
            ""
        } else {
            " "
        };
        if out.contains(p) {
            out = out.replace(p, replacement);
        }
    }
    strip_periods(&out)
}

/// `periodStrip` = `(?!<=\d)(\.)(?!\d)`. The first group is a (mistyped) negative *lookahead* for
/// "<=" + digit, which can never match at a '.', so the rule is: delete '.' unless the next
/// character is a digit; lookahead sees the unmodified string, as `re.sub` does.
fn strip_periods(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let next_is_digit = chars.get(i + 1).is_some_and(|&n| is_decimal_digit(n));
        if c == '.' && !next_is_digit && removed < MAX_PERIODS_REMOVED {
            removed += 1;
            continue;
        }
        out.push(c);
    }
    out
}

/// `processDigitArticle`: lowercase, split on whitespace, number words → digits, drop articles,
/// restore contractions, join with single spaces.
pub fn process_digit_article(text: &str) -> String {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = py_split_whitespace(&lowered)
        .map(|w| lookup(&NUMBER_WORDS, w).unwrap_or(w))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| lookup(&CONTRACTIONS, w).unwrap_or(w))
        .collect();
    words.join(" ")
}

/// The full treatment of a model's answer: newlines and tabs → space, strip, punctuation,
/// digits/articles/contractions.
pub fn normalize_prediction(answer: &str) -> String {
    let flat = answer.replace(['\n', '\t'], " ");
    process_digit_article(&process_punctuation(py_strip(&flat)))
}

/// EvalAI's full answer processing (`EvalAIAnswerProcessor.__call__`), used for predictions
/// and ground truths alike.
pub fn evalai_normalize(answer: &str) -> String {
    // word_tokenize: lowercase, delete ',' and '?', split "'s", strip.
    let lowered = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let flat = py_strip(&lowered).replace(['\n', '\t'], " ");
    let text = py_strip(&flat);
    let chars: Vec<char> = text.chars().collect();
    process_digit_article(&punctuation_with(text, has_digit_commas_digit(&chars)))
}

/// Ground-truth answers as the official script compares them: unchanged when all answers are
/// identical, punctuation-processed (only) when they disagree.
pub fn process_ground_truths(answers: &[String]) -> Vec<String> {
    let all_same = answers.windows(2).all(|w| w[0] == w[1]);
    if all_same {
        answers.to_vec()
    } else {
        answers.iter().map(|a| process_punctuation(a)).collect()
    }
}
