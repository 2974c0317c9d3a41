//! mmkd-datasets: LLaVA-format data, conversation templates, tokenization with checked labels,
//! batching, the synthetic shapes data set and tokenizer training. No candle: batches are plain
//! `ndarray` arrays, images are file paths decoded on demand into `image::DynamicImage`s.
//!
//! Pipeline: [`LlavaDataset::read`] → (optionally) [`LlavaDataset::verify_images`] →
//! [`TokenizedDataset::build`] with a [`Template`] → [`BatchSampler`] + [`collate`] → [`Batch`].

pub mod atomic;
pub mod batch;
pub mod check;
pub mod image_io;
pub mod prepare;
pub mod problem;
pub mod progress;
pub mod reader;
pub mod sample;
pub mod sampler;
pub mod synth;
pub mod template;
pub mod tokenize;
pub mod tokenizer_train;

pub use batch::{collate, Batch, BatchImage, BatchImageError, CollateConfig, PaddingSide};
pub use check::{check_dataset, CheckOptions, CheckReport, Distribution, TokenCheck};
pub use image_io::{check_image, load_image, ImageCheck, ImageFault};
pub use prepare::{PrepareReport, TokenizedDataset};
pub use problem::{Problem, ProblemKind, SampleRef};
pub use progress::{NoProgress, Progress};
pub use reader::{raw_records, FileFormat, LlavaDataset};
pub use sample::{Role, Round, Sample, Turn, IMAGE_PLACEHOLDER};
pub use sampler::{epoch_batches, BatchSampler, Cursor, SampleShape, SamplerConfig};
pub use synth::labels::{read_scene_cells, Attribute, SceneCells};
pub use synth::{generate as generate_synth, SynthConfig, SynthSummary};
pub use template::{HumanText, ImagePlacement, Template};
pub use tokenize::{
    check_tokenizer, image_token_id, render_text, tokenize_prompt, tokenize_sample, TokenizeConfig,
    TokenizedSample, Truncation, IGNORE_INDEX,
};
pub use tokenizer_train::{
    collect_training_text, load_tokenizer, save_tokenizer, train_bpe, SPECIAL_TOKENS,
};
