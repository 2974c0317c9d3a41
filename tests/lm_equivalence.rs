//! The decoder + splice against transformers: feed the fixture's projector outputs through our
//! splice and decoder and compare hidden states and logits at every position.

use std::path::Path;
use std::sync::Arc;

mod common;

use candle_core::{DType, Tensor};
use common::max_abs_diff;
use mmkd::models::decoder::{arange_positions, CausalLm};
use mmkd::models::splice::{splice_image_features, VisualPositions};
use mmkd::models::text_config::TextConfig;
use mmkd_nn::{ParamBuilder, ParamStore, WeightSource};

fn check(fixture: &str, legacy_prefixes: bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let dev = common::test_device();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut text: TextConfig = serde_json::from_value(config["text_config"].clone()).unwrap();
    text.tie_word_embeddings |= config["tie_word_embeddings"].as_bool().unwrap_or(false);
    let image_token = config["image_token_index"].as_u64().unwrap() as u32;
    let mut source = WeightSource::from_dir(&dir, &dev).unwrap();
    if legacy_prefixes {
        source.rename(|n| {
            Some(if let Some(r) = n.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = n.strip_prefix("language_model.lm_head.") {
                format!("lm_head.{r}")
            } else {
                n.to_string()
            })
        });
    }
    let store = ParamStore::new();
    let root = ParamBuilder::new(&store, Arc::new(source), 0, &dev).strict(true);
    let lm = CausalLm::new(&root.pp("model.language_model"), &root, &text).unwrap();

    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let ids = expected["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let mask: Vec<Vec<u8>> = expected["attention_mask"]
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec2::<u8>()
        .unwrap();
    let visual = VisualPositions::find(&ids, image_token);
    let lookup: Vec<Vec<u32>> = ids
        .iter()
        .map(|r| {
            r.iter()
                .map(|&t| if t == image_token { 0 } else { t })
                .collect()
        })
        .collect();
    let (b, s) = (ids.len(), ids[0].len());
    let ids_t = Tensor::new(lookup, &dev).unwrap();
    let embeds = splice_image_features(
        &lm.embed(&ids_t).unwrap(),
        &visual,
        Some(&expected["image_features"]),
    )
    .unwrap();
    let pos = arange_positions(b, s, 0, &dev).unwrap();
    let hidden = lm.forward_hidden(&embeds, &mask, &pos, None).unwrap();
    let logits = lm.logits(&hidden).unwrap();
    let dh = max_abs_diff(&hidden, &expected["hidden_states_last"]);
    let dl = max_abs_diff(&logits, &expected["logits"]);
    assert!(dh <= 1e-4, "{fixture}: hidden states differ by {dh}");
    assert!(dl <= 1e-4, "{fixture}: logits differ by {dl}");
}

#[test]
fn qwen2_decoder_matches_transformers_at_every_position() {
    check("llava_siglip_qwen2", false);
}

#[test]
fn llama_decoder_with_tied_head_matches_transformers_at_every_position() {
    check("llava_clip_llama", true);
}
