//! Qwen2-MoE's sparse block against transformers (tests/fixtures/qwen2_moe, made by
//! make_qwen2_moe_fixture.py from a random tiny Qwen2MoeForCausalLM saved in the hub's
//! per-expert layout): the output with and without `norm_topk_prob`, the router logits, a
//! gradient for every router and expert weight, and clear errors for bad checkpoints.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::{expected, fixture, max_abs_diff};
use mmkd::models::moe::{ExpertLayout, MoeShape, SparseMoe};
use mmkd_nn::weights::WeightSource;
use mmkd_nn::{ParamBuilder, ParamStore};

fn shape(norm_topk_prob: bool) -> MoeShape {
    MoeShape {
        hidden: 16,
        expert_intermediate: 8,
        shared_intermediate: 12,
        experts: 4,
        top_k: 2,
        norm_topk_prob,
        act: mmkd_nn::Activation::Silu,
        layout: ExpertLayout::Qwen2Moe,
    }
}

fn block(store: &ParamStore, shape: MoeShape) -> anyhow::Result<SparseMoe> {
    let source = WeightSource::from_file(
        &fixture("qwen2_moe").join("model.safetensors"),
        &Device::Cpu,
    )?;
    let pb = ParamBuilder::new(store, Arc::new(source), 0, &Device::Cpu)
        .strict(true)
        .pp("model.layers.0.mlp");
    SparseMoe::new(&pb, shape, 0, 0.02)
}

#[test]
fn the_sparse_block_equals_transformers_with_and_without_renormalised_top_k() {
    let fx = expected("qwen2_moe");
    let x = &fx["x"];
    for (name, norm) in [("plain", false), ("norm", true)] {
        let store = ParamStore::new();
        let moe = block(&store, shape(norm)).unwrap();
        let (out, logits) = moe.forward(x).unwrap();
        let diff = max_abs_diff(&out, &fx[&format!("out_{name}")]);
        assert!(diff < 1e-5, "{name}: off by {diff}");
        assert!(max_abs_diff(&logits, &fx["router_logits"]) < 1e-5);
    }
    // The two settings differ, so the test tells them apart.
    assert!(max_abs_diff(&fx["out_plain"], &fx["out_norm"]) > 1e-3);
}

#[test]
fn every_router_and_expert_weight_gets_a_gradient() {
    let fx = expected("qwen2_moe");
    let store = ParamStore::new();
    let moe = block(&store, shape(true)).unwrap();
    let (out, _) = moe.forward(&fx["x"]).unwrap();
    let missing = mmkd_nn::grad_check::params_without_gradient(
        &store,
        &out.sqr().unwrap().sum_all().unwrap(),
    )
    .unwrap();
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(
        store.count_trainable(),
        16 * 4 + 4 * 3 * 16 * 8 + 3 * 16 * 12 + 16
    );
}

#[test]
fn bad_checkpoints_and_routers_are_named() {
    let store = ParamStore::new();
    let err = block(
        &store,
        MoeShape {
            top_k: 5,
            ..shape(false)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("choosing 5 of 4 experts"), "{err}");
    // A checkpoint with fewer experts than the config says: the missing tensor is named.
    let store = ParamStore::new();
    let err = format!(
        "{:#}",
        block(
            &store,
            MoeShape {
                experts: 5,
                ..shape(false)
            }
        )
        .unwrap_err()
    );
    assert!(
        err.contains("model.layers.0.mlp.experts.4.gate_proj.weight"),
        "{err}"
    );
    // Experts of another width: the tensor and both shapes are named.
    let store = ParamStore::new();
    let err = format!(
        "{:#}",
        block(
            &store,
            MoeShape {
                expert_intermediate: 9,
                ..shape(false)
            }
        )
        .unwrap_err()
    );
    assert!(
        err.contains("experts.0.gate_proj.weight") && err.contains("[9, 16]"),
        "{err}"
    );
}
