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

/// The variant of `all` whose `name` is `s`, or an [`DiffusionError::InvalidConfig`] for `key`
/// listing every name: the `FromStr` of the enums named in configs and on the command line.
pub(crate) fn parse_name<T: Copy>(
    key: &str,
    s: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T> {
    all.iter()
        .copied()
        .find(|&k| name(k) == s)
        .ok_or_else(|| DiffusionError::InvalidConfig {
            key: key.into(),
            value: s.into(),
            expected: format!(
                "one of {}",
                all.iter().map(|&k| name(k)).collect::<Vec<_>>().join(", ")
            ),
        })
}
