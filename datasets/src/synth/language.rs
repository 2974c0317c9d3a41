//! Words about scenes: captions in several phrasings, questions with short answers in seven
//! categories, a detailed description, and text-only questions about shapes and colours.
//! Every answer is computed from the scene, so the task is honest: the image holds the answer.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use super::scene::{Cell, Color, Object, Scene, Shape};

/// Question categories (the `category` field of `questions.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Color,
    Shape,
    Size,
    Count,
    Position,
    Relation,
    Existence,
    Detail,
}

impl Category {
    /// The short-answer categories, one question each per evaluation scene.
    pub const SHORT: [Category; 7] = [
        Category::Color,
        Category::Shape,
        Category::Size,
        Category::Count,
        Category::Position,
        Category::Relation,
        Category::Existence,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::Color => "color",
            Category::Shape => "shape",
            Category::Size => "size",
            Category::Count => "count",
            Category::Position => "position",
            Category::Relation => "relation",
            Category::Existence => "existence",
            Category::Detail => "detail",
        }
    }

    /// VQAv2's answer types: "yes/no", "number" or "other".
    pub fn answer_type(self) -> &'static str {
        match self {
            Category::Relation | Category::Existence => "yes/no",
            Category::Count => "number",
            _ => "other",
        }
    }
}

/// A question about a scene with its answer and every other accepted way to say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qa {
    pub category: Category,
    pub question: String,
    /// The answer used for training (short words, except for `detail`).
    pub answer: String,
    /// `answer` first, then accepted synonyms.
    pub accepted: Vec<String>,
}

impl Qa {
    fn new(category: Category, question: String, answer: &str, synonyms: &[&str]) -> Qa {
        let mut accepted = vec![answer.to_string()];
        accepted.extend(synonyms.iter().map(|s| s.to_string()));
        Qa {
            category,
            question,
            answer: answer.to_string(),
            accepted,
        }
    }
}

const NUMBER_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(crate) fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// "a, b and c".
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// "a large red circle".
fn full_name(o: &Object) -> String {
    let words = format!("{} {} {}", o.size.name(), o.color.name(), o.shape.name());
    format!("{} {words}", article(&words))
}

/// The caption phrasings of a scene, in a fixed order (all of them are evaluation references).
pub fn captions(scene: &Scene) -> Vec<String> {
    let n = scene.objects.len();
    let plain: Vec<String> = scene.objects.iter().map(full_name).collect();
    let placed: Vec<String> = scene
        .objects
        .iter()
        .map(|o| format!("{} {}", full_name(o), in_cell(o.cell)))
        .collect();
    let short: Vec<String> = scene
        .objects
        .iter()
        .map(|o| format!("{} {}", article(o.color.name()), o.name()))
        .collect();
    let noun = if n == 1 { "shape" } else { "shapes" };
    vec![
        format!("{}.", capitalize(&join_and(&plain))),
        format!("{}.", capitalize(&join_and(&placed))),
        format!(
            "{} {noun}: {}.",
            capitalize(NUMBER_WORDS[n]),
            join_and(&plain)
        ),
        format!("A picture of {}.", join_and(&short)),
        format!(
            "{} on a light grey background.",
            capitalize(&join_and(&short))
        ),
    ]
}

/// Pretraining prompts (the `plain` template drops them; chat templates would keep them).
/// Some put `<image>` after the text, as in LLaVA's pretraining data.
pub const CAPTION_PROMPTS: [&str; 5] = [
    "<image>\nDescribe the image briefly.",
    "Give a short caption for this picture.\n<image>",
    "<image>\nWhat is shown here?",
    "Summarize the image in one sentence.\n<image>",
    "<image>\nWrite a caption.",
];

/// The prompt of caption evaluation (`captions.jsonl`).
pub const CAPTION_EVAL_PROMPT: &str = "Describe the image briefly.";

/// The prompt and answer of the detailed description.
pub const DETAIL_PROMPT: &str = "Describe the image in detail.";

fn in_cell(cell: Cell) -> String {
    match cell.name() {
        "center" => "in the center".into(),
        name => format!("in the {name}"),
    }
}

/// A sentence per object, in reading order.
pub fn detailed_description(scene: &Scene) -> String {
    let n = scene.objects.len();
    let mut out = if n == 1 {
        "There is one shape.".to_string()
    } else {
        format!("There are {} shapes.", NUMBER_WORDS[n])
    };
    for o in &scene.objects {
        out.push_str(&format!(
            " {} is {}.",
            capitalize(&full_name(o)),
            in_cell(o.cell)
        ));
    }
    out
}

/// The phrase naming `o` without its colour: "the circle" when its shape is unique in the scene,
/// else "the circle in the top left".
fn by_shape(scene: &Scene, o: &Object) -> String {
    if scene.count_shape(o.shape) == 1 {
        format!("the {}", o.shape.name())
    } else {
        format!("the {} {}", o.shape.name(), in_cell(o.cell))
    }
}

