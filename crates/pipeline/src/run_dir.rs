//! Run folders are self-describing: the resolved config is saved beside the weights.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `<dir>/config.toml`: the config as resolved after defaults and flags.
pub fn write_config<T: Serialize>(dir: &Path, config: &T) -> Result<()> {
    let text = ldm_common::config::to_toml(config);
    ldm_common::checkpoint::atomic_write(&dir.join("config.toml"), text.as_bytes())?;
    Ok(())
}

/// Fails with one line naming the first of `files` missing from `dir` and the command that
/// makes it (`how`, e.g. "pipeline train-vae --out runs/vae").
pub fn require(dir: &Path, what: &str, files: &[&str], how: &str) -> Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: no such {what} folder (make one with `{how}`)",
            dir.display()
        );
    }
    if let Some(file) = files.iter().find(|f| !dir.join(f).exists()) {
        anyhow::bail!(
            "{}: incomplete {what}, {file} is missing (was training interrupted? finish it with `{how} --resume`)",
            dir.display()
        );
    }
    Ok(())
}

/// Reads a trained run folder: `require`s its `config.toml`, `info_file` and
/// `model.safetensors`, then parses the config and the info JSON.
pub fn read<C: DeserializeOwned, I: DeserializeOwned>(
    dir: &Path,
    what: &str,
    info_file: &str,
    how: &str,
) -> Result<(C, I)> {
    require(
        dir,
        what,
        &["config.toml", info_file, "model.safetensors"],
        how,
    )?;
    let config = crate::config::read(&dir.join("config.toml"))?;
    let info = ldm_common::checkpoint::read_json(&dir.join(info_file))?;
    Ok((config, info))
}
