//! PTB tokenization as pycocoevalcap's `PTBTokenizer` does it.
//!
//! pycocoevalcap joins all captions of one call (all references, or all candidates) with '\n'
//! (after replacing newlines inside captions by spaces), runs Stanford CoreNLP 3.4.1's
//! `PTBTokenizer -preserveLines -lowerCase` over that text, splits each output line on ' ' and
//! drops the tokens listed in [`PUNCTUATIONS`]. This module reproduces that pipeline in Rust.
//!
//! Observable behaviour worth knowing (all as in the reference):
//! - tokens are lowercased *after* PTB escaping, so parentheses become `-lrb-`/`-rrb-` (and
//!   square brackets `-lsb-`/`-rsb-`), which the (upper-case) punctuation list does not remove:
//!   they stay in the tokenized captions;
//! - clitics split off: `'s 'm 'd 're 've 'll n't`; "cannot" → "can not", "gonna" → "gon na";
//! - numbers (`1,000`, `3.5`, `10:30`, `12/25/2010`), hyphenated words and slash words stay whole;
//! - quotes become `` `` '' ` ' `` and are removed; a single letter or a known abbreviation
//!   followed by a period keeps its period ("a.", "no.", "etc.", "st."), and when such a token
//!   ends a sentence (the next caption starts with a capital) a separate "." follows — so the
//!   tokenization of a caption can depend on the first letter of the *next* caption;
//! - "5 1/2" is one token holding a no-break space, which BLEU and CIDEr (Python `str.split()`)
//!   then split in two while ROUGE-L (`split(" ")`) does not.
//!
//! Known deviations: characters outside the Basic Multilingual Plane (emoji) are deleted, as in the
//! jar, except inside a URL, where the jar keeps them (it sees two UTF-16 units); letters are
//! classified with today's Unicode tables rather than JFlex 1.4's; newline
//! characters other than '\n' inside a caption (`\r`, U+2028, …) are treated as spaces, whereas
//! pycocoevalcap would start a new line and misalign every later caption.

mod pattern;
mod rules;

use std::sync::OnceLock;

use rules::{Action, Rule};

/// Tokens pycocoevalcap removes after tokenization (compared after lowercasing, so the
/// upper-case bracket names never match).
pub const PUNCTUATIONS: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

fn all_rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(rules::rules)
}

/// One lexer step: the rule that won and how far its token and its whole match reach.
struct Match {
    rule: usize,
    token_end: usize,
}

fn longest_match(text: &[char], pos: usize) -> Option<Match> {
    let mut best: Option<(usize, Match)> = None;
    let first = text[pos];
    for (i, r) in all_rules().iter().enumerate() {
        if !r.pattern.can_start(first) {
            continue;
        }
        let ends = r.pattern.ends(text, pos);
        // Longest total length (token + trailing context) for this rule; ties → longer token.
        let mut candidate: Option<(usize, usize)> = None;
        for &e in ends.iter().rev() {
            if e == pos {
                continue;
            }
            let total = match &r.trail {
                None => Some(e),
                Some(t) => t.ends(text, e).last().copied(),
            };
            if let Some(total) = total {
                if candidate.is_none_or(|(bt, _)| total > bt) {
                    candidate = Some((total, e));
                }
            }
        }
        if let Some((total, token_end)) = candidate {
            if best.as_ref().is_none_or(|(bt, _)| total > *bt) {
                best = Some((total, Match { rule: i, token_end }));
            }
        }
    }
    best.map(|(_, m)| m)
}

fn latex_quotes(s: &str, left: bool) -> String {
    let (single, double) = if left { ("`", "``") } else { ("'", "''") };
    let s = s.replace("&apos;", single).replace("&quot;", double);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\'' => out.push_str(single),
            '"' => out.push_str(double),
            '\u{91}' | '\u{2018}' | '\u{201B}' | '\u{2039}' => out.push('`'),
            '\u{92}' | '\u{2019}' | '\u{203A}' => out.push('\''),
            '\u{93}' | '\u{201C}' | '\u{AB}' => out.push_str("``"),
            '\u{94}' | '\u{201D}' | '\u{BB}' => out.push_str("''"),
            other => out.push(other),
        }
    }
    out
}

fn replace_parens(s: &str) -> String {
    s.replace('(', "-LRB-").replace(')', "-RRB-")
}

