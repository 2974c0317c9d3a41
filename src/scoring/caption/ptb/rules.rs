//! The token rules of Stanford CoreNLP 3.4.1's `PTBLexer` (the tokenizer pycocoevalcap runs), in
//! its options as `PTBTokenizer -preserveLines -lowerCase` sets them: PTB3 escaping of brackets
//! and quotes, no Americanization, no escaping of `/` and `*`.
//!
//! The lexer semantics are JFlex's: at each position every rule is tried, the longest match wins
//! (trailing context counts towards the length but is not consumed), ties go to the earlier rule.
//! The rule list and the character classes were reconstructed from the PTBLexer specification's
//! documented behaviour and checked against the 3.4.1 jar: the committed fixture
//! (`tests/eval_ptb_tokenizer.rs`, 860 lines) matches exactly, and during development ~100,000
//! generated caption-like and noise lines differed only where a URL contains a character outside
//! the Basic Multilingual Plane (the jar sees two UTF-16 units there).

use super::pattern::*;
use crate::scoring::pytext::is_decimal_digit;

/// What a rule does with the text it matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Emit the text as is.
    Keep,
    /// Emit the text without soft hyphens (U+00AD).
    Word,
    /// Emit a fixed string.
    Emit(&'static str),
    /// Quote characters → LaTeX quotes; `left` when the quote probably opens.
    Quote { left: bool },
    /// Emit the text with spaces turned into non-breaking spaces (fractions, SGML).
    NbspSpaces,
    /// Phone numbers: spaces → U+00A0, parentheses → -LRB-/-RRB-.
    Phone,
    /// Emoticons: parentheses → -LRB-/-RRB-.
    Smiley,
    /// Currency symbols mapped to PTB's `$`, `#`, `cents`.
    Currency,
    /// Composed fraction characters spelled out (½ → 1/2).
    Fraction,
    /// `&amp;` → `&`.
    Amp,
    /// Give the last `n` chars back to the input (JFlex `yypushback`): "cannot" → "can" + "not".
    PushBack(usize),
    /// A run of hyphens: three or four become "--", others stay as they are.
    Hyphens,
    /// Emit the whole match (ending in '.') but consume all but the period, which then becomes a
    /// token of its own: PTBLexer's handling of an abbreviation that ends a sentence.
    KeepAndRepeatPeriod,
    /// A line break.
    Newline,
    /// Whitespace and characters the lexer deletes.
    Skip,
}

pub struct Rule {
    pub name: &'static str,
    pub pattern: Re,
    /// JFlex trailing context (`pattern/trail`): must follow, counts for length, not consumed.
    pub trail: Option<Re>,
    pub action: Action,
}

fn rule(name: &'static str, pattern: Re, action: Action) -> Rule {
    Rule {
        name,
        pattern,
        trail: None,
        action,
    }
}

fn rule_before(name: &'static str, pattern: Re, trail: Re, action: Action) -> Rule {
    Rule {
        name,
        pattern,
        trail: Some(trail),
        action,
    }
}

/// JFlex 1.4 works on UTF-16 units and its Unicode tables cover the Basic Multilingual Plane
/// only; characters beyond it are untokenizable (and deleted) in the jar.
fn in_bmp(c: char) -> bool {
    (c as u32) <= 0xFFFF
}

