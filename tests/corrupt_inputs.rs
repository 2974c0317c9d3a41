//! Property tests of every file reader on corrupted inputs: random truncation, byte flips,
//! inserted huge or malformed values and deleted or repeated spans of a valid file must give an
//! error or a value — never a panic, and never an allocation far larger than the file.
//!
//! A counting global allocator measures each read's peak. The readers run one at a time (a
//! lock), so the peak is theirs; their rayon workers are counted too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device};
use proptest::prelude::*;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let grow = new_size - layout.size();
                let now = CURRENT.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One reader at a time, so the allocation peak is the reader's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Most a reader may allocate beyond what it holds before: a fixed allowance for the
/// libraries' buffers plus a generous multiple of the file.
fn allowance(file_bytes: usize) -> usize {
    64 * 1024 * 1024 + 64 * file_bytes
}

/// Runs `read` on the (corrupted) file: a panic or an allocation beyond the allowance fails.
fn survives(what: &str, file_bytes: usize, read: impl FnOnce()) -> Result<(), TestCaseError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let outcome = catch_unwind(AssertUnwindSafe(read));
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    if let Err(panic) = outcome {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        return Err(TestCaseError::fail(format!("{what} panicked: {why}")));
    }
    prop_assert!(
        peak <= allowance(file_bytes),
        "{what} allocated {peak} bytes for a file of {file_bytes}"
    );
    Ok(())
}

/// A change to a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    /// Keep this fraction of the file.
    Truncate(f64),
    Flip {
        at: f64,
        xor: u8,
    },
    Insert {
        at: f64,
        text: &'static str,
    },
    Delete {
        at: f64,
        len: usize,
    },
    Repeat {
        at: f64,
        len: usize,
    },
}

/// Values that break readers: huge or negative numbers, stray structure, NUL, long runs.
const INSERTS: &[&str] = &[
    "99999999999999999999999",
    "18446744073709551615",
    "4294967296",
    "-1",
    "1e308",
    "NaN",
    "null",
    "[",
    "{",
    "}",
    "\"",
    "\\",
    "\u{0}",
    ",",
    "\n",
    "\u{fffd}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Mutation::Truncate),
        (0.0..1.0f64, 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        (0.0..1.0f64, prop::sample::select(INSERTS))
            .prop_map(|(at, text)| Mutation::Insert { at, text }),
        (0.0..1.0f64, 1..64usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (0.0..1.0f64, 1..64usize).prop_map(|(at, len)| Mutation::Repeat { at, len }),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..4)
}

fn apply(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let pos = |at: f64, len: usize| ((at * len as f64) as usize).min(len);
    for m in mutations {
        let n = out.len();
        match *m {
            Mutation::Truncate(keep) => out.truncate(pos(keep, n)),
            Mutation::Flip { at, xor } => {
                if n > 0 {
                    let i = pos(at, n - 1);
                    out[i] ^= xor;
                }
            }
            Mutation::Insert { at, text } => {
                let i = pos(at, n);
                out.splice(i..i, text.bytes());
            }
            Mutation::Delete { at, len } => {
                let i = pos(at, n);
                out.drain(i..(i + len).min(n));
            }
            Mutation::Repeat { at, len } => {
                let i = pos(at, n);
                let span: Vec<u8> = out[i..(i + len).min(n)].to_vec();
                out.splice(i..i, span);
            }
        }
    }
    out
}

/// Valid files of every kind, made once: the synthetic data set with its tokenizer, and the
/// committed tiny LLaVA checkpoint.
struct Fixtures {
    _dir: tempfile::TempDir,
    data: PathBuf,
    checkpoint: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = mmkd_datasets::SynthConfig {
            seed: 2,
            train: 6,
            val: 4,
            test: 4,
            image_size: 32,
        };
        mmkd_datasets::generate_synth(&data, &cfg, &mmkd_datasets::NoProgress).unwrap();
        let (texts, _) = mmkd_datasets::collect_training_text(&data.join("train")).unwrap();
        let tokenizer = mmkd_datasets::train_bpe(&texts, 300).unwrap();
        mmkd_datasets::save_tokenizer(&tokenizer, &data.join("tokenizer.json")).unwrap();
        let checkpoint =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_siglip_qwen2");
        Fixtures {
            _dir: dir,
            data,
            checkpoint,
        }
    })
}

