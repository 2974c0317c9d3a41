//! The PTB tokenizer against the real pycocoevalcap / Stanford CoreNLP 3.4.1 output stored by
//! `tests/fixtures/eval/make_caption_fixture.py`.

use mmkd::scoring::caption::ptb::{ptb_tokenize_lines, tokenize_captions};
use serde::Deserialize;

#[derive(Deserialize)]
struct PtbFixture {
    captions: Vec<String>,
    /// Raw `PTBTokenizer -preserveLines -lowerCase` output, one line per caption.
    ptb_lines: Vec<String>,
    /// pycocoevalcap's `PTBTokenizer.tokenize` output (punctuation removed).
    tokenized: Vec<String>,
}

#[derive(Deserialize)]
struct CaptionImage {
    candidate: String,
    references: Vec<String>,
}

#[derive(Deserialize)]
struct Tokenized {
    candidates: Vec<String>,
    references: Vec<Vec<String>>,
}

#[derive(Deserialize)]
struct CaptionFixture {
    images: Vec<CaptionImage>,
    tokenized: Tokenized,
}

fn load<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/tests/fixtures/eval/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn report_mismatches(inputs: &[String], expected: &[String], got: &[String]) {
    let bad: Vec<String> = inputs
        .iter()
        .zip(expected.iter().zip(got))
        .filter(|(_, (e, g))| e != g)
        .map(|(i, (e, g))| format!("input {i:?}\n  pycocoevalcap: {e:?}\n  mmkd:          {g:?}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        inputs.len(),
        bad.join("\n")
    );
}

#[test]
fn raw_lexer_output_matches_corenlp_3_4_1() {
    let f: PtbFixture = load("ptb_tokenizer_fixture.json");
    let lines = ptb_tokenize_lines(&f.captions.join("\n"));
    assert_eq!(lines.len(), f.captions.len());
    let got: Vec<String> = lines.iter().map(|l| l.join(" ")).collect();
    report_mismatches(&f.captions, &f.ptb_lines, &got);
}

#[test]
fn caption_tokenization_matches_pycocoevalcap() {
    let f: PtbFixture = load("ptb_tokenizer_fixture.json");
    let got = tokenize_captions(&f.captions);
    report_mismatches(&f.captions, &f.tokenized, &got);
}

#[test]
fn caption_fixture_streams_match_pycocoevalcap() {
    // References and candidates are tokenized as two separate streams, as COCOEvalCap does.
    let f: CaptionFixture = load("caption_fixture.json");
    let cands: Vec<String> = f.images.iter().map(|i| i.candidate.clone()).collect();
    report_mismatches(&cands, &f.tokenized.candidates, &tokenize_captions(&cands));
    let refs: Vec<String> = f.images.iter().flat_map(|i| i.references.clone()).collect();
    let expected: Vec<String> = f.tokenized.references.concat();
    report_mismatches(&refs, &expected, &tokenize_captions(&refs));
}

#[test]
fn documented_behaviours() {
    let tok = |s: &str| tokenize_captions(&[s]).remove(0);
    // Lowercased after escaping: round brackets survive as -lrb-/-rrb-.
    assert_eq!(tok("A dog (brown)."), "a dog -lrb- brown -rrb-");
    // Clitics and assimilations.
    assert_eq!(
        tok("It's a dog's bone, isn't it? I'm gonna"),
        "it 's a dog 's bone is n't it i 'm gon na"
    );
    // Numbers, hyphens and slashes stay whole; quotes go.
    assert_eq!(
        tok("1,000 and 3.5 well-known \"and/or\""),
        "1,000 and 3.5 well-known and/or"
    );
    // A fraction is one token holding a no-break space.
    assert_eq!(tok("5 1/2 cups"), "5\u{a0}1/2 cups");
    // An abbreviation keeps its period; at the end of the text it also ends the sentence.
    assert_eq!(tok("apples, pears, etc."), "apples pears etc.");
    // The next caption's first letter decides whether "U.S." ends a sentence (the extra "." is
    // then removed as punctuation, so the visible result is the same).
    assert_eq!(
        tokenize_captions(&["the plan b.", "A dog"]),
        ["the plan b", "a dog"]
    );
    assert_eq!(
        tokenize_captions(&["the plan b.", "a dog"]),
        ["the plan b.", "a dog"]
    );
}