/// `[:letter:]` plus the combining marks and soft hyphen PTBLexer accepts inside words.
pub fn is_letter(c: char) -> bool {
    in_bmp(c) && (c.is_alphabetic() || ('\u{300}'..='\u{36F}').contains(&c) || c == '\u{AD}')
}
/// `[:letter:]` alone (used by apostrophe words).
fn is_plain_letter(c: char) -> bool {
    in_bmp(c) && c.is_alphabetic()
}
pub fn is_digit(c: char) -> bool {
    in_bmp(c) && is_decimal_digit(c)
}
fn is_letter_or_digit(c: char) -> bool {
    is_plain_letter(c) || is_digit(c)
}
fn is_ascii_upper(c: char) -> bool {
    c.is_ascii_uppercase()
}
fn is_ascii_alpha(c: char) -> bool {
    c.is_ascii_alphabetic()
}
fn is_ascii_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}
fn is_ascii_digit(c: char) -> bool {
    c.is_ascii_digit()
}
fn is_space(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t' | '\u{A0}' | '\u{2000}'..='\u{200A}' | '\u{3000}'
    )
}
pub fn is_newline(c: char) -> bool {
    matches!(
        c,
        '\r' | '\n' | '\u{2028}' | '\u{2029}' | '\u{B}' | '\u{C}' | '\u{85}'
    )
}
fn is_sub_sup_digit(c: char) -> bool {
    matches!(
        c,
        '\u{2070}' | '\u{B9}' | '\u{B2}' | '\u{B3}' | '\u{2074}'..='\u{2079}'
    )
}
fn is_subscript_digit(c: char) -> bool {
    ('\u{2080}'..='\u{2089}').contains(&c)
}
fn is_fraction_char(c: char) -> bool {
    matches!(c, '\u{BC}' | '\u{BD}' | '\u{BE}' | '\u{2153}'..='\u{215E}')
}
fn is_currency2(c: char) -> bool {
    matches!(
        c,
        '\u{A2}'
            | '\u{A3}'
            | '\u{A4}'
            | '\u{A5}'
            | '\u{80}'
            | '\u{20A0}'
            | '\u{20AC}'
            | '\u{60B}'
            | '\u{E3F}'
            | '\u{20A4}'
            | '\u{FFE0}'
            | '\u{FFE1}'
            | '\u{FFE5}'
            | '\u{FFE6}'
    )
}
fn is_misc_symbol(c: char) -> bool {
    matches!(c,
        '+' | '%' | '&' | '~' | '^' | '|' | '\\' | '\u{A6}' | '\u{A7}' | '\u{A8}' | '\u{A9}'
        | '\u{AC}' | '\u{AE}' | '\u{AF}' | '\u{B0}'..='\u{BA}' | '\u{D7}' | '\u{F7}' | '\u{387}'
        | '\u{5BE}' | '\u{5C0}' | '\u{5C3}' | '\u{5C6}' | '\u{5F3}' | '\u{5F4}'
        | '\u{600}'..='\u{603}' | '\u{606}'..='\u{60A}' | '\u{60C}' | '\u{614}' | '\u{61B}'
        | '\u{61E}' | '\u{66A}' | '\u{66D}' | '\u{703}'..='\u{70D}' | '\u{7F6}'..='\u{7F8}'
        | '\u{964}' | '\u{965}' | '\u{E4F}' | '\u{1FBD}' | '\u{2016}' | '\u{2017}'
        | '\u{2020}'..='\u{2023}' | '\u{2030}'..='\u{2038}' | '\u{203B}' | '\u{203E}'..='\u{2042}'
        | '\u{2044}' | '\u{207A}'..='\u{207F}' | '\u{208A}'..='\u{208E}' | '\u{2100}'..='\u{214F}'
        | '\u{2190}'..='\u{21FF}' | '\u{2200}'..='\u{2BFF}' | '\u{3012}' | '\u{30FB}'
        | '\u{FF01}'..='\u{FF0F}' | '\u{FF1A}'..='\u{FF20}' | '\u{FF3B}'..='\u{FF40}'
        | '\u{FF5B}'..='\u{FF65}')
}

fn letter() -> Re {
    // A letter, or an SGML entity for an accented vowel (&eacute;).
    alt(vec![
        pred(is_letter),
        seq(vec![
            lit("&"),
            any_of("aeiouAEIOU"),
            lits(&["acute", "grave", "uml"]),
            lit(";"),
        ]),
    ])
}
fn digit() -> Re {
    pred(is_digit)
}
fn space() -> Re {
    pred(is_space)
}
fn space_or_newline() -> Re {
    alt(vec![space(), newline()])
}
fn newline() -> Re {
    alt(vec![lit("\r\n"), pred(is_newline)])
}
fn apos() -> Re {
    alt(vec![any_of("'\u{92}\u{2019}"), lit("&apos;")])
}
/// Apostrophes plus the backquote and opening single quotes that appear inside words.
fn apos_etc() -> Re {
    alt(vec![apos(), any_of("`\u{91}\u{2018}\u{201B}")])
}
fn hyphen() -> Re {
    any_of("-_\u{58A}\u{2010}\u{2011}")
}

