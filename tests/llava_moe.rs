//! Mixture-of-Experts language models inside LLaVA (issue 21) against transformers 5.25 on the
//! committed tiny checkpoints (tests/fixtures/make_llava_moe_fixtures.py): each sparse layer's
//! router logits, the Switch load-balancing loss as transformers computes it, a gradient for
//! every router and expert when the whole model trains, and the config's sparse layout.

mod common;

use candle_core::{Device, Tensor};
use common::{expected, fixture, ids2, mask2, max_abs_diff};
use mmkd::checkpoint::load_llava;
use mmkd::distill::balance::{load_balancing_loss, Routers};
use mmkd::models::decoder::LayerStates;
use mmkd::models::llava::{BuildOptions, ImageInput, LlavaModel, TokenBatch, Trainable};
use mmkd::models::moe::Routing;
use mmkd::teacher::average_routings;
use mmkd_nn::grad_check::params_without_gradient;

const MOE_FIXTURES: [(&str, &[usize]); 2] = [
    // Qwen2-MoE: layer 1 is in mlp_only_layers.
    ("llava_siglip_qwen2moe", &[0, 2]),
    ("llava_clip_mixtral", &[0, 1]),
];

fn load(name: &str, trainable: Trainable) -> LlavaModel {
    load_llava(
        fixture(name).to_str().unwrap(),
        &BuildOptions::new(trainable, 0),
    )
    .unwrap()
    .0
}

fn reference_batch(name: &str) -> (TokenBatch, Tensor) {
    let exp = expected(name);
    let batch = TokenBatch {
        ids: ids2(&exp["input_ids"]),
        mask: mask2(&exp["attention_mask"]),
    };
    (batch, exp["pixel_values"].clone())
}

fn token_mask(batch: &TokenBatch) -> Tensor {
    let flat: Vec<f32> = batch.mask.iter().flatten().map(|&m| f32::from(m)).collect();
    let n = flat.len();
    Tensor::from_vec(flat, n, &Device::Cpu).unwrap()
}

#[test]
fn router_logits_and_the_balancing_loss_equal_transformers() {
    for (name, sparse) in MOE_FIXTURES {
        let model = load(name, Trainable::NONE);
        let exp = expected(name);
        let (batch, pixels) = reference_batch(name);
        let out = model.forward(&batch, Some(&pixels)).unwrap();
        let routers = &out.layers.router_logits;
        assert_eq!(routers.len(), sparse.len(), "{name}: sparse layers");
        for (logits, layer) in routers.iter().zip(sparse) {
            let d = max_abs_diff(logits, &exp[&format!("router_logits_{layer}")]);
            assert!(d < 1e-4, "{name} layer {layer}: router logits off by {d}");
        }
        let mask = token_mask(&batch);
        let loss = load_balancing_loss(Routers {
            logits: routers,
            top_k: 2,
            token_mask: &mask,
        })
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        let want = exp["aux_loss"].to_vec1::<f32>().unwrap()[0];
        println!("{name}: balancing loss {loss} (transformers {want})");
        assert!((loss - want).abs() < 1e-5, "{name}: {loss} vs {want}");
    }
}

#[test]
fn every_router_and_expert_gets_a_gradient_when_the_model_trains() {
    for (name, _) in MOE_FIXTURES {
        let model = load(name, Trainable::ALL);
        let (batch, pixels) = reference_batch(name);
        let out = model.forward(&batch, Some(&pixels)).unwrap();
        let weights = Tensor::randn(0f32, 1.0, out.logits.shape(), &Device::Cpu).unwrap();
        let mask = token_mask(&batch);
        let balance = load_balancing_loss(Routers {
            logits: &out.layers.router_logits,
            top_k: 2,
            token_mask: &mask,
        })
        .unwrap();
        let loss = ((out.logits * weights).unwrap().sum_all().unwrap() + balance).unwrap();
        let missing = params_without_gradient(&model.store, &loss).unwrap();
        // The vision layers after the selected one and the tower's final norm are never read
        // (as for the dense fixtures).
        let unexpected: Vec<&String> = missing
            .iter()
            .filter(|m| {
                !m.contains("vision_model.post_layernorm") && !m.contains("encoder.layers.1.")
            })
            .collect();
        assert!(unexpected.is_empty(), "{name}: {unexpected:?}");
        let experts = model
            .store
            .trainable_vars()
            .iter()
            .filter(|(n, _)| n.contains(".experts."))
            .count();
        assert_eq!(
            experts,
            2 * 4 * 3,
            "{name}: 2 sparse layers × 4 experts × 3 weights"
        );
    }
}

