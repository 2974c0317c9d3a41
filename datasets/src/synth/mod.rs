//! The synthetic shapes data set (`mmkd data synth`): a small, honest, learnable vision-language
//! task for tiny models, written in LLaVA's formats so the whole pipeline runs on it.
//!
//! Layout under the output directory (image paths in every file are relative to it):
//! ```text
//! manifest.json                      seed, image size, counts, vocabulary, file list
//! images/{train,val,test}/NNNNNN.png
//! {split}/pretrain.json              LLaVA JSON: one caption sample per image
//! {split}/instruct.json              LLaVA JSON: multi-turn questions per image + text-only samples
//! {split}/scenes.jsonl               ground truth: {id, image, objects: [{shape, color, size, row, col, position}]}
//! {val,test}/questions.jsonl         {question_id, image, text, category}
//! {val,test}/answers.jsonl           {question_id, answers: [answer], accepted: [answer, synonyms...], answer_type}
//! {val,test}/captions.jsonl          {image_id, image, text, references: [...]}
//! {val,test}/pope_{random,popular,adversarial}.jsonl   {question_id, image, text, label, category}
//! ```
//! Output is a pure function of the configuration (byte-identical for a seed, whatever the
//! thread count). Scenes are distinct across splits (see [`scene::Scene::key`]); the evaluation
//! splits are drawn first so they keep their share of the few one-object scenes.

pub mod files;
pub mod labels;
pub mod language;
pub mod pope;
pub mod render;
pub mod scene;

use std::collections::HashSet;
use std::path::Path;
use std::thread;

use anyhow::{bail, Context, Result};

use crate::progress::Progress;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use files::{
    write_json, write_json_list, write_jsonl, AnswerLine, CaptionLine, ConversationTurn,
    LlavaRecord, PopeLine, QuestionLine, SceneLine,
};
use language::{Category, CAPTION_EVAL_PROMPT, CAPTION_PROMPTS, TEXT_ONLY};
use pope::PopeSetting;
use scene::{Color, Scene, SceneKey, Shape, Size};

/// Settings of the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SynthConfig {
    pub seed: u64,
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Width and height of the images in pixels.
    pub image_size: u32,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            train: 2000,
            val: 200,
            test: 200,
            image_size: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    fn code(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Val => 2,
            Split::Test => 3,
        }
    }
}

/// Counts written for one split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SplitSummary {
    pub images: usize,
    pub pretrain_samples: usize,
    pub instruct_samples: usize,
    pub text_only_samples: usize,
    pub questions: usize,
    pub pope_questions: usize,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SynthSummary {
    pub train: SplitSummary,
    pub val: SplitSummary,
    pub test: SplitSummary,
}

#[derive(Serialize)]
struct Manifest<'a> {
    generator: &'static str,
    config: &'a SynthConfig,
    splits: &'a SynthSummary,
    shapes: Vec<&'static str>,
    colors: Vec<&'static str>,
    sizes: Vec<&'static str>,
    positions: Vec<&'static str>,
    image_root: &'static str,
}

/// A random stream for one purpose of one item, independent of generation order.
fn stream(seed: u64, split: Split, purpose: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream((split.code() << 48) | index);
    rng
}

const SCENES: u64 = 1;
const TEXT: u64 = 2;
const TEXT_ONLY_SAMPLES: u64 = 3;
const POPE: u64 = 4;

/// Draw `n` scenes not in `taken` (and add them to it).
fn draw_scenes(
    cfg: &SynthConfig,
    split: Split,
    n: usize,
    taken: &mut HashSet<SceneKey>,
) -> Result<Vec<Scene>> {
    let mut rng = stream(cfg.seed, split, SCENES, 0);
    let mut scenes = Vec::with_capacity(n);
    let mut misses = 0usize;
    while scenes.len() < n {
        let count = rng.gen_range(1..=4);
        let scene = Scene::random(&mut rng, count);
        if taken.insert(scene.key()) {
            scenes.push(scene);
            misses = 0;
        } else {
            misses += 1;
            if misses > 10_000 {
                bail!(
                    "cannot draw {n} distinct {} scenes: the world has run out of new scenes",
                    split.name()
                );
            }
        }
    }
    Ok(scenes)
}

fn image_path(split: Split, i: usize) -> String {
    format!("images/{}/{i:06}.png", split.name())
}

fn scene_id(split: Split, i: usize) -> String {
    format!("{}-{i:06}", split.name())
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Sub)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("cannot encode {}", path.display()))?;
    crate::atomic::write_atomically(path, &png)
}