/// WORD: letters and digits starting with a letter, possibly joined by '.', '!' or '?'
/// followed by a letter ("umbrella.A", "Yahoo!Inc").
fn word() -> Re {
    let body = || seq(vec![letter(), star(alt(vec![letter(), digit()]))]);
    seq(vec![body(), star(seq(vec![any_of(".!?"), body()]))])
}
/// REDAUX: the clitics 's 'm 'd 're 've 'll.
fn redaux() -> Re {
    seq(vec![
        apos(),
        alt(vec![any_of("msdMSD"), lits(&["re", "ve", "ll"])]),
    ])
}
/// SWORD: a word that can carry n't (it cannot end in n itself).
fn sword() -> Re {
    seq(vec![
        star(alt(vec![pred(is_ascii_alpha), any_of("\u{AD}")])),
        pred(|c| c.is_ascii_alphabetic() && c != 'n' && c != 'N'),
        star(any_of("\u{AD}")),
    ])
}
fn sredaux() -> Re {
    seq(vec![lit("n"), apos_etc(), lit("t")])
}
fn apoword() -> Re {
    let letters = || star(pred(is_plain_letter));
    alt(vec![
        seq(vec![apos(), lit("n"), opt(apos())]),
        seq(vec![any_of("lLdDjJ"), apos()]),
        seq(vec![lit("Dunkin"), apos()]),
        seq(vec![lit("somethin"), apos()]),
        seq(vec![lit("ol"), apos()]),
        seq(vec![apos(), lit("em")]),
        seq(vec![
            pred(|c| matches!(c, 'A'..='H' | 'J'..='X' | 'Z' | 'n')),
            apos_etc(),
            pred(is_plain_letter),
            pred(is_plain_letter),
            letters(),
        ]),
        seq(vec![apos(), pred(|c| ('2'..='9').contains(&c)), lit("0s")]),
        seq(vec![apos(), lit("til"), opt(lit("l"))]),
        seq(vec![
            pred(is_plain_letter),
            letters(),
            any_of("aeiouyAEIOUY"),
            apos_etc(),
            pred(|c| matches!(c, 'a' | 'e' | 'i' | 'o' | 'u' | 'A'..='Z')),
            letters(),
        ]),
        seq(vec![apos(), lit("cause")]),
        seq(vec![lit("cont'd"), opt(lit("."))]),
        lits(&[
            "nor'easter",
            "c'mon",
            "e'er",
            "s'mores",
            "ev'ry",
            "li'l",
            "nat'l",
        ]),
    ])
}
fn num() -> Re {
    alt(vec![
        plus(digit()),
        seq(vec![
            star(digit()),
            plus(seq(vec![any_of(".:,\u{AD}\u{66B}\u{66C}"), plus(digit())])),
        ]),
    ])
}
fn number() -> Re {
    seq(vec![opt(any_of("-+")), num()])
}
fn date() -> Re {
    let d = |a, b| rep(digit(), a, Some(b));
    seq(vec![d(1, 2), any_of("-/"), d(1, 2), any_of("-/"), d(2, 4)])
}
fn frac() -> Re {
    let d = || rep(digit(), 1, Some(4));
    seq(vec![
        opt(seq(vec![d(), any_of("- \u{A0}")])),
        d(),
        alt(vec![seq(vec![opt(lit("\\")), lit("/")]), lit("\u{2044}")]),
        d(),
    ])
}
fn sub_sup_num() -> Re {
    seq(vec![
        opt(any_of("\u{207A}\u{207B}\u{208A}\u{208B}")),
        alt(vec![
            plus(pred(is_sub_sup_digit)),
            plus(pred(is_subscript_digit)),
        ]),
    ])
}
/// THING: letters/digits, optionally joined by hyphens, with d'/o'/l' prefixes.
fn thing() -> Re {
    let piece = || {
        seq(vec![
            opt(seq(vec![
                any_of("dDoOlL"),
                apos_etc(),
                pred(is_letter_or_digit),
            ])),
            plus(pred(is_letter_or_digit)),
        ])
    };
    seq(vec![piece(), star(seq(vec![hyphen(), piece()]))])
}
fn thing_a() -> Re {
    let caps = || plus(pred(is_ascii_upper));
    seq(vec![
        caps(),
        plus(seq(vec![alt(vec![any_of("+&"), lit("&amp;")]), caps()])),
    ])
}
/// THING3: slash-joined words ("and/or", "24/7"), at most three parts.
fn thing3() -> Re {
    let hyph = || rep(seq(vec![lit("-"), plus(pred(is_ascii_alpha))]), 0, Some(2));
    seq(vec![
        plus(pred(is_ascii_alnum)),
        hyph(),
        rep(
            seq(vec![
                opt(lit("\\")),
                lit("/"),
                plus(pred(is_ascii_alnum)),
                hyph(),
            ]),
            1,
            Some(2),
        ),
    ])
}
fn acro() -> Re {
    alt(vec![
        seq(vec![
            pred(is_ascii_alpha),
            plus(seq(vec![lit("."), pred(is_ascii_alpha)])),
        ]),
        seq(vec![
            lits(&["Canada", "Sino", "Korean", "EU", "Japan", "non"]),
            lit("-U.S"),
        ]),
        seq(vec![lit("U.S.-"), lits(&["U.K", "U.S.S.R"])]),
    ])
}
/// HTHING: hyphenated things whose first part may hold '.' and ','.
fn hthing() -> Re {
    seq(vec![
        pred(is_ascii_alnum),
        star(alt(vec![pred(is_ascii_alnum), any_of(".,\u{AD}")])),
        plus(seq(vec![
            lit("-"),
            alt(vec![
                plus(alt(vec![pred(is_ascii_alnum), any_of("\u{AD}")])),
                seq(vec![acro(), lit(".")]),
            ]),
        ])),
    ])
}
/// A case-sensitive first letter followed by a caseless rest, as `[A]rk` in the specification.
fn cap_then(first: &'static str, rest: &'static str) -> Re {
    seq(vec![any_of(first), lit(rest)])
}
/// ABBREV1: abbreviations usually followed by a lower-case word; before a capital (or a line
/// break and a capital) they also end the sentence. Some state names only with a capital.
fn abbrev1() -> Re {
    let names = alt(vec![
        // months, days
        lits(&[
            "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec",
        ]),
        lits(&["Mon", "Tue", "Tues", "Wed", "Thu", "Thurs", "Fri"]),
        // states
        lits(&[
            "Ala", "Ariz", "Calif", "Colo", "Conn", "Ct", "Dak", "Fla", "Ga", "Ind", "Kan", "Kans",
            "Ky", "Md", "Mich", "Minn", "Mo", "Mont", "Neb", "Nev", "Okla", "Penn", "Tenn", "Va",
            "Vt", "Wis", "Wisc", "Wyo",
        ]),
        cap_then("A", "z"),
        cap_then("A", "rk"),
        cap_then("D", "el"),
        cap_then("I", "ll"),
        cap_then("L", "a"),
        cap_then("M", "ass"),
        cap_then("M", "iss"),
        cap_then("O", "re"),
        cap_then("P", "a"),
        cap_then("T", "ex"),
        cap_then("W", "ash"),
        // companies
        lits(&[
            "Inc", "Co", "Cos", "Corp", "Ltd", "Plc", "Rt", "Bancorp", "Bhd", "Assn", "Univ",
            "Intl", "Sys",
        ]),
        seq(vec![
            lit("P"),
            opt(lit("p")),
            lit("t"),
            any_of("yeYE"),
            opt(lit("s")),
        ]),
        // numbers, names
        lits(&["tel", "est", "ext", "sq"]),
        lits(&["Jr", "Sr", "Bros", "Ed.D", "Ph.D", "Blvd", "Rd", "Esq"]),
        lits(&["etc", "al", "seq"]),
    ]);
    seq(vec![names, lit(".")])
}
/// ABBREV3: abbreviations recognised only right before a number ("no. 2", "fig. 3").
fn abbrev3() -> Re {
    seq(vec![
        lits(&[
            "ca", "fig", "figs", "prop", "no", "nos", "art", "arts", "bldg", "pp", "op",
        ]),
        lit("."),
    ])
}
/// ABBREV4: titles and the like, usually followed by a capitalised name (never end a sentence).
fn abbrev4() -> Re {
    alt(vec![
        pred(is_ascii_alpha),
        lits(&[
            "Mr", "Mrs", "Ms", "Dr", "Drs", "Prof", "Profs", "Sen", "Sens", "Rep", "Reps", "Atty",
            "Attys", "Lt", "Col", "Gen", "Messrs", "Gov", "Govs", "Adm", "Rev", "Maj", "Sgt",
            "Cpl", "Pvt", "Capt", "St", "Ste", "Ave", "Pres", "Lieut", "Hon", "Brig", "Cmdr",
            "Comdr", "Pfc", "Spc", "Supt", "Supts", "Det", "Mt", "Ft",
        ]),
        cap_then("M", "iss"),
        lits(&[
            "vs", "Alex", "Wm", "Jos", "Cie", "a.k.a", "cf", "TREAS", "Ph",
        ]),
        acro(),
        lits(&["Invt", "Elec", "Natl", "Mfg", "Mtg", "Dept"]),
    ])
}
/// Words after which an acronym's final period also ends the sentence ("... the U.S. The man").
/// Capital first letter required, rest caseless.
fn sentence_start_word() -> Re {
    alt(vec![
        cap_then("A", "bout"),
        cap_then("A", "ccording"),
        cap_then("A", "dditionally"),
        cap_then("A", "fter"),
        cap_then("A", "n"),
        any_of("A"),
        cap_then("A", "s"),
        cap_then("A", "t"),
        cap_then("B", "ut"),
        cap_then("E", "arlier"),
        cap_then("H", "e"),
        cap_then("H", "er"),
        cap_then("H", "ere"),
        cap_then("H", "owever"),
        cap_then("I", "f"),
        cap_then("I", "n"),
        cap_then("I", "t"),
        cap_then("L", "ast"),
        cap_then("M", "any"),
        cap_then("M", "ore"),
        cap_then("M", "r."),
        cap_then("M", "s."),
        cap_then("N", "ow"),
        cap_then("O", "nce"),
        cap_then("O", "ne"),
        cap_then("O", "ther"),
        cap_then("O", "ur"),
        cap_then("S", "he"),
        cap_then("S", "ince"),
        cap_then("S", "o"),
        cap_then("S", "ome"),
        cap_then("S", "uch"),
        cap_then("T", "hat"),
        cap_then("T", "he"),
        cap_then("T", "hen"),
        cap_then("T", "here"),
        cap_then("T", "hese"),
        cap_then("T", "hey"),
        cap_then("T", "his"),
        cap_then("W", "e"),
        cap_then("W", "hen"),
        cap_then("W", "hile"),
        cap_then("W", "hat"),
        cap_then("Y", "et"),
        cap_then("Y", "ou"),
    ])
}
/// SGML/XML tags: a name with optional attributes (`name`, `name=value`, quoted values), a
/// closing tag, or `<!...>` / `<?...>`. Not digits or commas after the name ("<a 1>" is no tag).
fn sgml() -> Re {
    let name = || {
        seq(vec![
            pred(is_ascii_alpha),
            star(pred(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c))),
        ])
    };
    let spaces = || star(lit(" "));
    let value = alt(vec![
        seq(vec![lit("'"), star(none_of("'")), lit("'")]),
        seq(vec![lit("\""), star(none_of("\"")), lit("\"")]),
        name(),
    ]);
    let attribute = seq(vec![
        plus(lit(" ")),
        alt(vec![
            name(),
            seq(vec![name(), spaces(), lit("="), spaces(), value]),
        ]),
    ]);
    seq(vec![
        lit("<"),
        alt(vec![
            seq(vec![
                any_of("!?"),
                pred(|c| c.is_ascii_alphabetic() || c == '-'),
                star(none_of(">\r\n")),
            ]),
            seq(vec![name(), star(attribute), spaces(), opt(lit("/"))]),
            seq(vec![lit("/"), name()]),
        ]),
        spaces(),
        lit(">"),
    ])
}
/// SENTEND: what follows an abbreviation that also ends a sentence.
fn sentence_end() -> Re {
    seq(vec![
        space_or_newline(),
        alt(vec![space_or_newline(), pred(is_ascii_upper), sgml()]),
    ])
}
fn phone() -> Re {
    let d = |a, b| rep(pred(is_ascii_digit), a, Some(b));
    let sep = || any_of("- \u{A0}");
    let plus_prefix = || opt(seq(vec![lit("+"), opt(lit("+"))]));
    alt(vec![
        seq(vec![
            alt(vec![
                seq(vec![lit("("), d(2, 3), lit(")"), opt(any_of(" \u{A0}"))]),
                seq(vec![
                    plus_prefix(),
                    opt(seq(vec![d(2, 4), sep()])),
                    d(2, 4),
                    sep(),
                ]),
            ]),
            d(3, 4),
            opt(sep()),
            d(3, 5),
        ]),
        seq(vec![
            opt(seq(vec![plus_prefix(), d(2, 4), lit(".")])),
            d(2, 4),
            lit("."),
            d(3, 4),
            lit("."),
            d(3, 5),
        ]),
    ])
}
fn smiley() -> Re {
    seq(vec![
        opt(any_of("<>")),
        any_of(":;="),
        opt(any_of("-o*'")),
        any_of("()DPdpO\\{@|[]"),
    ])
}
/// Asian-style emoticons: ^_^, -_-, (^.^), (x-x).
fn asian_smiley() -> Re {
    let eye = || any_of("-^x=~<>'");
    let eye_no_dash = || any_of("^x=~<>'");
    alt(vec![
        // The specification's first form reads `[\^x=~<>]\.\[\^x=~<>]`: a literal ".[" (so
        // "^.^" alone is not an emoticon).
        seq(vec![any_of("^x=~<>"), lit(".["), any_of("^x=~<>")]),
        seq(vec![eye(), lit("_"), eye()]),
        seq(vec![lit("("), eye(), opt(any_of("_.")), eye(), lit(")")]),
        seq(vec![
            lit("("),
            eye_no_dash(),
            lit("-"),
            any_of("^x=~<>'`"),
            lit(")"),
        ]),
    ])
}
fn full_url() -> Re {
    seq(vec![
        lit("http"),
        opt(lit("s")),
        lit("://"),
        plus(none_of(" \t\n\u{C}\r\"<>|(){}")),
        none_of(" \t\n\u{C}\r\"<>|.!?(){},-"),
    ])
}
fn likely_url() -> Re {
    // The second form's class excludes the range ','..='_' (digits, capitals, most ASCII
    // punctuation), as the specification's `,-_` range does.
    let label2 = || {
        plus(pred(|c| {
            !(" \t\n\u{C}\r\"`'<>|.!?(){}$".contains(c) || (','..='_').contains(&c))
        }))
    };
    let host = alt(vec![
        seq(vec![
            lit("www."),
            plus(seq(vec![
                plus(none_of(" \t\n\u{C}\r\"<>|.!?(){},")),
                lit("."),
            ])),
            rep(pred(is_ascii_alpha), 2, Some(4)),
        ]),
        seq(vec![
            plus(seq(vec![label2(), lit(".")])),
            lits(&["com", "net", "org", "edu"]),
        ]),
    ]);
    seq(vec![
        host,
        opt(seq(vec![
            lit("/"),
            plus(none_of(" \t\n\u{C}\r\"<>|()")),
            none_of(" \t\n\u{C}\r\"<>|.!?(){},-"),
        ])),
    ])
}
/// E-mail-like tokens: optionally in angle brackets, anything before '@' that is not a space,
/// bracket or quote, then dot-separated parts.
fn email() -> Re {
    let part = || plus(none_of(" \t\n\u{C}\r\"<>|(){}.\u{A0}"));
    seq(vec![
        opt(alt(vec![lit("&lt;"), lit("<")])),
        pred(is_ascii_alnum),
        star(none_of(" \t\n\u{C}\r\"<>|()\u{A0}{}")),
        lit("@"),
        star(seq(vec![part(), lit(".")])),
        part(),
        opt(alt(vec![lit("&gt;"), lit(">")])),
    ])
}
/// File names with a known extension ("5a.jpg"): letters/digits joined by dots.
fn filename() -> Re {
    let part = || plus(pred(is_letter_or_digit));
    seq(vec![
        part(),
        star(seq(vec![lit("."), part()])),
        lit("."),
        lits(&[
            "bat", "bmp", "c", "class", "cgi", "cpp", "dll", "doc", "docx", "exe", "gif", "gz",
            "h", "htm", "html", "jar", "java", "jpeg", "jpg", "mov", "mp3", "pdf", "php", "pl",
            "png", "ppt", "ps", "py", "sql", "tar", "txt", "wav", "x", "xml", "zip",
        ]),
    ])
}
fn twitter() -> Re {
    alt(vec![
        seq(vec![
            lit("@"),
            pred(|c| c.is_ascii_alphabetic() || c == '_'),
            star(pred(|c| c.is_ascii_alphanumeric() || c == '_')),
        ]),
        seq(vec![lit("#"), plus(letter())]),
    ])
}
fn dbl_quote() -> Re {
    alt(vec![lit("\""), lit("&quot;")])
}
fn quotes() -> Re {
    alt(vec![
        apos(),
        lit("''"),
        rep(
            any_of(
                "`\u{2018}\u{2019}\u{201A}\u{201B}\u{201C}\u{201D}\u{91}\u{92}\u{93}\u{94}\u{201E}\u{201F}\u{2039}\u{203A}\u{AB}\u{BB}",
            ),
            1,
            Some(2),
        ),
    ])
}
fn insent_punct() -> Re {
    any_of(",;:\u{3001}")
}
fn ldots() -> Re {
    alt(vec![
        rep(lit("."), 3, Some(5)),
        seq(vec![
            rep(seq(vec![lit("."), any_of(" \u{A0}")]), 2, Some(4)),
            lit("."),
        ]),
        any_of("\u{85}\u{2026}"),
    ])
}
fn tbspec() -> Re {
    alt(vec![
        seq(vec![
            lit("-"),
            lits(&["RRB", "LRB", "RCB", "LCB", "RSB", "LSB"]),
            lit("-"),
        ]),
        lits(&[
            "C.D.s",
            "pro-",
            "anti-",
            "S&P-500",
            "S&amp;P-500",
            "S&Ls",
            "S&amp;Ls",
        ]),
        seq(vec![lit("Cap"), apos(), lit("n")]),
        seq(vec![lit("c"), apos(), lit("est")]),
    ])
}