/// The error of loading the Mixtral fixture with `from` replaced by `to` in its config.
fn mixtral_error_with(from: &str, to: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture("llava_clip_mixtral")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(&config, text.replace(from, to)).unwrap();
    let err = load_llava(
        dir.path().to_str().unwrap(),
        &BuildOptions::new(Trainable::NONE, 0),
    )
    .err()
    .unwrap();
    format!("{err:#}")
}

#[test]
fn a_router_beyond_its_experts_and_an_expert_of_the_wrong_shape_are_named() {
    let msg = mixtral_error_with("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 5");
    assert!(
        msg.contains("num_experts_per_tok = 5 with 4 experts"),
        "{msg}"
    );
    let msg = mixtral_error_with("\"intermediate_size\": 48", "\"intermediate_size\": 40");
    assert!(
        msg.contains("block_sparse_moe.experts.0.w1.weight") && msg.contains("layer 0"),
        "{msg}"
    );
}

#[test]
fn knowledge_augmentation_averages_routings_that_draw_other_experts() {
    for (name, _) in MOE_FIXTURES {
        let model = load(name, Trainable::NONE);
        let (batch, pixels) = reference_batch(name);
        let run = |routing| {
            let trace = LayerStates::wanted(&[1]).routed(routing);
            model
                .forward_traced(&batch, Some(ImageInput::Pixels(&pixels)), trace)
                .unwrap()
        };
        let top = run(Routing::TopK);
        let exp = expected(name);
        assert!(max_abs_diff(&top.logits, &exp["logits"]) < 1e-4, "{name}");
        let a = run(Routing::Sampled { seed: 7 });
        let b = run(Routing::Sampled { seed: 8 });
        // A draw is fixed by its seed and changes the experts of some tokens.
        assert_eq!(
            max_abs_diff(&a.logits, &run(Routing::Sampled { seed: 7 }).logits),
            0.0,
            "{name}"
        );
        let moved = max_abs_diff(&a.logits, &top.logits);
        assert!(
            moved > 1e-2,
            "{name}: a sampled routing moved the logits by {moved}"
        );
        assert!(max_abs_diff(&a.logits, &b.logits) > 1e-3, "{name}");
        // The router logits of the first layer do not depend on the routing.
        assert_eq!(
            max_abs_diff(&a.layers.router_logits[0], &top.layers.router_logits[0]),
            0.0
        );
        let want_logits = ((&top.logits + &a.logits).unwrap() + &b.logits).unwrap() / 3.0;
        let want_layer = ((&top.layers.states[&1] + &a.layers.states[&1]).unwrap()
            + &b.layers.states[&1])
            .unwrap()
            / 3.0;
        let mean = average_routings(vec![top, a, b]).unwrap();
        assert!(max_abs_diff(&mean.logits, &want_logits.unwrap()) < 1e-6);
        assert!(max_abs_diff(&mean.layers.states[&1], &want_layer.unwrap()) < 1e-6);
        // The mean of the logits is the head on the mean hidden state.
        let head = model.lm.logits(&mean.hidden).unwrap();
        assert!(max_abs_diff(&head, &mean.logits) < 1e-4, "{name}");
    }
}
