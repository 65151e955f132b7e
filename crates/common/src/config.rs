//! Typed TOML configs: read with `deny_unknown_fields`, errors naming the file and the key.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{CommonError, Result};

/// Reads a TOML file into a typed config; unknown keys and wrong types name the file and key.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| CommonError::io(path, e))?;
    parse_toml(&text).map_err(|message| CommonError::Config {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses TOML text; the error is one line naming the key and the problem.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start].matches('\n').count() + 1;
                format!("line {line}: {msg}")
            }
            None => msg,
        }
    })
}

/// Serialises a config as TOML (for the resolved config saved with every run).
pub fn to_toml<T: serde::Serialize>(value: &T) -> String {
    toml::to_string_pretty(value).expect("configs are plain data")
}
