//! Reading preset documents: built-in presets (shipped in `configs/`) or files, inheritance,
//! and dotted `--set` overrides.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

/// Presets compiled into the binary, so `--config NAME` works from any directory.
const BUILTIN: &[(&str, &str)] = &[
    (
        "shapes-tiny",
        include_str!("../../configs/shapes-tiny.toml"),
    ),
    (
        "shapes-small",
        include_str!("../../configs/shapes-small.toml"),
    ),
    (
        "llava-kd-qwen1.5-0.5b",
        include_str!("../../configs/llava-kd-qwen1.5-0.5b.toml"),
    ),
    (
        "llava-kd-qwen2.5-0.5b",
        include_str!("../../configs/llava-kd-qwen2.5-0.5b.toml"),
    ),
    ("switch-kd", include_str!("../../configs/switch-kd.toml")),
    ("gkd", include_str!("../../configs/gkd.toml")),
    (
        "gkd-qwen1.5-0.5b",
        include_str!("../../configs/gkd-qwen1.5-0.5b.toml"),
    ),
    ("minillm", include_str!("../../configs/minillm.toml")),
    (
        "minillm-qwen1.5-0.5b",
        include_str!("../../configs/minillm-qwen1.5-0.5b.toml"),
    ),
    (
        "switch-kd-qwen1.5-0.5b",
        include_str!("../../configs/switch-kd-qwen1.5-0.5b.toml"),
    ),
];

pub fn builtin_preset_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// A merged preset document and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    pub table: Table,
    /// The chain of presets read, child first (for messages).
    pub origin: Vec<String>,
    /// The `--set` assignments applied, in order (see [`Document::set`]).
    pub overrides: Vec<String>,
}

impl Document {
    /// Applies one `--set key.path=value` and remembers it: when a stage's settings are
    /// resolved, the overrides of `train.*` and `stages.<stage>.*` are applied once more on
    /// top of every layer (the role tables included), so a `--set` always wins.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        apply_override(&mut self.table, assignment)?;
        self.overrides.push(assignment.to_string());
        Ok(())
    }
}

/// Loads a preset by built-in name or file path, resolving `inherits` chains (a file's
/// relative `inherits` path is resolved against its directory).
pub fn load_document(spec: &str) -> Result<Document> {
    let mut origin = Vec::new();
    let table = load_recursive(spec, None, &mut origin)?;
    Ok(Document {
        table,
        origin,
        overrides: Vec::new(),
    })
}

fn read_preset(spec: &str, base: Option<&Path>) -> Result<(String, Table, Option<PathBuf>)> {
    let candidates: Vec<PathBuf> = match base {
        Some(dir) => vec![dir.join(spec), PathBuf::from(spec)],
        None => vec![PathBuf::from(spec)],
    };
    for path in &candidates {
        if path.is_file() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading preset {}", path.display()))?;
            let table: Table = toml::from_str(&text)
                .with_context(|| format!("invalid TOML in preset {}", path.display()))?;
            return Ok((
                path.display().to_string(),
                table,
                path.parent().map(Path::to_path_buf),
            ));
        }
    }
    let name = spec.trim_end_matches(".toml");
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
        let table: Table = toml::from_str(text)
            .with_context(|| format!("invalid TOML in built-in preset `{name}`"))?;
        return Ok((format!("preset `{name}`"), table, None));
    }
    bail!(
        "no preset `{spec}`: not a file, and not a built-in preset ({})",
        builtin_preset_names().join(", ")
    )
}

fn load_recursive(spec: &str, base: Option<&Path>, origin: &mut Vec<String>) -> Result<Table> {
    let (name, mut table, dir) = read_preset(spec, base)?;
    if origin.contains(&name) {
        bail!("preset inheritance cycle: {} → {name}", origin.join(" → "));
    }
    origin.push(name.clone());
    match table.remove("inherits") {
        None => Ok(table),
        Some(Value::String(parent)) => {
            let mut merged = load_recursive(&parent, dir.as_deref(), origin)?;
            merge(&mut merged, table);
            Ok(merged)
        }
        Some(other) => bail!("{name}: `inherits` must be a preset name or path, found {other}"),
    }
}

/// Deep-merges `child` over `parent`: tables merge key by key, anything else is replaced.
pub fn merge(parent: &mut Table, child: Table) {
    for (key, value) in child {
        match (parent.get_mut(&key), value) {
            (Some(Value::Table(p)), Value::Table(c)) => merge(p, c),
            (_, v) => {
                parent.insert(key, v);
            }
        }
    }
}

