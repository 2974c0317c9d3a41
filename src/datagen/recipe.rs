//! Recipes: what `mmkd distill-data` asks the teacher. A recipe (TOML) names the target skill as
//! prompt templates with slots (`"What color is the {shape}?"`), the seed knowledge (a small
//! JSONL file whose lines give slot values and few-shot examples), the generation settings and
//! the filters. Built-in recipes ship for the shapes world (`shapes-vqa`, `shapes-caption`).
//!
//! Everything a recipe asks for an image is a pure function of the recipe and the image's path,
//! so an interrupted run asks the same again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use mmkd_nn::SeededRng;
use serde::{Deserialize, Serialize};

use crate::teacher_cache::digest::digest_str;

/// Built-in recipes: (name, recipe text, seed file name, seed text).
const BUILT_IN: [(&str, &str, &str, &str); 2] = [
    (
        "shapes-vqa",
        include_str!("../../configs/recipes/shapes-vqa.toml"),
        "shapes-vqa.seed.jsonl",
        include_str!("../../configs/recipes/shapes-vqa.seed.jsonl"),
    ),
    (
        "shapes-caption",
        include_str!("../../configs/recipes/shapes-caption.toml"),
        "shapes-caption.seed.jsonl",
        include_str!("../../configs/recipes/shapes-caption.seed.jsonl"),
    ),
];

/// The names of the built-in recipes.
pub fn built_in_names() -> Vec<&'static str> {
    BUILT_IN.iter().map(|b| b.0).collect()
}

/// What the teacher writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The filled template is the instruction; the teacher writes the answer.
    #[default]
    Answer,
    /// The filled template asks the teacher for an instruction and its answer, which it
    /// writes as `Question: …` / `Answer: …`.
    Instruct,
}

/// How the teacher generates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSettings {
    /// Prompts per image.
    pub n_per_image: usize,
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Ask for the reasoning before the answer (kept in the response; the answer is its last
    /// `Answer:` line).
    pub rationale: bool,
    /// Seed examples shown before each prompt.
    pub few_shot: usize,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            n_per_image: 4,
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            rationale: false,
            few_shot: 0,
        }
    }
}

/// What is dropped besides empty, cut-off, duplicate and unparsable answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSettings {
    /// Drop answers whose mean token log-probability under the teacher is below this (when
    /// the teacher reports log-probabilities: local teachers always, servers when they can).
    pub min_mean_logprob: Option<f32>,
    /// Drop final answers of more words than this.
    pub max_answer_words: Option<usize>,
    /// Word n-grams compared for near-duplicates (among one image's samples).
    pub near_duplicate_ngram: usize,
    /// Jaccard similarity of n-gram sets at or above which a sample is a near-duplicate.
    pub near_duplicate_jaccard: f32,
}

impl Default for FilterSettings {
    fn default() -> Self {
        Self {
            min_mean_logprob: None,
            max_answer_words: None,
            near_duplicate_ngram: 3,
            near_duplicate_jaccard: 0.8,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    mode: Mode,
    /// The seed knowledge, relative to the recipe file.
    seed_file: String,
    templates: Vec<TemplateSpec>,
    /// Accepted final answers of every template without its own `answers`.
    #[serde(default)]
    answer_set: Vec<String>,
    #[serde(default)]
    generation: GenerationSettings,
    #[serde(default)]
    filters: FilterSettings,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    Text(String),
    Full {
        prompt: String,
        /// A slot whose values are this template's accepted answers.
        #[serde(default)]
        answers: Option<String>,
    },
}

/// One prompt template, its slots in order of appearance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptTemplate {
    pub text: String,
    pub slots: Vec<String>,
    /// The slot whose values are the accepted answers.
    pub answers: Option<String>,
}

/// Slot values by slot name.
pub type Slots = BTreeMap<String, Vec<String>>;

/// A seed example: a question and its answer (and reasoning).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Example {
    pub question: String,
    pub answer: String,
}

/// A recipe, checked.
#[derive(Clone, Debug, Serialize)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    /// The recipe file, or `built-in NAME`.
    pub source: String,
    pub mode: Mode,
    pub templates: Vec<PromptTemplate>,
    /// Slot values by slot name, from the seed file.
    pub slots: Slots,
    pub examples: Vec<Example>,
    /// Normalised accepted answers for templates without their own.
    pub answer_set: Vec<String>,
    pub generation: GenerationSettings,
    pub filters: FilterSettings,
    /// Digest of the recipe and seed texts.
    pub digest: String,
}

