//! POPE-style object-existence probes: for every object in an image one "yes" question and one
//! "no" question about an absent object, with three ways of choosing the absent object.
//!
//! Objects are (colour, shape) kinds. `random` draws any absent kind; `popular` takes the absent
//! kinds most frequent in the split (POPE's popular setting); `adversarial` draws an absent kind
//! that shares the colour or the shape of the present object it pairs with: the near misses a
//! model that half-sees the image gets wrong (POPE's co-occurrence setting has no meaning in a
//! world where every pair co-occurs equally often).

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::Rng;

use super::language::article;
use super::scene::{Color, Object, Scene, Shape};

/// How negatives are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopeSetting {
    Random,
    Popular,
    Adversarial,
}

impl PopeSetting {
    pub const ALL: [PopeSetting; 3] = [
        PopeSetting::Random,
        PopeSetting::Popular,
        PopeSetting::Adversarial,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PopeSetting::Random => "random",
            PopeSetting::Popular => "popular",
            PopeSetting::Adversarial => "adversarial",
        }
    }
}

pub type Kind = (Color, Shape);

fn all_kinds() -> Vec<Kind> {
    Color::ALL
        .iter()
        .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
        .collect()
}

/// Kinds by decreasing frequency over `scenes` (ties in the fixed kind order).
pub fn popularity(scenes: &[Scene]) -> Vec<Kind> {
    let mut counts: HashMap<Kind, usize> = HashMap::new();
    for s in scenes {
        for o in &s.objects {
            *counts.entry((o.color, o.shape)).or_insert(0) += 1;
        }
    }
    let mut kinds = all_kinds();
    kinds.sort_by_key(|k| std::cmp::Reverse(counts.get(k).copied().unwrap_or(0)));
    kinds
}

/// (kind, present) pairs for one image: yes, no, yes, no, ...
pub fn probes(
    scene: &Scene,
    setting: PopeSetting,
    popular: &[Kind],
    rng: &mut impl Rng,
) -> Vec<(Kind, bool)> {
    let present: Vec<Kind> = scene.objects.iter().map(|o| (o.color, o.shape)).collect();
    let mut used: Vec<Kind> = Vec::new();
    let mut out = Vec::new();
    for (o, &kind) in scene.objects.iter().zip(&present) {
        let free = |k: &Kind| !present.contains(k) && !used.contains(k);
        let negative = match setting {
            PopeSetting::Random => all_kinds()
                .into_iter()
                .filter(free)
                .collect::<Vec<_>>()
                .choose(rng)
                .copied(),
            PopeSetting::Popular => popular.iter().copied().find(free),
            PopeSetting::Adversarial => {
                let near: Vec<Kind> = all_kinds()
                    .into_iter()
                    .filter(|k| free(k) && near_miss(o, *k))
                    .collect();
                near.choose(rng).copied().or_else(|| {
                    all_kinds()
                        .into_iter()
                        .filter(free)
                        .collect::<Vec<_>>()
                        .choose(rng)
                        .copied()
                })
            }
        };
        let Some(negative) = negative else { continue };
        used.push(negative);
        out.push((kind, true));
        out.push((negative, false));
    }
    out
}

fn near_miss(o: &Object, (color, shape): Kind) -> bool {
    o.color == color || o.shape == shape
}

/// POPE's question wording.
pub fn question((color, shape): Kind) -> String {
    format!(
        "Is there {} {} {} in the image?",
        article(color.name()),
        color.name(),
        shape.name()
    )
}

#[cfg(test)]
mod tests {
    use super::super::scene::{Cell, Size};
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn scene(kinds: &[Kind]) -> Scene {
        Scene {
            objects: kinds
                .iter()
                .enumerate()
                .map(|(i, &(color, shape))| Object {
                    shape,
                    color,
                    size: Size::Small,
                    cell: Cell {
                        row: 0,
                        col: i as u8,
                    },
                    offset: (0.0, 0.0),
                    scale: 1.0,
                    tint: [0; 3],
                })
                .collect(),
            noise_seed: 0,
            background: 235,
        }
    }

    #[test]
    fn negatives_are_absent_distinct_and_follow_their_setting() {
        let s = scene(&[(Color::Red, Shape::Circle), (Color::Blue, Shape::Star)]);
        let popular = popularity(&[
            scene(&[(Color::Green, Shape::Cross), (Color::Red, Shape::Circle)]),
            scene(&[(Color::Green, Shape::Cross), (Color::Yellow, Shape::Square)]),
        ]);
        assert_eq!(popular[0], (Color::Green, Shape::Cross));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for setting in PopeSetting::ALL {
            let p = probes(&s, setting, &popular, &mut rng);
            assert_eq!(p.len(), 4);
            assert_eq!(p[0], ((Color::Red, Shape::Circle), true));
            assert_eq!(p[2], ((Color::Blue, Shape::Star), true));
            let (n1, n2) = (p[1], p[3]);
            assert!(!n1.1 && !n2.1 && n1.0 != n2.0);
            assert!(!s.has(n1.0 .0, n1.0 .1) && !s.has(n2.0 .0, n2.0 .1));
            match setting {
                PopeSetting::Popular => assert_eq!(n1.0, (Color::Green, Shape::Cross)),
                PopeSetting::Adversarial => {
                    assert!(n1.0 .0 == Color::Red || n1.0 .1 == Shape::Circle, "{n1:?}");
                    assert!(n2.0 .0 == Color::Blue || n2.0 .1 == Shape::Star, "{n2:?}");
                }
                PopeSetting::Random => {}
            }
        }
        assert_eq!(
            question((Color::Red, Shape::Star)),
            "Is there a red star in the image?"
        );
    }
}
