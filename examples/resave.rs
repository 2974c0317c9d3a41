//! Loads a LLaVA checkpoint and saves it again with mmkd (used by
//! `tests/fixtures/check_saved_with_transformers.py` to prove transformers loads mmkd's output).
//!
//! cargo run --example resave -- SRC_DIR OUT_DIR

use std::path::Path;

use anyhow::{Context, Result};
use mmkd::checkpoint::bundle::load_processor;
use mmkd::checkpoint::{load_llava, save_llava, SaveAssets};
use mmkd::models::llava::{BuildOptions, Trainable};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (src, out) = match args.as_slice() {
        [_, src, out] => (src, out),
        _ => anyhow::bail!("usage: resave SRC_DIR OUT_DIR"),
    };
    let (model, dir) = load_llava(src, &BuildOptions::new(Trainable::NONE, 0))?;
    let processor = load_processor(&dir).context("reading the image processor")?;
    save_llava(
        &model,
        Path::new(out),
        SaveAssets {
            tokenizer_dir: Some(&dir),
            processor: Some(&processor),
            tokenizer: None,
            training: None,
        },
    )?;
    println!("saved {} to {out}", dir.display());
    Ok(())
}
