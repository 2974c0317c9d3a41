//! `phi` and `plain` against input ids and labels made by a Python replica of TinyLLaVA's
//! preprocessing with the Hugging Face tokenizer (tests/fixtures/make_phi_reference.py).

mod common;

use std::path::Path;

use mmkd_datasets::{
    load_tokenizer, render_text, tokenize_sample, Template, TokenizeConfig, Truncation,
};
use serde_json::Value;

#[test]
fn phi_and_plain_match_the_python_reference_token_for_token() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("phi_reference.json")).unwrap())
            .unwrap();
    let tok = load_tokenizer(&dir.join(fixture["tokenizer"].as_str().unwrap())).unwrap();
    let image_token_id = fixture["image_token_id"].as_u64().unwrap() as u32;
    assert_eq!(tok.token_to_id("<image>"), Some(image_token_id));
    let cfg = TokenizeConfig {
        image_token_id,
        tokens_per_image: fixture["tokens_per_image"].as_u64().unwrap() as usize,
        max_length: 4096,
        truncation: Truncation::Truncate,
    };
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    let mut separated_space = 0;
    for case in cases {
        let template = Template::builtin(case["template"].as_str().unwrap()).unwrap();
        let sample = common::sample(case["record"].clone()).unwrap();
        let id = &sample.reference.name();
        assert_eq!(
            render_text(&sample, &template).unwrap(),
            case["prompt"].as_str().unwrap(),
            "{id}: prompt text"
        );
        let out = tokenize_sample(&sample, &tok, &template, &cfg).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(case["labels"].clone()).unwrap();
        assert_eq!(out.input_ids, ids, "{id}: input ids");
        assert_eq!(out.labels, labels, "{id}: labels");
        // Count answers whose separator space is a token of its own (supervised by the reference).
        let space = tok.token_to_id("Ġ").unwrap() as i64;
        separated_space += labels.iter().filter(|&&l| l == space).count();
    }
    // The fixture exercises both tokenizations of "ASSISTANT: answer": "Ġred" and "Ġ" + "B...".
    assert!(separated_space > 0);
}
