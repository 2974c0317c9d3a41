//! Python string semantics the reference evaluation scripts rely on.
//!
//! The official VQA and COCO caption scripts are Python; their behaviour depends on
//! `str.isspace`, `str.split()`, `str.strip()` and the regex class `\d`. Rust's
//! definitions differ in small ways (`char::is_whitespace` lacks U+001C..U+001F,
//! `is_ascii_digit` lacks non-Latin decimal digits), so the exact Python sets live here.

/// First code point of every run of ten decimal digits (Unicode category Nd, Unicode 14,
/// as in Python 3.11). Every Nd character is `zero + k` for one of these and `k < 10`.
const DECIMAL_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650,
    0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50,
    0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// Python's `\d` for `str` patterns: a Unicode decimal digit (category Nd).
pub fn is_decimal_digit(c: char) -> bool {
    let cp = c as u32;
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    // Find the last zero <= cp; the digit belongs to its run when within ten of it.
    match DECIMAL_ZEROS.binary_search(&cp) {
        Ok(_) => true,
        Err(0) => false,
        Err(i) => cp - DECIMAL_ZEROS[i - 1] < 10,
    }
}

/// Python's `str.isspace` for one character.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` without arguments: split on runs of whitespace, no empty pieces.
pub fn py_split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|w| !w.is_empty())
}

/// Python's `str.strip()` without arguments.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits_match_python_nd() {
        assert!(is_decimal_digit('0') && is_decimal_digit('9'));
        assert!(is_decimal_digit('\u{663}')); // ARABIC-INDIC DIGIT THREE
        assert!(is_decimal_digit('\u{FF19}')); // FULLWIDTH DIGIT NINE
        assert!(!is_decimal_digit('\u{B2}')); // SUPERSCRIPT TWO is No, not Nd
        assert!(!is_decimal_digit('\u{BD}')); // VULGAR FRACTION ONE HALF
        assert!(!is_decimal_digit('a'));
        assert!(!is_decimal_digit('\u{65F}'));
    }

    #[test]
    fn whitespace_matches_python_isspace() {
        assert!(is_py_space('\u{1f}') && is_py_space('\u{a0}') && is_py_space('\u{3000}'));
        assert!(!is_py_space('\u{200b}'));
        let words: Vec<&str> = py_split_whitespace("  a\u{1c}b\t\nc  ").collect();
        assert_eq!(words, ["a", "b", "c"]);
        assert_eq!(py_strip("\u{1d} x y \n"), "x y");
    }
}