/// A valid teacher-cache shard (top-4; three samples, one with a relation matrix), made once.
fn shard_fixture() -> &'static Path {
    static SHARD: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SHARD
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("shard-00000.safetensors");
            let mut buffer = mmkd::teacher_cache::shard::ShardBuffer::new(SHARD_K);
            for r in shard_records() {
                buffer.push(&r).unwrap();
            }
            buffer.write(&path).unwrap();
            (dir, path)
        })
        .1
}

const SHARD_K: usize = 4;

fn shard_records() -> Vec<mmkd::teacher_cache::SampleRecord> {
    let rows = |n: usize, salt: u32| mmkd::distill::TopKHost {
        k: SHARD_K,
        ids: (0..(n * SHARD_K) as u32)
            .map(|i| (i * 7 + salt) % 300)
            .collect(),
        log_probs: (0..n * SHARD_K).map(|i| -(i as f32) * 0.25 - 0.1).collect(),
        rest: (0..n).map(|i| -3.0 - i as f32).collect(),
    };
    (0..3)
        .map(|i| mmkd::teacher_cache::SampleRecord {
            index: i * 5,
            response_positions: (10..13 + i as u32).collect(),
            response: rows(3 + i, i as u32),
            visual_positions: (1..5).collect(),
            visual: rows(4, 9),
            relation: (i == 1).then(|| (0..16).map(|v| v as f32 / 16.0).collect()),
        })
        .collect()
}

/// Opens a shard and reads every sample in it, as a distillation step does.
fn read_whole_shard(path: &Path) -> anyhow::Result<usize> {
    use mmkd::teacher_cache::shard::{Part, ShardReader};
    let reader = ShardReader::open(path, SHARD_K)?;
    let mut positions = Vec::new();
    let mut rows = mmkd::distill::TopKHost::empty(SHARD_K);
    for slot in &reader.slots {
        reader.read_rows(slot, Part::Response, &mut positions, &mut rows)?;
        reader.read_rows(slot, Part::Visual, &mut positions, &mut rows)?;
        reader.relation(slot)?;
    }
    Ok(reader.slots.len())
}

/// Writes the corrupted bytes of `original` to a scratch file of the same name and reads it.
fn check_file(
    original: &Path,
    mutations: &[Mutation],
    read: impl FnOnce(&Path),
) -> Result<(), TestCaseError> {
    let bytes = std::fs::read(original).unwrap();
    let corrupted = apply(&bytes, mutations);
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join(original.file_name().unwrap());
    std::fs::write(&path, &corrupted).unwrap();
    let what = original.file_name().unwrap().to_string_lossy().to_string();
    survives(&what, corrupted.len(), || read(&path))
}

