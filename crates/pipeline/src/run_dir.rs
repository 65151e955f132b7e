//! Run folders are self-describing: the resolved config is saved beside the weights.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

/// Writes `<dir>/config.toml`: the config as resolved after defaults and flags.
pub fn write_config<T: Serialize>(dir: &Path, config: &T) -> Result<()> {
    let text = ldm_common::config::to_toml(config);
    ldm_common::checkpoint::atomic_write(&dir.join("config.toml"), text.as_bytes())?;
    Ok(())
}
