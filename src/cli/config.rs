//! `mmkd config keys | show`: every preset key with its type, value and meaning, and the
//! settings a stage resolves to.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::config::keys::{markdown, value_of, KEYS};
use crate::config::settings::expand_override;
use crate::config::tower::TowerSettings;
use crate::config::{load_document, Role, Stage, StageSettings};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Every preset key: its type, its value in the preset for a stage and role, what it does.
    Keys(Which),
    /// The settings a stage resolves to from the preset, its role tables and `--set`s, as TOML
    /// (what `summary.json` records as `settings`), and the preset's `[tower]`.
    Show(Which),
}

/// Which preset, stage and role to resolve.
#[derive(Debug, Args)]
pub struct Which {
    /// Preset name (shapes-tiny, shapes-small, llava-kd-qwen1.5-0.5b, llava-kd-qwen2.5-0.5b) or TOML file.
    #[arg(default_value = "shapes-small")]
    pub preset: String,
    /// The stage whose settings are resolved.
    #[arg(long, value_enum, default_value = "sft")]
    pub stage: Stage,
    /// The model of the preset (its `[<role>.…]` tables apply).
    #[arg(long, value_enum, default_value = "student")]
    pub role: Role,
    /// Override a value as the stages do (`--set lr=1e-4` = `stages.<stage>.lr`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The stage's settings as JSON, with the preset's `[tower]` (`mmkd tower`) as `tower`.
fn resolve(which: &Which) -> Result<serde_json::Value> {
    let mut doc = load_document(&which.preset)?;
    for set in &which.set {
        doc.set(&expand_override(set, which.stage))?;
    }
    let mut json = StageSettings::resolve(&doc, which.stage, which.role)?.as_json();
    json["tower"] = TowerSettings::resolve(&doc)?.as_json();
    Ok(json)
}

pub fn run(args: ConfigArgs) -> Result<()> {
    match args.command {
        ConfigCommand::Keys(which) => {
            let json = resolve(&which)?;
            println!(
                "Preset keys (values: `{}`, stage {}, role {}). `train.*` keys may also be set \
                 per stage (`[stages.<stage>]`) and per role (`[<role>.train]`, \
                 `[<role>.stages.<stage>]`); later layers win and `--set` wins over all.\n",
                which.preset,
                which.stage.name(),
                which.role.name()
            );
            print!("{}", markdown(&values(&json)));
        }
        ConfigCommand::Show(which) => {
            let json = resolve(&which)?;
            let toml = json_to_toml(&json).unwrap_or(toml::Value::Table(Default::default()));
            println!("{}", toml::to_string_pretty(&toml)?);
        }
    }
    Ok(())
}

/// `section.key` → the value in `settings`, as the table shows it.
fn values(json: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "—".to_string(),
        serde_json::Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    };
    for key in KEYS {
        out.insert(key.key.to_string(), show(value_of(json, key.key)));
    }
    out
}

/// JSON as TOML, nulls (unset options) left out.
fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(a) => toml::Value::Array(a.iter().filter_map(json_to_toml).collect()),
        J::Object(o) => toml::Value::Table(
            o.iter()
                .filter_map(|(k, v)| json_to_toml(v).map(|v| (k.clone(), v)))
                .collect(),
        ),
    })
}