/// One prompt planned for an image.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedPrompt {
    pub template: usize,
    /// The filled template: the instruction written to the data (answer mode).
    pub instruction: String,
    /// What the teacher is sent: examples, the instruction and the reply format.
    pub request: String,
}

impl Recipe {
    /// A built-in recipe by name, or a recipe file.
    pub fn load(name_or_path: &str) -> Result<Recipe> {
        if let Some((name, text, seed_name, seed)) = BUILT_IN.iter().find(|b| b.0 == name_or_path) {
            return Self::parse(text, &format!("built-in {name}"), |file| {
                ensure!(
                    file == *seed_name,
                    "built-in recipe {name} names seed file {file}, which is not built in"
                );
                Ok(seed.to_string())
            });
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            bail!(
                "recipe {name_or_path}: no such file, and not a built-in recipe (built-in: {})",
                built_in_names().join(", ")
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading recipe {}", path.display()))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &path.display().to_string(), |file| {
            let seed: PathBuf = dir.join(file);
            std::fs::read_to_string(&seed).with_context(|| {
                format!(
                    "recipe {}: reading its seed file {}",
                    path.display(),
                    seed.display()
                )
            })
        })
    }

    /// Parses recipe `text` (named `source` in messages); `read_seed` reads the seed file it
    /// names.
    pub fn parse(
        text: &str,
        source: &str,
        read_seed: impl FnOnce(&str) -> Result<String>,
    ) -> Result<Recipe> {
        let file: RecipeFile =
            toml::from_str(text).with_context(|| format!("recipe {source}: not a valid recipe"))?;
        let seed_text = read_seed(&file.seed_file)?;
        let seed_name = format!("{} (seed file of recipe {source})", file.seed_file);
        let (slots, examples) = parse_seed(&seed_text, &seed_name)?;
        ensure!(
            !file.templates.is_empty(),
            "recipe {source}: `templates` is empty: name at least one prompt"
        );
        let g = &file.generation;
        ensure!(
            g.n_per_image >= 1,
            "recipe {source}: generation.n_per_image must be at least 1"
        );
        ensure!(
            g.max_tokens >= 1,
            "recipe {source}: generation.max_tokens must be at least 1"
        );
        ensure!(
            g.temperature >= 0.0 && g.top_p > 0.0 && g.top_p <= 1.0,
            "recipe {source}: generation.temperature must be ≥ 0 and top_p in (0, 1]"
        );
        ensure!(
            g.few_shot <= examples.len(),
            "recipe {source}: generation.few_shot = {} but the seed file has {} question/answer examples",
            g.few_shot,
            examples.len()
        );
        let f = &file.filters;
        ensure!(
            f.near_duplicate_ngram >= 1 && (0.0..=1.0).contains(&f.near_duplicate_jaccard),
            "recipe {source}: filters.near_duplicate_ngram must be ≥ 1 and near_duplicate_jaccard in [0, 1]"
        );
        let known = |slot: &str| -> String {
            let names: Vec<&str> = slots.keys().map(String::as_str).collect();
            format!(
                "slot {{{slot}}}, which no line of {seed_name} gives (its slots: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        };
        let mut templates = Vec::with_capacity(file.templates.len());
        for (i, spec) in file.templates.into_iter().enumerate() {
            let (text, answers) = match spec {
                TemplateSpec::Text(t) => (t, None),
                TemplateSpec::Full { prompt, answers } => (prompt, answers),
            };
            let here = || format!("recipe {source}: template {} ({text:?})", i + 1);
            let names = template_slots(&text).with_context(here)?;
            for slot in &names {
                ensure!(slots.contains_key(slot), "{} uses {}", here(), known(slot));
            }
            if let Some(a) = &answers {
                ensure!(
                    slots.contains_key(a),
                    "{} takes its answers from {}",
                    here(),
                    known(a)
                );
            }
            ensure!(!text.trim().is_empty(), "{} is empty", here());
            templates.push(PromptTemplate {
                text,
                slots: names,
                answers,
            });
        }
        Ok(Recipe {
            name: file.name,
            description: file.description,
            source: source.to_string(),
            mode: file.mode,
            templates,
            slots,
            examples,
            answer_set: file.answer_set.iter().map(|a| normalize(a)).collect(),
            generation: file.generation,
            filters: file.filters,
            digest: digest_str(&format!("{text}\u{0}{seed_text}")),
        })
    }

    /// The prompts for the image at `key` (its path relative to the image root): a pure
    /// function of the recipe's seed and the key. An instruction already planned for the image
    /// is drawn again (a few times) so that the prompts differ where the recipe allows.
    pub fn plan(&self, key: &str) -> Vec<PlannedPrompt> {
        const DRAWS: usize = 8;
        let mut rng = SeededRng::for_name(self.generation.seed, key);
        let mut planned: Vec<PlannedPrompt> = Vec::with_capacity(self.generation.n_per_image);
        for _ in 0..self.generation.n_per_image {
            let mut draw = self.draw(&mut rng);
            for _ in 1..DRAWS {
                if !planned.iter().any(|p| p.instruction == draw.1) {
                    break;
                }
                draw = self.draw(&mut rng);
            }
            let (template, instruction) = draw;
            let request = self.request_text(&instruction, &mut rng);
            planned.push(PlannedPrompt {
                template,
                instruction,
                request,
            });
        }
        planned
    }

    /// A template and its slots filled at random.
    fn draw(&self, rng: &mut SeededRng) -> (usize, String) {
        let template = rng.below(self.templates.len());
        let t = &self.templates[template];
        let mut instruction = t.text.clone();
        for slot in &t.slots {
            let values = &self.slots[slot];
            let value = &values[rng.below(values.len())];
            instruction = instruction.replacen(&format!("{{{slot}}}"), value, 1);
        }
        (template, instruction)
    }

    fn request_text(&self, instruction: &str, rng: &mut SeededRng) -> String {
        let mut text = String::new();
        if self.generation.few_shot > 0 {
            let mut order: Vec<usize> = (0..self.examples.len()).collect();
            rng.shuffle(&mut order);
            text.push_str("Examples:\n");
            for &e in order.iter().take(self.generation.few_shot) {
                let ex = &self.examples[e];
                text.push_str(&format!("Q: {}\nA: {}\n", ex.question, ex.answer));
            }
            text.push('\n');
        }
        text.push_str(instruction);
        match self.mode {
            Mode::Instruct => text.push_str(
                "\nReply in two lines:\nQuestion: <the question>\nAnswer: <its answer>",
            ),
            Mode::Answer if self.generation.rationale => text.push_str(
                "\nReason step by step, then give the final answer on a last line starting with \"Answer:\".",
            ),
            Mode::Answer => {}
        }
        text
    }

    /// The accepted (normalised) final answers of a template, if it has a set.
    pub fn accepted_answers(&self, template: usize) -> Option<Vec<String>> {
        match &self.templates[template].answers {
            Some(slot) => Some(self.slots[slot].iter().map(|v| normalize(v)).collect()),
            None if !self.answer_set.is_empty() => Some(self.answer_set.clone()),
            None => None,
        }
    }
}

/// The slots `{name}` of a template, in order; a brace that does not open or close a slot
/// name (letters, digits, `_`) is an error.
pub fn template_slots(text: &str) -> Result<Vec<String>> {
    let mut slots = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find(['{', '}']) {
        ensure!(rest.as_bytes()[open] == b'{', "a `}}` without its `{{`");
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .context("a `{` without its `}`: slots are written {name}")?;
        let name = &after[..close];
        ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "`{{{name}}}` is not a slot name (letters, digits and _)"
        );
        slots.push(name.to_string());
        rest = &after[close + 1..];
    }
    Ok(slots)
}

/// The seed file's slot values and examples. Each line is a JSON object of strings (numbers are
/// taken as text); `question` + `answer` make an example, every other key a slot value.
fn parse_seed(text: &str, name: &str) -> Result<(Slots, Vec<Example>)> {
    let mut slots = Slots::new();
    let mut examples = Vec::new();
    let mut lines = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let at = || format!("{name}, line {}", i + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let object = value
            .as_object()
            .with_context(|| format!("{}: not a JSON object", at()))?;
        let mut fields = BTreeMap::new();
        for (key, v) in object {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => bail!("{}: `{key}` is {other}, not text", at()),
            };
            ensure!(!text.trim().is_empty(), "{}: `{key}` is empty", at());
            fields.insert(key.clone(), text);
        }
        match (fields.remove("question"), fields.remove("answer")) {
            (Some(question), Some(answer)) => examples.push(Example { question, answer }),
            (None, None) => {}
            _ => bail!("{}: an example needs both `question` and `answer`", at()),
        }
        for (key, v) in fields {
            let values = slots.entry(key).or_default();
            if !values.contains(&v) {
                values.push(v);
            }
        }
    }
    ensure!(
        lines > 0,
        "{name} is empty: give slot values and/or question/answer examples, one JSON object a line"
    );
    Ok((slots, examples))
}