fn replace_amp_entity(s: &str) -> String {
    // `(?i:&amp;)` → "&"
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.len() >= 5 && tail.is_char_boundary(5) && tail[..5].eq_ignore_ascii_case("&amp;") {
            out.push('&');
            rest = &tail[5..];
        } else {
            out.push('&');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The token a rule emits for its matched text, and how many chars of the match it consumes.
fn emit(action: Action, matched: &[char]) -> (Option<String>, usize) {
    let text: String = matched.iter().collect();
    let n = matched.len();
    let token = match action {
        Action::Keep => text,
        Action::Word => {
            let t: String = text.chars().filter(|&c| c != '\u{AD}').collect();
            if t.is_empty() {
                "-".to_string()
            } else {
                t
            }
        }
        Action::Emit(s) => s.to_string(),
        Action::Quote { left } => latex_quotes(&text, left),
        Action::NbspSpaces => text.replace(' ', "\u{A0}"),
        Action::Phone => replace_parens(&text.replace(' ', "\u{A0}")),
        Action::Smiley => replace_parens(&text),
        Action::Currency => text
            .replace('\u{A2}', "cents")
            .replace('\u{A3}', "#")
            .replace(['\u{80}', '\u{A4}', '\u{20A0}', '\u{20AC}'], "$"),
        // U+2154 (two thirds) is left alone: the reference maps U+2153 twice instead.
        Action::Fraction => text
            .replace('\u{BC}', "1/4")
            .replace('\u{BD}', "1/2")
            .replace('\u{BE}', "3/4")
            .replace('\u{2153}', "1/3"),
        Action::Amp => replace_amp_entity(&text),
        Action::PushBack(k) => {
            let keep = n.saturating_sub(k).max(1);
            return (Some(matched[..keep].iter().collect()), keep);
        }
        Action::KeepAndRepeatPeriod => return (Some(text), n.saturating_sub(1).max(1)),
        Action::Hyphens => {
            if (3..=4).contains(&n) {
                "--".to_string()
            } else {
                text
            }
        }
        Action::Newline | Action::Skip => return (None, n),
    };
    (Some(token), n)
}

/// Lex `text` as `PTBTokenizer -preserveLines -lowerCase` does: one token list per input line.
pub fn ptb_tokenize_lines(text: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = text.chars().collect();
    let rules = all_rules();
    let mut lines: Vec<Vec<String>> = vec![Vec::new()];
    let mut pos = 0;
    while pos < chars.len() {
        let Some(m) = longest_match(&chars, pos) else {
            // Untokenizable character: PTBLexer deletes it (after a warning).
            pos += 1;
            continue;
        };
        let action = rules[m.rule].action;
        if action == Action::Newline {
            lines.push(Vec::new());
        }
        let (token, consumed) = emit(action, &chars[pos..m.token_end]);
        if let Some(t) = token {
            if let Some(line) = lines.last_mut() {
                line.push(t.to_lowercase());
            }
        }
        pos += consumed;
    }
    lines
}

/// Each token with the name of the rule that produced it (for diagnosing tokenization
/// differences); newlines appear as `("newline", "\n")`.
pub fn ptb_trace(text: &str) -> Vec<(&'static str, String)> {
    let chars: Vec<char> = text.chars().collect();
    let rules = all_rules();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < chars.len() {
        let Some(m) = longest_match(&chars, pos) else {
            out.push(("untokenizable", chars[pos].to_string()));
            pos += 1;
            continue;
        };
        let rule = &rules[m.rule];
        let (token, consumed) = emit(rule.action, &chars[pos..m.token_end]);
        match (rule.action, token) {
            (Action::Newline, _) => out.push((rule.name, "\n".to_string())),
            (_, Some(t)) => out.push((rule.name, t)),
            (_, None) => {}
        }
        pos += consumed;
    }
    out
}

/// Tokenize captions exactly as one `PTBTokenizer.tokenize` call of pycocoevalcap: the captions
/// are lexed as one text (one per line, in order), punctuation tokens are removed and the rest
/// joined with single spaces.
pub fn tokenize_captions<S: AsRef<str>>(captions: &[S]) -> Vec<String> {
    let flat: Vec<String> = captions
        .iter()
        .map(|c| {
            c.as_ref()
                .chars()
                .map(|ch| if rules::is_newline(ch) { ' ' } else { ch })
                .collect()
        })
        .collect();
    let lines = ptb_tokenize_lines(&flat.join("\n"));
    (0..captions.len())
        .map(|i| {
            lines
                .get(i)
                .map(|toks| {
                    toks.iter()
                        .filter(|t| !PUNCTUATIONS.contains(&t.as_str()))
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        })
        .collect()
}