/// A question of `category` about `scene`; `None` when the category does not apply
/// (relations need two objects).
pub fn question(scene: &Scene, category: Category, rng: &mut impl Rng) -> Option<Qa> {
    let objects = &scene.objects;
    let o = objects.choose(rng)?;
    Some(match category {
        Category::Color => Qa::new(
            category,
            format!("What color is {}?", by_shape(scene, o)),
            o.color.name(),
            &[],
        ),
        Category::Shape => {
            let subject = if scene.count_color(o.color) == 1 {
                format!("the {} object", o.color.name())
            } else {
                format!("the {} object {}", o.color.name(), in_cell(o.cell))
            };
            Qa::new(
                category,
                format!("What shape is {subject}?"),
                o.shape.name(),
                &[],
            )
        }
        Category::Size => Qa::new(
            category,
            format!("Is the {} large or small?", o.name()),
            o.size.name(),
            &[],
        ),
        Category::Position => Qa::new(
            category,
            format!("Where is the {}?", o.name()),
            o.cell.name(),
            o.cell.synonyms(),
        ),
        Category::Count => {
            let (q, n) = match rng.gen_range(0..3) {
                0 => ("How many shapes are there?".to_string(), objects.len()),
                1 => {
                    let c = *Color::ALL.choose(rng)?;
                    (
                        format!("How many {} shapes are there?", c.name()),
                        scene.count_color(c),
                    )
                }
                _ => {
                    let s = *Shape::ALL.choose(rng)?;
                    (
                        format!("How many {} are there?", s.plural()),
                        scene.count_shape(s),
                    )
                }
            };
            let digits = n.to_string();
            Qa::new(category, q, &digits, &[NUMBER_WORDS[n]])
        }
        Category::Relation => relation(scene, rng)?,
        Category::Existence => existence(scene, rng),
        Category::Detail => Qa::new(
            category,
            DETAIL_PROMPT.to_string(),
            &detailed_description(scene),
            &[],
        ),
    })
}

/// "Is the A to the left of the B?" with yes and no equally likely when both are possible.
fn relation(scene: &Scene, rng: &mut impl Rng) -> Option<Qa> {
    if scene.objects.len() < 2 {
        return None;
    }
    let mut yes = Vec::new();
    let mut no = Vec::new();
    for a in &scene.objects {
        for b in &scene.objects {
            if a.cell == b.cell {
                continue;
            }
            for (words, holds) in [
                ("to the left of", a.cell.col < b.cell.col),
                ("to the right of", a.cell.col > b.cell.col),
                ("above", a.cell.row < b.cell.row),
                ("below", a.cell.row > b.cell.row),
            ] {
                let q = format!("Is the {} {words} the {}?", a.name(), b.name());
                if holds {
                    yes.push(q)
                } else {
                    no.push(q)
                }
            }
        }
    }
    let want_yes = rng.gen_bool(0.5);
    let (pool, answer) = if (want_yes && !yes.is_empty()) || no.is_empty() {
        (yes, true)
    } else {
        (no, false)
    };
    let q = pool.choose(rng)?.clone();
    Some(Qa::new(Category::Relation, q, yes_no(answer), &[]))
}

/// "Is there a red circle?" (or only a shape, or only a colour), yes and no equally likely
/// whenever the scene allows both.
fn existence(scene: &Scene, rng: &mut impl Rng) -> Qa {
    let want_yes = rng.gen_bool(0.5);
    let pick = |yes: &[String], no: &[String], rng: &mut _| -> (String, bool) {
        let use_yes = (want_yes && !yes.is_empty()) || no.is_empty();
        let pool = if use_yes { yes } else { no };
        (
            pool.choose(rng)
                .expect("one of the pools is non-empty")
                .clone(),
            use_yes,
        )
    };
    let (subject, answer) = match rng.gen_range(0..3) {
        0 => {
            let (yes, no): (Vec<String>, Vec<String>) = Color::ALL
                .iter()
                .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
                .map(|(c, s)| {
                    (
                        format!("{} {} {}", article(c.name()), c.name(), s.name()),
                        scene.has(c, s),
                    )
                })
                .fold((vec![], vec![]), split_by_truth);
            pick(&yes, &no, rng)
        }
        1 => {
            let (yes, no) = Shape::ALL
                .iter()
                .map(|&s| {
                    (
                        format!("{} {}", article(s.name()), s.name()),
                        scene.count_shape(s) > 0,
                    )
                })
                .fold((vec![], vec![]), split_by_truth);
            pick(&yes, &no, rng)
        }
        _ => {
            let (yes, no) = Color::ALL
                .iter()
                .map(|&c| {
                    (
                        format!("{} {} shape", article(c.name()), c.name()),
                        scene.count_color(c) > 0,
                    )
                })
                .fold((vec![], vec![]), split_by_truth);
            pick(&yes, &no, rng)
        }
    };
    Qa::new(
        Category::Existence,
        format!("Is there {subject} in the image?"),
        yes_no(answer),
        &[],
    )
}