/// The rules in JFlex priority order.
pub fn rules() -> Vec<Rule> {
    use Action::*;
    let dot = || lit(".");
    vec![
        rule("assimilation3", lits(&["cannot", "'twas"]), PushBack(3)),
        rule(
            "assimilation2",
            lits(&["gonna", "gotta", "lemme", "gimme", "wanna", "'tis"]),
            PushBack(2),
        ),
        rule("sgml", sgml(), NbspSpaces),
        rule(
            "spmdash",
            alt(vec![
                lits(&["&MD;", "&mdash;", "&ndash;"]),
                any_of("\u{96}\u{97}\u{2013}\u{2014}\u{2015}"),
            ]),
            Emit("--"),
        ),
        rule("spamp", lit("&amp;"), Amp),
        rule(
            "sppunc",
            seq(vec![
                lit("&"),
                alt(vec![
                    lits(&["HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq"]),
                    seq(vec![lit("#"), plus(pred(is_ascii_digit))]),
                ]),
                lit(";"),
            ]),
            Keep,
        ),
        rule_before("word_before_clitic", word(), redaux(), Word),
        rule_before("sword_before_nt", sword(), sredaux(), Word),
        rule("word", word(), Word),
        rule("apoword", apoword(), Keep),
        rule_before(
            "apoword2",
            seq(vec![lit("y"), apos()]),
            pred(is_plain_letter),
            Keep,
        ),
        rule("full_url", full_url(), Keep),
        rule("likely_url", likely_url(), Keep),
        rule("email", email(), Keep),
        rule("twitter", twitter(), Keep),
        rule_before(
            "clitic",
            redaux(),
            pred(|c| !c.is_ascii_alphabetic()),
            Quote { left: false },
        ),
        rule("nt", sredaux(), Quote { left: false }),
        rule("date", date(), Keep),
        rule("number", number(), Word),
        rule("subsupnum", sub_sup_num(), Keep),
        rule("frac", frac(), NbspSpaces),
        rule("frac2", pred(is_fraction_char), Fraction),
        rule("tbspec", tbspec(), Amp),
        rule("thing3", thing3(), Keep),
        rule(
            "dolsign",
            alt(vec![
                seq(vec![star(pred(is_ascii_upper)), lit("$")]),
                lit("#"),
            ]),
            Keep,
        ),
        rule("dolsign2", pred(is_currency2), Currency),
        rule_before(
            "acronym_sentence_end",
            seq(vec![acro(), dot()]),
            seq(vec![
                plus(space_or_newline()),
                alt(vec![sentence_start_word(), sgml()]),
                space_or_newline(),
            ]),
            KeepAndRepeatPeriod,
        ),
        // A single letter with a period before such a word: the period alone ends the sentence.
        rule_before(
            "letter_sentence_end",
            seq(vec![pred(is_ascii_alpha), dot()]),
            seq(vec![
                plus(space_or_newline()),
                alt(vec![sentence_start_word(), sgml()]),
                space_or_newline(),
            ]),
            PushBack(1),
        ),
        // "Co. Ltd", "Pty. Limited": no sentence break before the company suffix.
        rule_before(
            "company_ltd",
            seq(vec![lits(&["Co", "Pty"]), lit(".")]),
            seq(vec![space(), lits(&["Ltd", "Limited"])]),
            Keep,
        ),
        rule_before(
            "abbrev3",
            abbrev3(),
            seq(vec![opt(space_or_newline()), digit()]),
            Keep,
        ),
        rule_before(
            "abbrev1_sentence_end",
            abbrev1(),
            sentence_end(),
            KeepAndRepeatPeriod,
        ),
        // Two more characters of context make ABBREV1 beat a short WORD: "etc.A" → "etc." "A".
        rule_before(
            "abbrev1_then_two",
            abbrev1(),
            seq(vec![none_of(""), none_of("")]),
            Keep,
        ),
        // Fewer than two characters left: the end of the text also ends the sentence.
        rule("abbrev1_at_end", abbrev1(), KeepAndRepeatPeriod),
        rule("abbrev2", seq(vec![abbrev4(), dot()]), Keep),
        rule_before("abbrev4", abbrev4(), space(), Keep),
        rule_before("acro", acro(), space_or_newline(), Keep),
        rule_before(
            "tbspec2",
            seq(vec![apos(), pred(is_ascii_digit), pred(is_ascii_digit)]),
            space_or_newline(),
            Keep,
        ),
        rule_before(
            "word_period",
            seq(vec![word(), dot()]),
            insent_punct(),
            Word,
        ),
        // After the abbreviations: "A.B.C." and "etc.x" are not file names.
        rule_before(
            "filename",
            filename(),
            alt(vec![space_or_newline(), any_of(".?!,")]),
            Keep,
        ),
        rule("phone", phone(), Phone),
        rule_before(
            "open_double_quote",
            dbl_quote(),
            pred(|c| c.is_ascii_alphanumeric() || c == '$'),
            Quote { left: true },
        ),
        rule("close_double_quote", dbl_quote(), Quote { left: false }),
        // Not followed by an ASCII letter or digit: "=D" in "=Dog" is no emoticon.
        rule_before(
            "smiley",
            smiley(),
            pred(|c| !c.is_ascii_alphanumeric()),
            Smiley,
        ),
        rule("asian_smiley", asian_smiley(), Smiley),
        rule("del", lit("\u{7F}"), Skip),
        rule("less_than", alt(vec![lit("<"), lit("&lt;")]), Emit("<")),
        rule("greater_than", alt(vec![lit(">"), lit("&gt;")]), Emit(">")),
        rule("open_square", lit("["), Emit("-LSB-")),
        rule("close_square", lit("]"), Emit("-RSB-")),
        rule("open_brace", lit("{"), Emit("-LCB-")),
        rule("close_brace", lit("}"), Emit("-RCB-")),
        rule("open_paren", lit("("), Emit("-LRB-")),
        rule("close_paren", lit(")"), Emit("-RRB-")),
        rule("hyphens", plus(lit("-")), Hyphens),
        rule("ldots", ldots(), Emit("...")),
        rule(
            "fnmarks",
            alt(vec![plus(lit("@")), plus(lit("#")), plus(lit("_"))]),
            Keep,
        ),
        rule(
            "asterisks",
            alt(vec![plus(lit("*")), rep(lit("\\*"), 1, Some(3))]),
            Keep,
        ),
        rule("insent_punct", insent_punct(), Keep),
        rule("bangs", plus(any_of("?!")), Keep),
        rule(
            "sentence_punct",
            any_of(".\u{A1}\u{BF}\u{37E}\u{589}\u{61F}\u{6D4}\u{700}\u{701}\u{702}\u{7FA}\u{3002}"),
            Keep,
        ),
        rule("equals", lit("="), Keep),
        rule("slash", lit("/"), Keep),
        rule_before(
            "hthing_period",
            seq(vec![hthing(), dot()]),
            insent_punct(),
            Word,
        ),
        rule("hthing", hthing(), Word),
        rule_before(
            "thing_period",
            seq(vec![thing(), dot()]),
            insent_punct(),
            Keep,
        ),
        rule("thing", thing(), Keep),
        rule_before(
            "thinga_period",
            seq(vec![thing_a(), dot()]),
            insent_punct(),
            Amp,
        ),
        rule("thinga", thing_a(), Amp),
        rule_before(
            "open_single_quote",
            lit("'"),
            seq(vec![pred(is_ascii_alpha), none_of(" \t\n\r\u{A0}")]),
            Quote { left: true },
        ),
        rule("clitic_any", redaux(), Quote { left: false }),
        rule("quotes", quotes(), Quote { left: false }),
        rule("duck_feet", lits(&["<<", ">>"]), Keep),
        rule("misc_symbol", pred(is_misc_symbol), Keep),
        rule(
            "space",
            alt(vec![
                plus(space()),
                any_of("\u{0}\u{200B}\u{200E}\u{200F}\u{FEFF}"),
            ]),
            Skip,
        ),
        rule("newline", newline(), Newline),
        rule("nbsp_entity", lit("&nbsp;"), Skip),
    ]
}