/// An answer as it is compared with an answer set: lower case, trimmed, without a final period.
pub fn normalize(answer: &str) -> String {
    answer.trim().trim_end_matches('.').trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(text: &str, seed: &str) -> Result<Recipe> {
        Recipe::parse(text, "test.toml", |_| Ok(seed.to_string()))
    }

    const SEED: &str = "{\"shape\": \"circle\"}\n{\"shape\": \"star\"}\n{\"color\": \"red\"}\n\
                        {\"question\": \"What is it?\", \"answer\": \"a star\"}\n";

    #[test]
    fn built_in_recipes_load_and_plan_within_their_slots() {
        for name in built_in_names() {
            let r = Recipe::load(name).unwrap();
            assert_eq!(r.name, name);
            let plan = r.plan("images/train/000001.png");
            assert_eq!(plan.len(), r.generation.n_per_image);
            for p in &plan {
                assert!(!p.instruction.contains('{'), "{p:?}");
            }
        }
        let vqa = Recipe::load("shapes-vqa").unwrap();
        assert_eq!(vqa.accepted_answers(0).unwrap().len(), 6, "colours");
    }

    #[test]
    fn plans_are_a_function_of_seed_and_image() {
        let text = "name = \"t\"\nseed_file = \"s\"\ntemplates = [\"A {shape} {color}?\", \"B {shape}?\"]\n[generation]\nn_per_image = 6\n";
        let r = recipe(text, SEED).unwrap();
        assert_eq!(r.plan("a.png"), r.plan("a.png"));
        assert_ne!(r.plan("a.png"), r.plan("b.png"));
        let mut distinct: Vec<String> =
            r.plan("a.png").into_iter().map(|p| p.instruction).collect();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() >= 3,
            "four instructions exist, drawn again when seen: {distinct:?}"
        );
        for p in r.plan("a.png") {
            let ok = ["A circle red?", "A star red?", "B circle?", "B star?"];
            assert!(ok.contains(&p.instruction.as_str()), "{p:?}");
            assert_eq!(p.request, p.instruction);
        }
    }

    #[test]
    fn few_shot_examples_and_reply_formats_are_in_the_request() {
        let text = "name = \"t\"\nseed_file = \"s\"\nmode = \"instruct\"\ntemplates = [\"Ask about the {shape}.\"]\n[generation]\nfew_shot = 1\n";
        let r = recipe(text, SEED).unwrap();
        let p = &r.plan("x.png")[0];
        assert!(p
            .request
            .starts_with("Examples:\nQ: What is it?\nA: a star\n\n"));
        assert!(p
            .request
            .ends_with("Question: <the question>\nAnswer: <its answer>"));
    }

    #[test]
    fn bad_recipes_are_refused_naming_what_is_wrong() {
        let with = |t: &str| format!("name = \"t\"\nseed_file = \"s\"\ntemplates = [\"{t}\"]\n");
        let err = |text: &str, seed: &str| format!("{:#}", recipe(text, seed).unwrap_err());
        let e = err(&with("Describe {aspect} of the image"), SEED);
        assert!(
            e.contains("template 1") && e.contains("slot {aspect}") && e.contains("color, shape"),
            "{e}"
        );
        assert!(err(&with("x"), "\n  \n").contains("is empty"));
        assert!(err(&with("A {shape"), SEED).contains("without its `}`"));
        assert!(err(&with("A {sh ape}"), SEED).contains("not a slot name"));
        assert!(err(&with("x"), "{\"question\": \"q\"}\n").contains("line 1"));
        assert!(err(&with("x"), "[1]\n").contains("not a JSON object"));
        assert!(err("name = \"t\"\nseed_file = \"s\"\ntemplates = []\n", SEED).contains("empty"));
        assert!(err("name = 1", SEED).contains("not a valid recipe"));
        let e = err(
            "name = \"t\"\nseed_file = \"s\"\ntemplates = [{ prompt = \"x\", answers = \"size\" }]\n",
            SEED,
        );
        assert!(e.contains("answers from slot {size}"), "{e}");
        assert!(format!("{:#}", Recipe::load("no-such-recipe").unwrap_err())
            .contains("built-in: shapes-vqa, shapes-caption"));
    }

    #[test]
    fn answers_are_normalised_for_the_answer_set() {
        assert_eq!(normalize("  Red. "), "red");
        assert_eq!(normalize("Top Left"), "top left");
    }
}
