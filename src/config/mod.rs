//! Presets: TOML files with inheritance (`inherits = "name"`) and `--set key=value` overrides,
//! validated against typed settings so an unknown or misspelt key is an error naming it.

pub mod keys;
pub mod preset;
pub mod settings;
mod stage;
mod tables;
pub mod tower;

pub use preset::{builtin_preset_names, load_document, Document};
pub use settings::{
    DataSettings, LoraSettings, ModelSpec, Module, Role, Stage, StageSettings, TrainSettings,
};
