//! Errors of the yardsticks: every message names the value and what was expected.

/// Inputs a metric or the evaluator cannot be computed on.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{what}: shapes differ, {left} vs {right}")]
    ShapeMismatch {
        what: &'static str,
        left: String,
        right: String,
    },
    #[error("{what}: no images; expected at least one")]
    NoImages { what: &'static str },
    #[error(
        "SSIM needs images of at least {window}x{window} pixels (its Gaussian window), got {height}x{width}"
    )]
    ImageTooSmall {
        height: usize,
        width: usize,
        window: usize,
    },
    #[error(
        "{what}: {len} values do not form rows of {dim} features; expected a multiple of {dim}"
    )]
    RaggedFeatures {
        what: String,
        len: usize,
        dim: usize,
    },
    #[error(
        "feature sets differ in dimension: real d = {real}, generated d = {generated}; both must come from the same evaluator"
    )]
    FeatureDims { real: usize, generated: usize },
    #[error("FID needs more samples than feature dimensions: got n = {n} for d = {d}; use -n {} or more", d + 1)]
    TooFewSamples { n: usize, d: usize },
    #[error("KID needs at least 2 samples per set; one set has {n}")]
    TooFewForKernel { n: usize },
    #[error("precision/recall with k = {k} needs at least {} samples per set; the {which} set has {n}", k + 1)]
    TooFewForNeighbours {
        which: &'static str,
        n: usize,
        k: usize,
    },
    #[error("{key} = {value}: expected {expected}")]
    InvalidConfig {
        key: String,
        value: String,
        expected: String,
    },
}

/// Shorthand for the crate's results.
pub type Result<T> = std::result::Result<T, EvalError>;
