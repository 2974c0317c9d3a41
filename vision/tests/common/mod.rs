//! Shared helpers of mmkd-vision's integration tests (fixtures come from
//! `tests/fixtures/make_vision_fixtures.py`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn load_tensors(file: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", path.display()))
}

pub fn read_json(file: &str) -> serde_json::Value {
    let path = fixtures().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Largest absolute elementwise difference (shapes must match).
#[allow(unused_imports)]
pub use mmkd_nn::grad_check::max_abs_diff;
