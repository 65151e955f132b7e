//! Errors of the diffusion stage.

/// Everything that can go wrong in the diffusion crate; each message names the key or value and
/// what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A config value outside what the code supports.
    #[error("{key} = {value}: {expected}")]
    InvalidConfig {
        key: String,
        value: String,
        expected: String,
    },
    /// A sampling loop stopped because its progress callback asked it to.
    #[error("sampling cancelled after {done} of {total} steps")]
    Cancelled { done: usize, total: usize },
}

/// Shorthand for the crate's results.
pub type Result<T> = std::result::Result<T, DiffusionError>;
