use std::path::PathBuf;

/// Errors raised while building, loading or saving parameters.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("tensor `{name}` is missing from {origin}")]
    MissingTensor { name: String, origin: String },
    #[error("tensor `{name}` in {origin} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        origin: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("cannot read safetensors file {path}: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, NnError>;

impl NnError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NnError::Io {
            path: path.into(),
            source,
        }
    }
}
