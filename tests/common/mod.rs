//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod served;
pub mod world;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The device the fixture tests run on: `MMKD_TEST_DEVICE` (`cpu`, the default, or `cuda[:N]`
/// in a `--features cuda` build; scripts/gpu-check.sh runs them on the GPU).
pub fn test_device() -> Device {
    let spec: mmkd::runtime::DeviceSpec = std::env::var("MMKD_TEST_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .expect("MMKD_TEST_DEVICE");
    spec.open().expect("opening MMKD_TEST_DEVICE")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

#[allow(unused_imports)]
pub use mmkd_nn::grad_check::max_abs_diff;

pub fn ids2(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

pub fn mask2(t: &Tensor) -> Vec<Vec<u8>> {
    t.to_dtype(DType::U8).unwrap().to_vec2::<u8>().unwrap()
}

/// Runs the `mmkd` binary; returns (exit success, stdout, stderr).
pub fn mmkd(args: &[&str]) -> (bool, String, String) {
    mmkd_with_env(args, &[])
}

/// Runs the `mmkd` binary with extra environment variables (offline hub by default).
pub fn mmkd_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mmkd"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running mmkd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `mmkd ARGS` writing to `out` and SIGKILLs it as soon as its first checkpoint exists
/// (mid-run: the final model is not there yet). True when the run was cut short (false: it
/// finished first, and the test needs a longer run).
#[allow(dead_code)]
pub fn kill_after_first_checkpoint(args: &[String], out: &std::path::Path) -> bool {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .args(args)
        .spawn()
        .expect("starting mmkd");
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let has_checkpoint = out
            .join("checkpoints")
            .read_dir()
            .map(|mut d| {
                d.any(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("step-")
                })
            })
            .unwrap_or(false);
        if has_checkpoint {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return !out.join("summary.json").exists();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Synthetic shapes data in `data` (32 px, seed 3) with `train`, `val` and `test` scenes, and a
/// byte-level BPE tokenizer of `vocab` entries trained on it at `data/tokenizer.json`.
#[allow(dead_code)]
pub fn synth_data(data: &std::path::Path, (train, val, test): (usize, usize, usize), vocab: usize) {
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let counts = [train.to_string(), val.to_string(), test.to_string()];
    let (ok, _, err) = mmkd(&[
        "data",
        "synth",
        "--out",
        &s(data),
        "--train",
        &counts[0],
        "--val",
        &counts[1],
        "--test",
        &counts[2],
        "--image-size",
        "32",
        "--seed",
        "3",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = mmkd(&[
        "data",
        "tokenizer",
        "--data",
        &s(&data.join("train")),
        "--vocab-size",
        &vocab.to_string(),
        "--out",
        &s(&data.join("tokenizer.json")),
    ]);
    assert!(ok, "{err}");
}
