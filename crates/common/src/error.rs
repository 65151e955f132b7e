//! Errors of the shared crate: every message names the file, key or value and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong reading data, images, configs and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// The message includes the I/O error's own, so it is not also a `source` (anyhow's `{:#}`
    /// would print it twice).
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Dataset { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("--device {0}")]
    Device(String),
}

impl CommonError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }

    /// A problem with a dataset file or folder.
    pub fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Dataset {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Shorthand for the crate's results.
pub type Result<T> = std::result::Result<T, CommonError>;
