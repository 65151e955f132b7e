//! Errors of the VAE stage.

/// A VAE config or checkpoint that cannot be used; the message names key, value and expectation.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("{key} = {value}: expected {expected}")]
    InvalidConfig {
        key: String,
        value: String,
        expected: String,
    },
}

/// Shorthand for the crate's results.
pub type Result<T> = std::result::Result<T, VaeError>;
