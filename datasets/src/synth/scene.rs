//! The synthetic world: scenes of 1–4 coloured shapes on a 3×3 grid, and their random generation.
//!
//! Within a scene every object has its own cell and its own (colour, shape) pair, so "the red
//! circle" always names exactly one object. A scene's identity ([`Scene::key`]) is its set of
//! (shape, colour, size, cell); jitter and noise are not part of it, so two splits never share a
//! scene that differs only in noise.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Cross,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Star => "stars",
            Shape::Cross => "crosses",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    /// The colour's nominal RGB value (objects are jittered around it).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [215, 40, 40],
            Color::Green => [40, 160, 60],
            Color::Blue => [40, 80, 215],
            Color::Yellow => [230, 200, 20],
            Color::Purple => [135, 55, 185],
            Color::Orange => [240, 125, 20],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

/// A cell of the 3×3 grid; row 0 is the top, column 0 the left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cell {
    pub row: u8,
    pub col: u8,
}

impl Cell {
    pub fn all() -> impl Iterator<Item = Cell> {
        (0..3).flat_map(|row| (0..3).map(move |col| Cell { row, col }))
    }

    /// "top left", "top", "top right", "left", "center", ... (short answers).
    pub fn name(self) -> &'static str {
        const NAMES: [[&str; 3]; 3] = [
            ["top left", "top", "top right"],
            ["left", "center", "right"],
            ["bottom left", "bottom", "bottom right"],
        ];
        NAMES[self.row as usize][self.col as usize]
    }

    /// Other ways of saying the same position, accepted as answers.
    pub fn synonyms(self) -> &'static [&'static str] {
        const SYN: [[&[&str]; 3]; 3] = [
            [
                &["upper left", "top-left"],
                &["top center", "top middle", "upper middle"],
                &["upper right", "top-right"],
            ],
            [
                &["middle left", "center left"],
                &["middle", "centre"],
                &["middle right", "center right"],
            ],
            [
                &["lower left", "bottom-left"],
                &["bottom center", "bottom middle", "lower middle"],
                &["lower right", "bottom-right"],
            ],
        ];
        SYN[self.row as usize][self.col as usize]
    }
}

/// One shape in a scene. Jitter and scale are rendering details, not part of the scene's identity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    pub cell: Cell,
    /// Offset of the centre from the cell centre, in cell widths (|x|, |y| ≤ 0.1).
    #[serde(skip)]
    pub offset: (f32, f32),
    /// Size multiplier around the nominal size (0.92–1.08).
    #[serde(skip)]
    pub scale: f32,
    /// Per-channel colour shift (±12).
    #[serde(skip)]
    pub tint: [i16; 3],
}

impl Object {
    /// "red circle": unique within its scene.
    pub fn name(&self) -> String {
        format!("{} {}", self.color.name(), self.shape.name())
    }
}

/// A scene: objects in reading order (by row, then column), plus the seed of its pixel noise.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scene {
    pub objects: Vec<Object>,
    #[serde(skip)]
    pub noise_seed: u64,
    /// Background grey level (226–244).
    #[serde(skip)]
    pub background: u8,
}

/// What identifies a scene across splits.
pub type SceneKey = Vec<(Shape, Color, Size, Cell)>;

impl Scene {
    pub fn key(&self) -> SceneKey {
        self.objects
            .iter()
            .map(|o| (o.shape, o.color, o.size, o.cell))
            .collect()
    }

    pub fn has(&self, color: Color, shape: Shape) -> bool {
        self.objects
            .iter()
            .any(|o| o.color == color && o.shape == shape)
    }

    pub fn count_color(&self, color: Color) -> usize {
        self.objects.iter().filter(|o| o.color == color).count()
    }

    pub fn count_shape(&self, shape: Shape) -> usize {
        self.objects.iter().filter(|o| o.shape == shape).count()
    }

    /// Draw a scene with `count` objects (1–4).
    pub fn random(rng: &mut impl Rng, count: usize) -> Scene {
        let mut cells: Vec<Cell> = Cell::all().collect();
        cells.shuffle(rng);
        let mut kinds: Vec<(Color, Shape)> = Color::ALL
            .iter()
            .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
            .collect();
        kinds.shuffle(rng);
        let mut objects: Vec<Object> = cells
            .into_iter()
            .zip(kinds)
            .take(count)
            .map(|(cell, (color, shape))| Object {
                shape,
                color,
                size: Size::ALL[rng.gen_range(0..2)],
                cell,
                offset: (rng.gen_range(-0.1..=0.1), rng.gen_range(-0.1..=0.1)),
                scale: rng.gen_range(0.92..=1.08),
                tint: [
                    rng.gen_range(-12..=12),
                    rng.gen_range(-12..=12),
                    rng.gen_range(-12..=12),
                ],
            })
            .collect();
        objects.sort_by_key(|o| o.cell);
        Scene {
            objects,
            noise_seed: rng.gen(),
            background: rng.gen_range(226..=244),
        }
    }
}