/// Applies one `key.path=value` override. The value is read as TOML (`3`, `1e-4`, `true`,
/// `"text"`, `[1, 2]`); anything that does not parse is taken as a string.
pub fn apply_override(table: &mut Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set `{assignment}`: expected key=value"))?;
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        bail!("--set `{assignment}`: empty key");
    }
    let value = parse_value(raw.trim());
    let mut keys: Vec<&str> = path.split('.').collect();
    let last = keys.pop().expect("non-empty path");
    let mut cursor = table;
    for key in keys {
        let entry = cursor
            .entry(key.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cursor = match entry {
            Value::Table(t) => t,
            other => bail!("--set `{assignment}`: `{key}` is {other}, not a table"),
        };
    }
    cursor.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inheritance_merges_tables_and_overrides_parse_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.toml"),
            "[train]\nlr = 1.0\nbatch_size = 4\n[data]\nmax_length = 64\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("child.toml"),
            "inherits = \"base.toml\"\n[train]\nlr = 2.0\n",
        )
        .unwrap();
        let mut doc = load_document(dir.path().join("child.toml").to_str().unwrap()).unwrap();
        assert_eq!(doc.table["train"]["lr"].as_float(), Some(2.0));
        assert_eq!(doc.table["train"]["batch_size"].as_integer(), Some(4));
        assert_eq!(doc.origin.len(), 2);
        apply_override(&mut doc.table, "train.lr=1e-4").unwrap();
        apply_override(&mut doc.table, "data.template=phi").unwrap();
        apply_override(&mut doc.table, "stages.sft.epochs=3").unwrap();
        assert_eq!(doc.table["train"]["lr"].as_float(), Some(1e-4));
        assert_eq!(doc.table["data"]["template"].as_str(), Some("phi"));
        assert_eq!(doc.table["stages"]["sft"]["epochs"].as_integer(), Some(3));
        let err = apply_override(&mut doc.table, "train.lr.x=1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a table"), "{err}");
        assert!(apply_override(&mut doc.table, "novalue").is_err());
    }

    #[test]
    fn cycles_and_unknown_presets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "inherits = \"b.toml\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "inherits = \"a.toml\"\n").unwrap();
        let err = load_document(dir.path().join("a.toml").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cycle"), "{err}");
        let err = load_document("no-such-preset").unwrap_err().to_string();
        assert!(err.contains("shapes-tiny"), "{err}");
    }

    #[test]
    fn every_builtin_preset_parses_and_resolves_every_stage() {
        use crate::config::{Role, Stage, StageSettings};
        for name in builtin_preset_names() {
            let doc = load_document(name).unwrap();
            for stage in Stage::ALL {
                StageSettings::resolve(&doc, stage, Role::Student)
                    .unwrap_or_else(|e| panic!("{name} {}: {e:#}", stage.name()));
            }
        }
        let doc = load_document("switch-kd").unwrap();
        let dft = StageSettings::resolve(&doc, Stage::Dft, Role::Student).unwrap();
        let terms: Vec<&str> = dft.objective.iter().map(|t| t.term.as_str()).collect();
        assert_eq!(terms, ["ce", "mdist.response", "switch"]);
        assert_eq!(
            dft.objective[2].divergence,
            Some(crate::distill::Divergence::Dbild { max_k: 16 })
        );
        // GKD's paper settings on the real recipe; the stage's defaults elsewhere.
        let doc = load_document("gkd-qwen1.5-0.5b").unwrap();
        let gkd = StageSettings::resolve(&doc, Stage::Gkd, Role::Student).unwrap();
        let rollout = gkd.train.rollout.as_ref().unwrap();
        assert_eq!((rollout.lambda, rollout.temperature), (0.5, 0.9));
        assert_eq!(gkd.objective[0].term, "gkd");
        assert_eq!(gkd.objective[0].beta, Some(0.5));
        assert_eq!((gkd.train.lr, gkd.train.grad_accum), (2e-5, 8));
        let plain = StageSettings::resolve(
            &load_document("shapes-tiny").unwrap(),
            Stage::Gkd,
            Role::Student,
        )
        .unwrap();
        // The stage's defaults (GKD's), with the shapes world's shorter answers.
        assert_eq!(
            plain.train.rollout,
            Some(crate::config::settings::RolloutSettings {
                max_new_tokens: 32,
                ..Default::default()
            })
        );
        assert_eq!(plain.objective.len(), 1);
        let dft = StageSettings::resolve(&doc, Stage::Dft, Role::Student).unwrap();
        assert_eq!(dft.train.rollout, None, "DFT stays teacher-forced");
    }
}