fn split_by_truth(
    mut acc: (Vec<String>, Vec<String>),
    (text, holds): (String, bool),
) -> (Vec<String>, Vec<String>) {
    if holds {
        acc.0.push(text)
    } else {
        acc.1.push(text)
    }
    acc
}

/// Text-only questions (no image): facts about the shapes and colours of the world.
pub const TEXT_ONLY: [(&str, &str); 12] = [
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many points does a star have?", "5"),
    ("How many arms does a cross have?", "4"),
    ("Does a circle have corners?", "no"),
    ("Does a square have corners?", "yes"),
    ("What shape has three sides?", "triangle"),
    ("What shape has four equal sides?", "square"),
    ("What shape is perfectly round?", "circle"),
    ("What color do you get by mixing red and yellow?", "orange"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and blue?", "purple"),
];

/// The multi-turn questions of one instruction sample: 3–5 distinct questions of random
/// categories, a detailed description in about one sample of five.
pub fn instruction_rounds(scene: &Scene, rng: &mut impl Rng) -> Vec<Qa> {
    let want = rng.gen_range(3..=5);
    let mut rounds: Vec<Qa> = Vec::new();
    let mut attempts = 0;
    while rounds.len() < want && attempts < 50 {
        attempts += 1;
        let category = if rng.gen_bool(0.05) {
            Category::Detail
        } else {
            *Category::SHORT.choose(rng).expect("non-empty")
        };
        if let Some(qa) = question(scene, category, rng) {
            if !rounds.iter().any(|r| r.question == qa.question) {
                rounds.push(qa);
            }
        }
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::super::scene::Size;
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn obj(shape: Shape, color: Color, size: Size, row: u8, col: u8) -> Object {
        Object {
            shape,
            color,
            size,
            cell: Cell { row, col },
            offset: (0.0, 0.0),
            scale: 1.0,
            tint: [0; 3],
        }
    }

    fn scene() -> Scene {
        Scene {
            objects: vec![
                obj(Shape::Circle, Color::Red, Size::Large, 0, 0),
                obj(Shape::Circle, Color::Blue, Size::Small, 1, 1),
                obj(Shape::Star, Color::Red, Size::Small, 2, 2),
            ],
            noise_seed: 0,
            background: 235,
        }
    }

    #[test]
    fn captions_and_description_are_hand_checked() {
        let s = scene();
        assert_eq!(
            captions(&s),
            vec![
                "A large red circle, a small blue circle and a small red star.",
                "A large red circle in the top left, a small blue circle in the center and a small red star in the bottom right.",
                "Three shapes: a large red circle, a small blue circle and a small red star.",
                "A picture of a red circle, a blue circle and a red star.",
                "A red circle, a blue circle and a red star on a light grey background.",
            ]
        );
        assert_eq!(
            detailed_description(&s),
            "There are three shapes. A large red circle is in the top left. A small blue circle is in the center. A small red star is in the bottom right."
        );
    }

    #[test]
    fn answers_follow_from_the_scene() {
        let s = scene();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..300 {
            for category in Category::SHORT {
                let qa = question(&s, category, &mut rng).unwrap();
                let q = qa.question.as_str();
                let expected = match q {
                    "What color is the star?" => "red",
                    "What color is the circle in the top left?" => "red",
                    "What color is the circle in the center?" => "blue",
                    "What shape is the blue object?" => "circle",
                    "What shape is the red object in the top left?" => "circle",
                    "What shape is the red object in the bottom right?" => "star",
                    "Is the red circle large or small?" => "large",
                    "Is the red star large or small?" | "Is the blue circle large or small?" => {
                        "small"
                    }
                    "How many shapes are there?" => "3",
                    "How many red shapes are there?" | "How many circles are there?" => "2",
                    "How many blue shapes are there?" | "How many stars are there?" => "1",
                    "Where is the blue circle?" => "center",
                    "Is the red circle above the red star?"
                    | "Is the red star to the right of the blue circle?" => "yes",
                    "Is the red star above the red circle?"
                    | "Is the blue circle to the left of the red circle?" => "no",
                    "Is there a red star in the image?" | "Is there a circle in the image?" => {
                        "yes"
                    }
                    "Is there a green shape in the image?"
                    | "Is there a triangle in the image?" => "no",
                    _ => continue,
                };
                assert_eq!(qa.answer, expected, "{q}");
            }
        }
        // Colour counts of absent colours are zero, and count answers accept the word.
        let qa = Qa::new(
            Category::Count,
            "How many green shapes are there?".into(),
            "0",
            &["zero"],
        );
        assert_eq!(qa.accepted, vec!["0", "zero"]);
    }

    #[test]
    fn relation_and_existence_answers_are_balanced() {
        let s = scene();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for category in [Category::Relation, Category::Existence] {
            let yes = (0..400)
                .filter(|_| question(&s, category, &mut rng).unwrap().answer == "yes")
                .count();
            assert!((160..240).contains(&yes), "{category:?}: {yes} yes of 400");
        }
    }
}