/// 48 cases per reader in the suite; `PROPTEST_CASES=N` runs more (a longer hunt).
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn llava_json_and_jsonl(m in mutations(), which in 0..3usize) {
        let f = fixtures();
        let file = ["train/pretrain.json", "train/instruct.json", "val/questions.jsonl"][which];
        check_file(&f.data.join(file), &m, |p| {
            let _ = mmkd_datasets::LlavaDataset::read(p, &f.data);
        })?;
    }

    #[test]
    fn scene_labels(m in mutations()) {
        let f = fixtures();
        check_file(&f.data.join("train/scenes.jsonl"), &m, |p| {
            let _ = mmkd_datasets::read_scene_cells(p);
        })?;
    }

    #[test]
    fn tokenizer(m in mutations(), which in 0..2usize) {
        let f = fixtures();
        let file = [f.data.join("tokenizer.json"), f.checkpoint.join("tokenizer.json")][which].clone();
        check_file(&file, &m, |p| {
            if let Ok(t) = mmkd_datasets::load_tokenizer(p) {
                let _ = t.encode("a red circle <image>", false);
            }
        })?;
    }

    #[test]
    fn llava_config_json(m in mutations()) {
        let f = fixtures();
        check_file(&f.checkpoint.join("config.json"), &m, |p| {
            if let Ok(c) = mmkd::models::llava_config::LlavaConfig::from_file(p) {
                let _ = c.feature_selection();
            }
        })?;
    }

    #[test]
    fn processor_config_json(m in mutations()) {
        let f = fixtures();
        check_file(&f.checkpoint.join("processor_config.json"), &m, |p| {
            let dir = p.parent().unwrap();
            if let Ok(processor) = mmkd::checkpoint::bundle::load_processor(dir) {
                let image = f.data.join("images/train/000000.png");
                let _ = processor.preprocess_file(&image);
            }
        })?;
    }

    #[test]
    fn safetensors_weights(m in mutations()) {
        let f = fixtures();
        check_file(&f.checkpoint.join("model.safetensors"), &m, |p| {
            let _ = mmkd_nn::WeightSource::from_file(p, &Device::Cpu);
        })?;
    }

    #[test]
    fn a_whole_checkpoint_with_one_file_corrupted(m in mutations(), which in 0..4usize) {
        let f = fixtures();
        let scratch = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&f.checkpoint).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), scratch.path().join(entry.file_name())).unwrap();
        }
        let name = ["config.json", "model.safetensors", "tokenizer.json", "processor_config.json"][which];
        let bytes = std::fs::read(f.checkpoint.join(name)).unwrap();
        let corrupted = apply(&bytes, &m);
        std::fs::write(scratch.path().join(name), &corrupted).unwrap();
        let total: usize = std::fs::read_dir(scratch.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len() as usize)
            .sum();
        survives(name, total, || {
            let _ = mmkd::stages::init::from_checkpoint(
                scratch.path().to_str().unwrap(),
                mmkd::models::llava::Trainable::PROJECTOR_AND_LLM,
                DType::F32,
                &Device::Cpu,
            );
        })?;
    }

    #[test]
    fn evaluation_files(m in mutations(), which in 0..5usize) {
        let f = fixtures();
        let file = [
            "test/questions.jsonl",
            "test/answers.jsonl",
            "test/captions.jsonl",
            "test/pope_random.jsonl",
            "test/questions.jsonl",
        ][which];
        check_file(&f.data.join(file), &m, |p| {
            use mmkd::scoring::readers::*;
            let _ = match which {
                0 => read_vqa_questions(p).map(|_| ()),
                1 => read_vqa_references(p).map(|_| ()),
                2 => read_caption_references(p).map(|_| ()),
                3 => read_pope_labels(p).map(|_| ()),
                _ => read_predictions(p).map(|_| ()),
            };
        })?;
    }

    #[test]
    fn teacher_cache_shard(m in mutations()) {
        check_file(shard_fixture(), &m, |p| {
            let _ = read_whole_shard(p);
        })?;
    }

    #[test]
    fn lora_adapter(m in mutations(), which in 0..2usize) {
        // The PEFT fixture, its base named by absolute path, one of its two files corrupted;
        // read, then loaded on its base (folded).
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_peft");
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_siglip_qwen2");
        let scratch = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        config["base_model_name_or_path"] = serde_json::json!(base.to_str().unwrap());
        std::fs::write(scratch.path().join("adapter_config.json"), config.to_string()).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), scratch.path().join("adapter_model.safetensors")).unwrap();
        let name = ["adapter_config.json", "adapter_model.safetensors"][which];
        let bytes = std::fs::read(scratch.path().join(name)).unwrap();
        let corrupted = apply(&bytes, &m);
        std::fs::write(scratch.path().join(name), &corrupted).unwrap();
        survives(name, corrupted.len() + 200_000, || {
            if mmkd::checkpoint::adapter::read_adapter(scratch.path()).is_ok() {
                let _ = mmkd::checkpoint::LoadedModel::load(
                    scratch.path().to_str().unwrap(),
                    &mmkd::models::llava::BuildOptions::new(mmkd::models::llava::Trainable::NONE, 0),
                );
            }
        })?;
    }

    #[test]
    fn images(m in mutations()) {
        let f = fixtures();
        check_file(&f.data.join("images/train/000001.png"), &m, |p| {
            let processor = mmkd_vision::ImageProcessor::defaults(mmkd_vision::ProcessorKind::Siglip);
            let _ = processor.preprocess_file(p);
            let _ = mmkd_datasets::check_image(p, mmkd_datasets::ImageCheck::Decode);
        })?;
    }

    #[test]
    fn presets_and_templates(m in mutations(), which in 0..2usize) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = [root.join("configs/shapes-tiny.toml"), root.join("datasets/templates/compact.toml")][which].clone();
        check_file(&file, &m, |p| {
            if which == 0 {
                if let Ok(doc) = mmkd::config::load_document(p.to_str().unwrap()) {
                    let _ = mmkd::config::StageSettings::resolve(
                        &doc,
                        mmkd::config::Stage::Dft,
                        mmkd::config::Role::Student,
                    );
                    let _ = mmkd::config::tower::TowerSettings::resolve(&doc);
                }
            } else {
                let _ = mmkd_datasets::Template::from_file(p);
            }
        })?;
    }
}

