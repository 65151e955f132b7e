//! The one way files are written: to a temporary file in the same folder, flushed, then renamed
//! over the target, so a crash or Ctrl-C never leaves a half-written file.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{CommonError, Result};

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CommonError::io(dir, e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CommonError::io(path, e)
    })
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CommonError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    atomic_write(path, format!("{text}\n").as_bytes())
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| CommonError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| CommonError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("unreadable: {e}"),
    })
}

/// Hex SHA-256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| CommonError::io(path, e))?;
    Ok(sha256_hex(&bytes))
}

/// Fails early, with the folder's name, when `dir` cannot be created or written.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(CommonError::Invalid(format!(
            "{}: a file, where an output folder was expected",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| CommonError::io(dir, e))?;
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| CommonError::io(dir, e))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        atomic_write(&path, b"one").unwrap();
        atomic_write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
