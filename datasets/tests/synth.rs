//! The synthetic data set: byte-identical for a seed, disjoint splits, answers true to the
//! scenes, and usable end to end (tokenizer, templates, batches, images).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use mmkd_datasets::{
    collate, generate_synth, image_token_id, load_tokenizer, BatchSampler, CollateConfig, Cursor,
    ImageCheck, LlavaDataset, NoProgress, PaddingSide, SampleShape, SamplerConfig, SynthConfig,
    Template, TokenizeConfig, TokenizedDataset, Truncation,
};
use serde_json::Value;

fn cfg(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        train: 40,
        val: 12,
        test: 12,
        image_size: 32,
    }
}

/// Every file under `dir`, by relative path, with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    generate_synth(a.path(), &cfg(5), &NoProgress).unwrap();
    generate_synth(b.path(), &cfg(5), &NoProgress).unwrap();
    generate_synth(c.path(), &cfg(6), &NoProgress).unwrap();
    let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
    let names: Vec<&str> = ta
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !k.starts_with("images/"))
        .collect();
    assert_eq!(
        names,
        vec![
            "manifest.json",
            "test/answers.jsonl",
            "test/captions.jsonl",
            "test/instruct.json",
            "test/pope_adversarial.jsonl",
            "test/pope_popular.jsonl",
            "test/pope_random.jsonl",
            "test/pretrain.json",
            "test/questions.jsonl",
            "test/scenes.jsonl",
            "train/instruct.json",
            "train/pretrain.json",
            "train/scenes.jsonl",
            "val/answers.jsonl",
            "val/captions.jsonl",
            "val/instruct.json",
            "val/pope_adversarial.jsonl",
            "val/pope_popular.jsonl",
            "val/pope_random.jsonl",
            "val/pretrain.json",
            "val/questions.jsonl",
            "val/scenes.jsonl",
        ]
    );
    assert_eq!(ta.keys().filter(|k| k.starts_with("images/")).count(), 64);
    assert!(ta == tb, "same seed, different bytes");
    assert_ne!(ta["train/instruct.json"], tc["train/instruct.json"]);
    assert_ne!(ta["images/train/000000.png"], tc["images/train/000000.png"]);
    // Refuses to write over a data set.
    let err = generate_synth(a.path(), &cfg(5), &NoProgress).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("already holds a data set (manifest.json); choose an empty directory"),
        "{err}"
    );
}

fn scene_keys(path: &Path) -> HashSet<String> {
    jsonl(path)
        .iter()
        .map(|s| s["objects"].to_string())
        .collect()
}

