//! Per-cell labels of the synthetic scenes (`scenes.jsonl`): what a vision encoder pre-trained on
//! this world learns to see in each cell of the 3×3 grid (shape, colour and size of the object
//! there, or "empty").

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use super::scene::{Color, Shape, Size};

/// Cells per side of the scenes' grid.
pub const GRID: usize = 3;

/// The attributes labelled per cell, each a class index; the last class of each means "empty".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    Shape,
    Color,
    Size,
}

impl Attribute {
    pub const ALL: [Attribute; 3] = [Attribute::Shape, Attribute::Color, Attribute::Size];

    pub fn name(self) -> &'static str {
        match self {
            Attribute::Shape => "shape",
            Attribute::Color => "color",
            Attribute::Size => "size",
        }
    }

    /// Number of classes, "empty" included.
    pub fn classes(self) -> usize {
        1 + match self {
            Attribute::Shape => Shape::ALL.len(),
            Attribute::Color => Color::ALL.len(),
            Attribute::Size => Size::ALL.len(),
        }
    }

    /// The class of an empty cell.
    pub fn empty(self) -> u32 {
        (self.classes() - 1) as u32
    }
}

/// One scene's labels: `cells[row * 3 + col][attribute]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SceneCells {
    pub id: String,
    /// Image path relative to the data root.
    pub image: String,
    pub cells: [[u32; 3]; GRID * GRID],
}

impl SceneCells {
    /// The labels of a `grid × grid` patch grid laid over the image: each patch takes the
    /// cell its centre lies in (patch `p` = row-major index).
    pub fn patch_labels(&self, grid: usize, attribute: Attribute) -> Vec<u32> {
        let column = Attribute::ALL
            .iter()
            .position(|a| *a == attribute)
            .expect("every attribute is in ALL");
        let cell_of = |i: usize| ((2 * i + 1) * GRID) / (2 * grid);
        (0..grid * grid)
            .map(|p| self.cells[cell_of(p / grid) * GRID + cell_of(p % grid)][column])
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SceneRecord {
    id: String,
    image: String,
    objects: Vec<ObjectRecord>,
}

/// The fields of an object the labels need (its `position` name is left unread).
#[derive(Deserialize)]
struct ObjectRecord {
    shape: String,
    color: String,
    size: String,
    row: usize,
    col: usize,
}

fn class_of<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str, value: &str) -> Option<u32> {
    all.iter().position(|x| name(*x) == value).map(|i| i as u32)
}

fn parse_record(record: SceneRecord) -> Result<SceneCells> {
    let empty = Attribute::ALL.map(Attribute::empty);
    let mut cells = [empty; GRID * GRID];
    for (i, o) in record.objects.iter().enumerate() {
        let what = || format!("object {i} of scene `{}`", record.id);
        ensure!(
            o.row < GRID && o.col < GRID,
            "{}: cell ({}, {}) is outside the 3×3 grid",
            what(),
            o.row,
            o.col
        );
        let shape = class_of(&Shape::ALL, Shape::name, &o.shape)
            .with_context(|| format!("{}: unknown shape `{}`", what(), o.shape))?;
        let color = class_of(&Color::ALL, Color::name, &o.color)
            .with_context(|| format!("{}: unknown color `{}`", what(), o.color))?;
        let size = class_of(&Size::ALL, Size::name, &o.size)
            .with_context(|| format!("{}: unknown size `{}`", what(), o.size))?;
        let cell = &mut cells[o.row * GRID + o.col];
        ensure!(
            *cell == empty,
            "{}: cell ({}, {}) already holds an object",
            what(),
            o.row,
            o.col
        );
        *cell = [shape, color, size];
    }
    Ok(SceneCells {
        id: record.id,
        image: record.image,
        cells,
    })
}

/// Reads a `scenes.jsonl` written by `mmkd data synth`. A bad line is an error naming the file
/// and line: these are labels of the project's own data, not user samples to skip.
pub fn read_scene_cells(path: &Path) -> Result<Vec<SceneCells>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut scenes = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let record: SceneRecord =
            serde_json::from_str(&line).with_context(|| format!("{}: not a scene record", at()))?;
        scenes.push(parse_record(record).with_context(at)?);
    }
    if scenes.is_empty() {
        bail!("{} holds no scene", path.display());
    }
    Ok(scenes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scenes.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const LINE: &str = r#"{"id":"train-000000","image":"images/train/000000.png","objects":[{"shape":"star","color":"purple","size":"small","row":0,"col":2,"position":"top right"},{"shape":"circle","color":"red","size":"large","row":2,"col":1,"position":"bottom"}]}"#;

    #[test]
    fn cells_hold_their_objects_and_the_rest_are_empty() {
        let (_dir, path) = write(&format!("{LINE}\n"));
        let scenes = read_scene_cells(&path).unwrap();
        assert_eq!(scenes.len(), 1);
        let s = &scenes[0];
        assert_eq!(s.image, "images/train/000000.png");
        assert_eq!(s.cells[2], [3, 4, 0]); // star, purple, small
        assert_eq!(s.cells[7], [0, 0, 1]); // circle, red, large
        assert_eq!(s.cells[0], [5, 6, 2]); // empty
                                           // One patch per cell: the cells themselves.
        assert_eq!(
            s.patch_labels(3, Attribute::Shape),
            vec![5, 5, 3, 5, 5, 5, 5, 0, 5]
        );
        // A 6×6 patch grid: 2×2 patches per cell.
        let six = s.patch_labels(6, Attribute::Color);
        assert_eq!(six.len(), 36);
        for (p, class) in six.iter().enumerate() {
            let cell = (p / 6 / 2) * 3 + (p % 6) / 2;
            assert_eq!(*class, s.cells[cell][1], "patch {p}");
        }
    }

    #[test]
    fn bad_lines_name_the_file_line_and_problem() {
        let bad = LINE.replace("\"star\"", "\"hexagon\"");
        let (_dir, path) = write(&format!("{LINE}\n{bad}\n"));
        let err = format!("{:#}", read_scene_cells(&path).unwrap_err());
        assert!(err.contains("scenes.jsonl line 2"), "{err}");
        assert!(err.contains("unknown shape `hexagon`"), "{err}");

        let outside = LINE.replace("\"row\":0", "\"row\":3");
        let (_dir, path) = write(&outside);
        let err = format!("{:#}", read_scene_cells(&path).unwrap_err());
        assert!(
            err.contains("line 1") && err.contains("outside the 3×3 grid"),
            "{err}"
        );

        let (_dir, path) = write("{\"id\": 1}\n");
        let err = format!("{:#}", read_scene_cells(&path).unwrap_err());
        assert!(err.contains("line 1: not a scene record"), "{err}");

        let (_dir, path) = write("\n");
        let err = format!("{:#}", read_scene_cells(&path).unwrap_err());
        assert!(err.contains("holds no scene"), "{err}");
    }
}
