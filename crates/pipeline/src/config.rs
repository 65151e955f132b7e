//! Config files of the commands: typed, with defaults, unknown keys refused.

use std::path::Path;

use anyhow::Result;
use serde::de::DeserializeOwned;

/// Reads a TOML config; errors name the file, line and key.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    Ok(ldm_common::config::read_toml(path)?)
}

/// Parses TOML text (defaults for absent keys).
pub fn parse_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    ldm_common::config::parse_toml(text)
}