#[test]
fn splits_are_disjoint_and_answers_match_the_scenes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        seed: 1,
        train: 300,
        val: 40,
        test: 40,
        image_size: 32,
    };
    let summary = generate_synth(dir.path(), &cfg, &NoProgress).unwrap();
    assert_eq!(summary.train.text_only_samples, 15);
    let (train, val, test) = (
        scene_keys(&dir.path().join("train/scenes.jsonl")),
        scene_keys(&dir.path().join("val/scenes.jsonl")),
        scene_keys(&dir.path().join("test/scenes.jsonl")),
    );
    assert_eq!(
        (train.len(), val.len(), test.len()),
        (300, 40, 40),
        "scenes are distinct within splits"
    );
    assert!(train.is_disjoint(&val) && train.is_disjoint(&test) && val.is_disjoint(&test));

    let scenes: BTreeMap<String, Value> = jsonl(&dir.path().join("test/scenes.jsonl"))
        .into_iter()
        .map(|s| (s["image"].as_str().unwrap().to_string(), s))
        .collect();
    let has = |image: &str, color: &str, shape: &str| {
        scenes[image]["objects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["color"] == color && o["shape"] == shape)
    };
    let questions = jsonl(&dir.path().join("test/questions.jsonl"));
    let answers = jsonl(&dir.path().join("test/answers.jsonl"));
    assert_eq!(questions.len(), answers.len());
    let mut categories = BTreeMap::new();
    for (q, a) in questions.iter().zip(&answers) {
        assert_eq!(q["question_id"], a["question_id"]);
        *categories
            .entry(q["category"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
        let image = q["image"].as_str().unwrap();
        let objects = scenes[image]["objects"].as_array().unwrap();
        let answer = a["answers"][0].as_str().unwrap();
        let text = q["text"].as_str().unwrap();
        if text == "How many shapes are there?" {
            assert_eq!(answer, objects.len().to_string());
            assert_eq!(a["answer_type"], "number");
        }
        if let Some(rest) = text
            .strip_prefix("Where is the ")
            .and_then(|r| r.strip_suffix('?'))
        {
            let (color, shape) = rest.split_once(' ').unwrap();
            let o = objects
                .iter()
                .find(|o| o["color"] == color && o["shape"] == shape)
                .unwrap();
            assert_eq!(answer, o["position"]);
        }
    }
    // Every short-answer category is asked; relations only where two objects exist.
    assert_eq!(categories.len(), 7, "{categories:?}");
    assert_eq!(categories["color"], 40);

    for setting in ["random", "popular", "adversarial"] {
        let lines = jsonl(&dir.path().join(format!("test/pope_{setting}.jsonl")));
        let yes = lines.iter().filter(|l| l["label"] == "yes").count();
        assert_eq!(yes * 2, lines.len(), "{setting}: balanced");
        for l in &lines {
            let text = l["text"].as_str().unwrap();
            let words: Vec<&str> = text.split(' ').collect(); // Is there a(n) COLOR SHAPE in the image?
            let present = has(l["image"].as_str().unwrap(), words[3], words[4]);
            assert_eq!(l["label"], if present { "yes" } else { "no" }, "{text}");
            assert_eq!(l["category"], setting);
        }
    }
}

#[test]
fn synthetic_data_runs_through_the_whole_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    generate_synth(dir.path(), &cfg(3), &NoProgress).unwrap();
    let (texts, files) = mmkd_datasets::collect_training_text(dir.path()).unwrap();
    assert_eq!(files.len(), 6, "pretrain and instruct of three splits");
    let tok = mmkd_datasets::train_bpe(&texts, 420).unwrap();
    let tok_path = dir.path().join("tok/tokenizer.json");
    mmkd_datasets::save_tokenizer(&tok, &tok_path).unwrap();
    let tok = load_tokenizer(&tok_path).unwrap();
    let tcfg = TokenizeConfig {
        image_token_id: image_token_id(&tok).unwrap(),
        tokens_per_image: 16,
        max_length: 512,
        truncation: Truncation::Truncate,
    };

    for (file, template) in [
        ("train/pretrain.json", "plain"),
        ("train/instruct.json", "phi"),
        ("val/instruct.json", "chatml"),
    ] {
        let mut ds = LlavaDataset::read(&dir.path().join(file), dir.path()).unwrap();
        ds.verify_images(ImageCheck::Decode, 2, &|_| {});
        let built = TokenizedDataset::build(
            &ds,
            &tok,
            &Template::builtin(template).unwrap(),
            &tcfg,
            2,
            &|_| {},
        )
        .unwrap();
        assert!(
            built.report.problems.is_empty(),
            "{file} with {template}: {:?}",
            built.report.problems
        );
        assert_eq!(built.report.kept, ds.records);

        if template == "phi" {
            assert_eq!(built.samples.iter().filter(|s| !s.has_images()).count(), 2);
            let shapes = SampleShape::of(&built.samples);
            let mut sampler =
                BatchSampler::new(shapes, SamplerConfig::new(4, 0), Cursor::default()).unwrap();
            let indices = sampler.next_batch();
            let rows: Vec<_> = indices.iter().map(|&i| &built.samples[i]).collect();
            let batch = collate(
                &rows,
                &indices,
                &CollateConfig {
                    pad_token_id: 0,
                    padding_side: PaddingSide::Right,
                    pad_to_multiple_of: 8,
                },
            );
            assert_eq!(batch.seq_len() % 8, 0);
            let images = batch.load_images(2).unwrap();
            assert_eq!(images.len(), batch.images.len());
            assert!(images
                .iter()
                .all(|im| im.width() == 32 && im.height() == 32));
        }
    }
}
