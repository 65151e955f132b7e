//! The per-user folder where `scripts/setup.sh` leaves what later commands find from any
//! working folder: the default model of `generate` and a copy of the converted data sets.
//!
//! `$PIPELINE_HOME` if set, else `~/.local/share/latent-diffusion-rs` (the XDG data folder),
//! else `.latent-diffusion-rs` in the working folder.

use std::path::{Path, PathBuf};

/// The per-user folder (module doc).
pub fn dir() -> PathBuf {
    std::env::var_os("PIPELINE_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share/latent-diffusion-rs"))
        })
        .unwrap_or_else(|| PathBuf::from(".latent-diffusion-rs"))
}

/// A relative `path` that does not exist from the working folder, but does under `home`, as
/// that; any other path as it is. So the built-in configs' `data/animal-mnist` reads the
/// repository's copy when run there, and the per-user copy anywhere else.
pub fn relative_or_under(path: &Path, home: &Path) -> PathBuf {
    if path.is_relative() && !path.exists() {
        let under = home.join(path);
        if under.exists() {
            return under;
        }
    }
    path.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_relative_path_is_looked_up_under_home() {
        let tmp = std::env::temp_dir().join(format!("ldm-home-test-{}", std::process::id()));
        let home = tmp.join("home");
        std::fs::create_dir_all(home.join("data/set-under-home")).unwrap();
        // Only under home: found there.
        assert_eq!(
            relative_or_under(Path::new("data/set-under-home"), &home),
            home.join("data/set-under-home")
        );
        // Nowhere: kept, so the error names the path as written.
        assert_eq!(
            relative_or_under(Path::new("data/nowhere"), &home),
            PathBuf::from("data/nowhere")
        );
        // Absolute: kept even if missing.
        let abs = tmp.join("absent");
        assert_eq!(relative_or_under(&abs, &home), abs);
        // Present from the working folder (the crate's own `src`): the working folder wins.
        std::fs::create_dir_all(home.join("src")).unwrap();
        assert_eq!(
            relative_or_under(Path::new("src"), &home),
            PathBuf::from("src")
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