/// Render and save every scene of a split, in parallel.
fn write_images(
    out: &Path,
    cfg: &SynthConfig,
    split: Split,
    scenes: &[Scene],
    progress: &dyn Progress,
) -> Result<()> {
    let dir = out.join("images").join(split.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let threads = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = scenes.len().div_ceil(threads).max(1);
    thread::scope(|scope| {
        let handles: Vec<_> = scenes
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let out = &out;
                scope.spawn(move || -> Result<()> {
                    for (k, scene) in part.iter().enumerate() {
                        let i = c * chunk + k;
                        write_png(
                            &out.join(image_path(split, i)),
                            &render::render(scene, cfg.image_size),
                        )?;
                        progress.inc(1);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })
}

/// The first human turn with the image placeholder, before the question in most samples and
/// after it in some (both occur in LLaVA's data).
fn with_image(question: &str, rng: &mut impl Rng) -> String {
    if rng.gen_bool(0.8) {
        format!("<image>\n{question}")
    } else {
        format!("{question}\n<image>")
    }
}

fn training_records(
    cfg: &SynthConfig,
    split: Split,
    scenes: &[Scene],
) -> (Vec<LlavaRecord>, Vec<LlavaRecord>, usize) {
    let mut pretrain = Vec::with_capacity(scenes.len());
    let mut instruct = Vec::with_capacity(scenes.len());
    for (i, scene) in scenes.iter().enumerate() {
        let mut rng = stream(cfg.seed, split, TEXT, i as u64);
        let captions = language::captions(scene);
        pretrain.push(LlavaRecord {
            id: format!("{}-cap", scene_id(split, i)),
            image: Some(image_path(split, i)),
            conversations: vec![
                ConversationTurn::human(
                    CAPTION_PROMPTS
                        .choose(&mut rng)
                        .expect("non-empty")
                        .to_string(),
                ),
                ConversationTurn::gpt(captions.choose(&mut rng).expect("non-empty").clone()),
            ],
        });
        let mut turns = Vec::new();
        for (r, qa) in language::instruction_rounds(scene, &mut rng)
            .into_iter()
            .enumerate()
        {
            let q = if r == 0 {
                with_image(&qa.question, &mut rng)
            } else {
                qa.question
            };
            turns.push(ConversationTurn::human(q));
            turns.push(ConversationTurn::gpt(qa.answer));
        }
        instruct.push(LlavaRecord {
            id: scene_id(split, i),
            image: Some(image_path(split, i)),
            conversations: turns,
        });
    }
    // About one text-only sample per twenty images, as LLaVA's mix has some text-only data.
    let text_only = scenes.len() / 20;
    for k in 0..text_only {
        let mut rng = stream(cfg.seed, split, TEXT_ONLY_SAMPLES, k as u64);
        let rounds = rng.gen_range(2..=3);
        let turns = TEXT_ONLY
            .choose_multiple(&mut rng, rounds)
            .flat_map(|(q, a)| {
                [
                    ConversationTurn::human(q.to_string()),
                    ConversationTurn::gpt(a.to_string()),
                ]
            })
            .collect();
        instruct.push(LlavaRecord {
            id: format!("{}-text-{k:06}", split.name()),
            image: None,
            conversations: turns,
        });
    }
    (pretrain, instruct, text_only)
}

struct EvalFiles {
    questions: Vec<QuestionLine>,
    answers: Vec<AnswerLine>,
    captions: Vec<CaptionLine>,
    pope: Vec<(PopeSetting, Vec<PopeLine>)>,
}

fn eval_records(cfg: &SynthConfig, split: Split, scenes: &[Scene]) -> EvalFiles {
    let mut questions = Vec::new();
    let mut answers = Vec::new();
    let mut captions = Vec::new();
    for (i, scene) in scenes.iter().enumerate() {
        // A separate stream from the training text so question sets do not shift with it.
        let mut rng = stream(cfg.seed, split, TEXT | 0x100, i as u64);
        for category in Category::SHORT {
            let Some(qa) = language::question(scene, category, &mut rng) else {
                continue;
            };
            let question_id = questions.len() as u64;
            questions.push(QuestionLine {
                question_id,
                image: image_path(split, i),
                text: qa.question,
                category: category.name(),
            });
            answers.push(AnswerLine {
                question_id,
                answers: vec![qa.answer],
                accepted: qa.accepted,
                answer_type: category.answer_type(),
            });
        }
        captions.push(CaptionLine {
            image_id: scene_id(split, i),
            image: image_path(split, i),
            text: CAPTION_EVAL_PROMPT,
            references: language::captions(scene),
        });
    }
    let popular = pope::popularity(scenes);
    let pope = PopeSetting::ALL
        .iter()
        .map(|&setting| {
            let mut lines = Vec::new();
            for (i, scene) in scenes.iter().enumerate() {
                let mut rng = stream(cfg.seed, split, POPE + 0x10 * setting as u64, i as u64);
                for (kind, present) in pope::probes(scene, setting, &popular, &mut rng) {
                    lines.push(PopeLine {
                        question_id: lines.len() as u64,
                        image: image_path(split, i),
                        text: pope::question(kind),
                        label: if present { "yes" } else { "no" },
                        category: setting.name(),
                    });
                }
            }
            (setting, lines)
        })
        .collect();
    EvalFiles {
        questions,
        answers,
        captions,
        pope,
    }
}

fn write_split(
    out: &Path,
    cfg: &SynthConfig,
    split: Split,
    scenes: &[Scene],
    progress: &dyn Progress,
) -> Result<SplitSummary> {
    progress.start(&format!("{} images", split.name()), scenes.len() as u64);
    write_images(out, cfg, split, scenes, progress)?;
    progress.finish();
    let dir = out.join(split.name());
    let (pretrain, instruct, text_only) = training_records(cfg, split, scenes);
    write_json_list(&dir.join("pretrain.json"), &pretrain)?;
    write_json_list(&dir.join("instruct.json"), &instruct)?;
    let scene_lines: Vec<SceneLine> = scenes
        .iter()
        .enumerate()
        .map(|(i, s)| SceneLine::new(scene_id(split, i), image_path(split, i), s))
        .collect();
    write_jsonl(&dir.join("scenes.jsonl"), &scene_lines)?;
    let mut summary = SplitSummary {
        images: scenes.len(),
        pretrain_samples: pretrain.len(),
        instruct_samples: instruct.len(),
        text_only_samples: text_only,
        ..SplitSummary::default()
    };
    if split != Split::Train {
        let eval = eval_records(cfg, split, scenes);
        write_jsonl(&dir.join("questions.jsonl"), &eval.questions)?;
        write_jsonl(&dir.join("answers.jsonl"), &eval.answers)?;
        write_jsonl(&dir.join("captions.jsonl"), &eval.captions)?;
        for (setting, lines) in &eval.pope {
            write_jsonl(&dir.join(format!("pope_{}.jsonl", setting.name())), lines)?;
            summary.pope_questions += lines.len();
        }
        summary.questions = eval.questions.len();
    }
    Ok(summary)
}

/// Generate the data set into `out` (created if needed; must not already hold a data set).
/// `progress` counts the images written, one stage per split.
pub fn generate(out: &Path, cfg: &SynthConfig, progress: &dyn Progress) -> Result<SynthSummary> {
    if !(16..=1024).contains(&cfg.image_size) {
        bail!("image size {} is outside 16..=1024 pixels", cfg.image_size);
    }
    if cfg.train == 0 {
        bail!("the train split needs at least one image");
    }
    if out.join("manifest.json").exists() {
        bail!(
            "{} already holds a data set (manifest.json); choose an empty directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut taken = HashSet::new();
    let test = draw_scenes(cfg, Split::Test, cfg.test, &mut taken)?;
    let val = draw_scenes(cfg, Split::Val, cfg.val, &mut taken)?;
    let train = draw_scenes(cfg, Split::Train, cfg.train, &mut taken)?;
    let summary = SynthSummary {
        train: write_split(out, cfg, Split::Train, &train, progress)?,
        val: write_split(out, cfg, Split::Val, &val, progress)?,
        test: write_split(out, cfg, Split::Test, &test, progress)?,
    };
    let manifest = Manifest {
        generator: "mmkd data synth v1",
        config: cfg,
        splits: &summary,
        shapes: Shape::ALL.iter().map(|s| s.name()).collect(),
        colors: Color::ALL.iter().map(|c| c.name()).collect(),
        sizes: Size::ALL.iter().map(|s| s.name()).collect(),
        positions: scene::Cell::all().map(|c| c.name()).collect(),
        image_root: ".",
    };
    write_json(&out.join("manifest.json"), &manifest)?;
    Ok(summary)
}
