//! A tiny regular-expression engine with the semantics a JFlex lexer needs: for a pattern and a
//! start position it returns *every* position where a match can end, so the lexer can take the
//! longest match over all rules (and check trailing context after each candidate end).
//!
//! Literals are ASCII-caseless (JFlex `%caseless`); character classes are case-sensitive, as in
//! JFlex, where `%caseless` does not reach inside classes.

use std::collections::HashSet;

/// A pattern over a slice of chars.
#[derive(Debug, Clone)]
pub enum Re {
    /// One character satisfying the predicate.
    Pred(fn(char) -> bool),
    /// One character from the set.
    AnyOf(&'static str),
    /// One character not in the set.
    NoneOf(&'static str),
    /// A literal, ASCII-case-insensitive.
    Lit(&'static str),
    Seq(Vec<Re>),
    Alt(Vec<Re>),
    /// `min..=max` repetitions (`None` = unbounded). The inner pattern must not match empty.
    Rep(Box<Re>, usize, Option<usize>),
}

pub fn lit(s: &'static str) -> Re {
    Re::Lit(s)
}
pub fn any_of(s: &'static str) -> Re {
    Re::AnyOf(s)
}
pub fn none_of(s: &'static str) -> Re {
    Re::NoneOf(s)
}
pub fn pred(f: fn(char) -> bool) -> Re {
    Re::Pred(f)
}
pub fn seq(parts: Vec<Re>) -> Re {
    Re::Seq(parts)
}
pub fn alt(parts: Vec<Re>) -> Re {
    Re::Alt(parts)
}
pub fn rep(r: Re, min: usize, max: Option<usize>) -> Re {
    Re::Rep(Box::new(r), min, max)
}
pub fn opt(r: Re) -> Re {
    rep(r, 0, Some(1))
}
pub fn star(r: Re) -> Re {
    rep(r, 0, None)
}
pub fn plus(r: Re) -> Re {
    rep(r, 1, None)
}
/// Alternatives of caseless literals.
pub fn lits(words: &[&'static str]) -> Re {
    alt(words.iter().map(|w| lit(w)).collect())
}

fn sorted_unique(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

impl Re {
    /// Whether the pattern matches the empty string.
    pub fn nullable(&self) -> bool {
        match self {
            Re::Pred(_) | Re::AnyOf(_) | Re::NoneOf(_) => false,
            Re::Lit(w) => w.is_empty(),
            Re::Seq(parts) => parts.iter().all(Re::nullable),
            Re::Alt(parts) => parts.iter().any(Re::nullable),
            Re::Rep(inner, min, _) => *min == 0 || inner.nullable(),
        }
    }

    /// Whether a non-empty match can start with `c` (a cheap filter before [`Re::ends`]).
    pub fn can_start(&self, c: char) -> bool {
        match self {
            Re::Pred(f) => f(c),
            Re::AnyOf(set) => set.contains(c),
            Re::NoneOf(set) => !set.contains(c),
            Re::Lit(w) => w.chars().next().is_some_and(|f| f.eq_ignore_ascii_case(&c)),
            Re::Seq(parts) => {
                for p in parts {
                    if p.can_start(c) {
                        return true;
                    }
                    if !p.nullable() {
                        return false;
                    }
                }
                false
            }
            Re::Alt(parts) => parts.iter().any(|p| p.can_start(c)),
            Re::Rep(inner, _, _) => inner.can_start(c),
        }
    }

    /// Whether the pattern always matches exactly one character (a class or a union of classes).
    fn is_single_char(&self) -> bool {
        match self {
            Re::Pred(_) | Re::AnyOf(_) | Re::NoneOf(_) => true,
            Re::Alt(parts) => parts.iter().all(Re::is_single_char),
            _ => false,
        }
    }

    fn matches_char(&self, c: char) -> bool {
        match self {
            Re::Pred(f) => f(c),
            Re::AnyOf(set) => set.contains(c),
            Re::NoneOf(set) => !set.contains(c),
            Re::Alt(parts) => parts.iter().any(|p| p.matches_char(c)),
            _ => false,
        }
    }

    /// All positions where a match starting at `start` can end (sorted, unique).
    pub fn ends(&self, text: &[char], start: usize) -> Vec<usize> {
        self.step(text, &[start])
    }

    fn step(&self, text: &[char], starts: &[usize]) -> Vec<usize> {
        match self {
            Re::Pred(f) => one_char(text, starts, f),
            Re::AnyOf(set) => one_char(text, starts, |c| set.contains(c)),
            Re::NoneOf(set) => one_char(text, starts, |c| !set.contains(c)),
            Re::Lit(word) => {
                let n = word.chars().count();
                starts
                    .iter()
                    .copied()
                    .filter(|&s| {
                        s + n <= text.len()
                            && text[s..s + n]
                                .iter()
                                .zip(word.chars())
                                .all(|(a, b)| a.eq_ignore_ascii_case(&b))
                    })
                    .map(|s| s + n)
                    .collect()
            }
            Re::Seq(parts) => {
                let mut cur = starts.to_vec();
                for p in parts {
                    if cur.is_empty() {
                        break;
                    }
                    cur = p.step(text, &cur);
                }
                cur
            }
            Re::Alt(parts) => {
                let mut out = Vec::new();
                for p in parts {
                    if p.nullable() {
                        out.extend(p.step(text, starts));
                        continue;
                    }
                    // Skip alternatives that cannot start here (most of a long literal list).
                    let viable: Vec<usize> = starts
                        .iter()
                        .copied()
                        .filter(|&s| s < text.len() && p.can_start(text[s]))
                        .collect();
                    if !viable.is_empty() {
                        out.extend(p.step(text, &viable));
                    }
                }
                sorted_unique(out)
            }
            Re::Rep(inner, min, max) if inner.is_single_char() => {
                // Fast path for runs of one character class: scan each run once.
                let mut result = Vec::new();
                for &s in starts {
                    let limit = max.map_or(text.len(), |m| (s + m).min(text.len()));
                    let run = (s..limit)
                        .take_while(|&i| inner.matches_char(text[i]))
                        .count();
                    if run >= *min {
                        result.extend(s + min..=s + run);
                    }
                }
                sorted_unique(result)
            }
            Re::Rep(inner, min, max) => {
                let mut result: Vec<usize> = if *min == 0 {
                    starts.to_vec()
                } else {
                    Vec::new()
                };
                let mut seen: HashSet<usize> = result.iter().copied().collect();
                let mut frontier = starts.to_vec();
                let mut k = 0;
                while max.is_none_or(|m| k < m) && !frontier.is_empty() {
                    k += 1;
                    frontier = inner.step(text, &frontier);
                    if k >= *min {
                        // A position already reached after >= min repetitions was (or will be)
                        // expanded with at least as many repetitions left.
                        frontier.retain(|p| seen.insert(*p));
                        result.extend(frontier.iter().copied());
                    }
                }
                sorted_unique(result)
            }
        }
    }
}

fn one_char(text: &[char], starts: &[usize], ok: impl Fn(char) -> bool) -> Vec<usize> {
    starts
        .iter()
        .copied()
        .filter(|&s| s < text.len() && ok(text[s]))
        .map(|s| s + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn returns_every_end_position() {
        let digits = plus(pred(|c| c.is_ascii_digit()));
        assert_eq!(digits.ends(&chars("123a"), 0), vec![1, 2, 3]);
        assert_eq!(digits.ends(&chars("a"), 0), Vec::<usize>::new());
        let bounded = rep(any_of("ab"), 2, Some(3));
        assert_eq!(bounded.ends(&chars("abab"), 0), vec![2, 3]);
        assert_eq!(bounded.ends(&chars("ab"), 1), Vec::<usize>::new());
        // The general path (multi-char inner pattern) agrees with the single-class fast path.
        let pairs = rep(seq(vec![any_of("ab"), any_of("ab")]), 1, Some(2));
        assert_eq!(pairs.ends(&chars("ababa"), 0), vec![2, 4]);
        assert!(digits.can_start('7') && !digits.can_start('x'));
        let maybe_sign = seq(vec![opt(any_of("+-")), digits.clone()]);
        assert!(
            maybe_sign.can_start('-') && maybe_sign.can_start('3') && !maybe_sign.can_start('a')
        );
        let word = seq(vec![lit("can"), opt(lit("not"))]);
        assert_eq!(word.ends(&chars("CANNOT"), 0), vec![3, 6]);
        assert_eq!(none_of(" ").ends(&chars(" x"), 1), vec![2]);
    }
}