/// safetensors' 8-byte header length set to huge values: refused without allocating them.
#[test]
fn a_safetensors_header_declaring_a_huge_length_is_refused_cheaply() {
    let f = fixtures();
    let bytes = std::fs::read(f.checkpoint.join("model.safetensors")).unwrap();
    for declared in [u64::MAX, 1 << 40, 1 << 31, bytes.len() as u64 + 1] {
        let mut corrupted = bytes.clone();
        corrupted[..8].copy_from_slice(&declared.to_le_bytes());
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("model.safetensors");
        std::fs::write(&path, &corrupted).unwrap();
        let mut result = None;
        survives("model.safetensors", corrupted.len(), || {
            result = Some(mmkd_nn::WeightSource::from_file(&path, &Device::Cpu).is_err());
        })
        .unwrap();
        assert_eq!(result, Some(true), "declared header length {declared}");
    }
}

/// A shard that is valid safetensors but whose sample table points anywhere (values near
/// 2⁶⁴ whose sums overflow, rows beyond a tensor) or whose tensors disagree in length:
/// refused naming the shard, never a panic.
#[test]
fn a_shard_whose_table_or_tensors_disagree_is_refused_naming_it() {
    use safetensors::{Dtype, SafeTensors};
    let original = std::fs::read(shard_fixture()).unwrap();
    let tensors = SafeTensors::deserialize(&original).unwrap();
    /// A tensor as (name, type, shape, bytes).
    type Owned = (String, Dtype, Vec<usize>, Vec<u8>);
    let valid: Vec<Owned> = tensors
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    assert_eq!(read_whole_shard(shard_fixture()).unwrap(), 3);
    let u64s = |values: &[u64]| {
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let table_len = valid.iter().find(|t| t.0 == "samples").unwrap().3.len() / 8;
    let mut cases: Vec<(&str, Vec<Owned>)> = Vec::new();
    for (what, column, value) in [
        ("a start near 2^64", 1, u64::MAX - 1),
        ("a row count near 2^64", 2, u64::MAX),
        ("a visual start beyond the rows", 3, 1 << 40),
        ("a relation side whose square overflows", 6, 1 << 33),
    ] {
        let mut table = vec![0u64; table_len];
        let t = &valid.iter().find(|t| t.0 == "samples").unwrap().3;
        for (i, v) in table.iter_mut().enumerate() {
            *v = u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap());
        }
        table[column] = value;
        let mut changed = valid.clone();
        changed.iter_mut().find(|t| t.0 == "samples").unwrap().3 = u64s(&table);
        cases.push((what, changed));
    }
    for name in ["response_positions", "visual_rest", "relations"] {
        let mut changed = valid.clone();
        let t = changed.iter_mut().find(|t| t.0 == name).unwrap();
        t.2 = vec![1];
        t.3.truncate(4);
        cases.push((name, changed));
    }
    let mut wrong_dtype = valid.clone();
    wrong_dtype
        .iter_mut()
        .find(|t| t.0 == "response_rest")
        .unwrap()
        .1 = Dtype::I32;
    cases.push(("an i32 response_rest", wrong_dtype));
    for (what, case) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-00007.safetensors");
        let views: Vec<(String, safetensors::tensor::TensorView)> = case
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let mut outcome = None;
        survives(what, original.len(), || {
            outcome = Some(read_whole_shard(&path))
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let err = format!("{:#}", outcome.unwrap().expect_err(what));
        assert!(err.contains("shard-00007.safetensors"), "{what}: {err}");
    }
}

/// The harness itself: a panic and an oversized allocation are both caught.
#[test]
fn the_checks_can_fail() {
    assert!(survives("panicking reader", 10, || panic!("boom")).is_err());
    assert!(survives("greedy reader", 10, || {
        let v = vec![1u8; allowance(10) + 1];
        std::hint::black_box(&v);
    })
    .is_err());
    assert!(survives("good reader", 10, || {}).is_ok());
}

/// Sizes a config may declare that would make the readers allocate far beyond the file: an
/// image size of 100 000 pixels, a vocabulary of 2³², and so on.
#[test]
fn declared_sizes_far_beyond_the_files_are_refused_cheaply() {
    let f = fixtures();
    let processor: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.checkpoint.join("processor_config.json")).unwrap(),
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.checkpoint.join("config.json")).unwrap())
            .unwrap();
    let image = f.data.join("images/train/000000.png");
    for huge in [100_000u64, 1 << 32, u64::MAX] {
        // The image processor's target size.
        let mut p = processor.clone();
        p["image_processor"]["size"] = serde_json::json!({ "height": huge, "width": huge });
        let scratch = tempfile::tempdir().unwrap();
        let text = serde_json::to_string(&p).unwrap();
        std::fs::write(scratch.path().join("processor_config.json"), &text).unwrap();
        survives("processor_config.json", text.len(), || {
            if let Ok(processor) = mmkd::checkpoint::bundle::load_processor(scratch.path()) {
                let _ = processor.preprocess_file(&image);
            }
        })
        .unwrap();
        // The model's sizes: vocabulary, widths, image size, layers.
        for key in [
            "/text_config/vocab_size",
            "/text_config/hidden_size",
            "/text_config/num_hidden_layers",
            "/vision_config/image_size",
            "/vision_config/hidden_size",
            "/vision_config/num_hidden_layers",
        ] {
            let scratch = tempfile::tempdir().unwrap();
            for entry in std::fs::read_dir(&f.checkpoint).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), scratch.path().join(entry.file_name())).unwrap();
            }
            let mut c = config.clone();
            *c.pointer_mut(key).unwrap() = serde_json::json!(huge);
            let text = serde_json::to_string(&c).unwrap();
            std::fs::write(scratch.path().join("config.json"), &text).unwrap();
            let mut refused = false;
            survives(key, 600_000, || {
                refused = mmkd::stages::init::from_checkpoint(
                    scratch.path().to_str().unwrap(),
                    mmkd::models::llava::Trainable::PROJECTOR_AND_LLM,
                    DType::F32,
                    &Device::Cpu,
                )
                .is_err();
            })
            .unwrap_or_else(|e| panic!("{key} = {huge}: {e}"));
            assert!(refused, "{key} = {huge} was accepted");
        }
        // A fresh model of a preset with such a size (100 000 is a real vocabulary).
        let keys: &[&str] = if huge > 100_000 {
            &["hidden_size", "vocab_size", "num_hidden_layers"]
        } else {
            &["hidden_size", "num_hidden_layers"]
        };
        for key in keys {
            let mut doc = mmkd::config::load_document("shapes-tiny").unwrap();
            doc.set(&format!(
                "models.student.text_config.{key}={}",
                huge.min(i64::MAX as u64)
            ))
            .unwrap();
            let mut refused = false;
            survives(key, 10_000, || {
                let spec = mmkd::config::StageSettings::resolve(
                    &doc,
                    mmkd::config::Stage::Pretrain,
                    mmkd::config::Role::Student,
                );
                refused = spec
                    .and_then(|s| {
                        mmkd::stages::init::from_spec(
                            &s.model,
                            Some(&f.data.join("tokenizer.json")),
                            mmkd::models::llava::Trainable::PROJECTOR_AND_LLM,
                            DType::F32,
                            &Device::Cpu,
                        )
                    })
                    .is_err();
            })
            .unwrap_or_else(|e| panic!("fresh {key} = {huge}: {e}"));
            assert!(refused, "fresh {key} = {huge} was accepted");
        }
    }
}
