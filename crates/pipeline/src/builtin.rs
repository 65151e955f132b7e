//! Config files compiled into the binary, so `pipeline` works from any folder; `--config`
//! takes a path or one of these names.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// `(name, TOML text)` of every built-in config.
pub const CONFIGS: &[(&str, &str)] = &[
    (
        "vae-fmnist",
        include_str!("../../../configs/vae-fmnist.toml"),
    ),
    (
        "vae-fmnist-full",
        include_str!("../../../configs/vae-fmnist-full.toml"),
    ),
    (
        "vae-animals",
        include_str!("../../../configs/vae-animals.toml"),
    ),
    (
        "ldm-fmnist",
        include_str!("../../../configs/ldm-fmnist.toml"),
    ),
    (
        "ldm-fmnist-unet",
        include_str!("../../../configs/ldm-fmnist-unet.toml"),
    ),
    (
        "ldm-animals",
        include_str!("../../../configs/ldm-animals.toml"),
    ),
    (
        "ldm-animals-text",
        include_str!("../../../configs/ldm-animals-text.toml"),
    ),
    (
        "evaluator-fmnist",
        include_str!("../../../configs/evaluator-fmnist.toml"),
    ),
    (
        "evaluator-animals",
        include_str!("../../../configs/evaluator-animals.toml"),
    ),
    (
        "classifier-animals",
        include_str!("../../../configs/classifier-animals.toml"),
    ),
    (
        "classifier-fmnist",
        include_str!("../../../configs/classifier-fmnist.toml"),
    ),
    (
        "fashion-mnist",
        include_str!("../../../pipelines/fashion-mnist.toml"),
    ),
    ("animals", include_str!("../../../pipelines/animals.toml")),
    (
        "animals-full",
        include_str!("../../../pipelines/animals-full.toml"),
    ),
];

/// Where [`resolve`] writes this process's built-in configs (and
/// [`crate::reference_evaluator::resolve`] its reference evaluator).
pub(crate) fn temporary_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ldm-builtin-{}", std::process::id()))
}

/// Removes the files [`resolve`] wrote, if any: `main` calls it when the command has ended
/// (successfully, with an error or interrupted), so that no run leaves a folder in the temporary
/// directory.
pub fn remove_temporary_files() {
    let _ = std::fs::remove_dir_all(temporary_dir());
}

/// A config named in a recipe file: a path as given (from the working folder), else beside
/// the recipe, else a built-in name (for [`resolve`]).
pub fn beside(recipe: &Path, arg: &str) -> String {
    let local = recipe.parent().map(|dir| dir.join(arg));
    match local {
        Some(p) if !Path::new(arg).exists() && p.is_file() => p.display().to_string(),
        _ => arg.to_string(),
    }
}

/// Resolves `--config`: an existing file, or a built-in name (written to a temporary file so
/// every error still names a file).
pub fn resolve(arg: &str) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let name = arg
        .trim_end_matches(".toml")
        .rsplit('/')
        .next()
        .unwrap_or(arg);
    match CONFIGS.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => {
            let dir = temporary_dir();
            std::fs::create_dir_all(&dir)?;
            let file = dir.join(format!("{n}.toml"));
            std::fs::write(&file, text)?;
            Ok(file)
        }
        None => {
            let names: Vec<&str> = CONFIGS.iter().map(|(n, _)| *n).collect();
            bail!(
                "--config {arg}: no such file, and not a built-in config (built-in: {})",
                names.join(", ")
            )
        }
    }
}
