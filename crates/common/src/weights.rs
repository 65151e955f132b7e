//! Model weights on disk: published weights as safetensors (via burn-store), resumable
//! training state as burnpack records (which keep the parameter ids the optimizer state is
//! keyed by). Every file goes through [`atomic_write`].

use std::path::Path;

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};

use crate::checkpoint::atomic_write;
use crate::error::{CommonError, Result};

fn err(path: &Path, message: String) -> CommonError {
    CommonError::Checkpoint {
        path: path.to_path_buf(),
        message,
    }
}

/// Writes `model`'s parameters as a safetensors file with string metadata.
pub fn save_safetensors<M: Module>(
    model: &M,
    path: &Path,
    metadata: &[(&str, &str)],
) -> Result<()> {
    save_safetensors_renamed(model, path, metadata, &[])
}

/// [`save_safetensors`] with the tensor names rewritten by `(regex, replacement)` pairs, in
/// order (e.g. `("^backbone\\.", "")` drops a wrapper's field name).
pub fn save_safetensors_renamed<M: Module>(
    model: &M,
    path: &Path,
    metadata: &[(&str, &str)],
    rename: &[(&str, &str)],
) -> Result<()> {
    let mut store = SafetensorsStore::from_bytes(None);
    for (from, to) in rename {
        store = store.with_key_remapping(*from, *to);
    }
    for (k, v) in metadata {
        store = store.metadata(*k, *v);
    }
    model
        .save_into(&mut store)
        .map_err(|e| err(path, format!("cannot serialise weights: {e}")))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| err(path, format!("cannot serialise weights: {e}")))?;
    atomic_write(
        path,
        &canonical_safetensors(&bytes).map_err(|m| err(path, m))?,
    )
}

/// Rewrites a safetensors header with its JSON keys sorted (the tensor data is untouched), so
/// equal weights always give equal bytes and checksums: burn-store emits the header from a
/// hash map whose order changes from run to run.
pub fn canonical_safetensors(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let bad = || "malformed safetensors buffer".to_string();
    let len = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let header = bytes.get(8..8 + len).ok_or_else(bad)?;
    // serde_json's Map is a BTreeMap here (no `preserve_order`), so keys come out sorted.
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let mut json = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// Loads safetensors weights into `model`, which must have exactly the same architecture.
pub fn load_safetensors<M: Module>(model: M, path: &Path) -> Result<M> {
    load_safetensors_renamed(model, path, &[])
}

/// [`load_safetensors`] with the file's tensor names rewritten by `(regex, replacement)` pairs
/// (`$1` refers to a capture group) before they are matched to the model's.
pub fn load_safetensors_renamed<M: Module>(
    mut model: M,
    path: &Path,
    rename: &[(&str, &str)],
) -> Result<M> {
    let bytes = std::fs::read(path).map_err(|e| CommonError::io(path, e))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    for (from, to) in rename {
        store = store.with_key_remapping(*from, *to);
    }
    let result = model.load_from(&mut store).map_err(|e| {
        let e = e.to_string();
        if e.contains("Validation failed") {
            err(path, format!("weights were made for another architecture ({e}); check the config it was trained with"))
        } else {
            err(path, format!("not readable as safetensors weights: {e}"))
        }
    })?;
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        let first = result
            .errors
            .first()
            .map(|e| format!("{e:?}"))
            .or_else(|| {
                result
                    .missing
                    .first()
                    .map(|(p, _)| format!("missing tensor {p}"))
            })
            .or_else(|| {
                result
                    .unused
                    .first()
                    .map(|p| format!("unexpected tensor {p}"))
            })
            .unwrap_or_default();
        return Err(err(
            path,
            format!(
                "weights were made for another architecture ({first}); check the config it was trained with"
            ),
        ));
    }
    Ok(model)
}

/// Writes a module as a burnpack record (parameter ids included, for optimizer state).
pub fn save_record<M: Module>(model: &M, path: &Path) -> Result<()> {
    let bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| err(path, format!("cannot serialise: {e}")))?;
    atomic_write(path, &bytes)
}

/// Loads a burnpack record into `model`; a record of another architecture is an error.
pub fn load_record<M: Module>(model: M, path: &Path) -> Result<M> {
    if !path.exists() {
        return Err(CommonError::io(path, std::io::ErrorKind::NotFound.into()));
    }
    let record = burn::store::ModuleRecord::load(path)
        .map_err(|e| err(path, format!("unreadable checkpoint: {e}")))?;
    model
        .try_load_record(record)
        .map_err(|e| err(path, format!("checkpoint of another architecture: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Device;

    #[test]
    fn same_weights_same_bytes_and_round_trip() {
        let device = Device::flex();
        device.seed(1);
        let model = LinearConfig::new(3, 2).init(&device);
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        save_safetensors(&model, &a, &[("stage", "test"), ("k", "v"), ("z", "1")]).unwrap();
        save_safetensors(&model, &b, &[("stage", "test"), ("k", "v"), ("z", "1")]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        device.seed(2);
        let other = LinearConfig::new(3, 2).init(&device);
        let loaded = load_safetensors(other, &a).unwrap();
        let w = |m: &burn::nn::Linear| crate::tensor::to_vec_f32(m.weight.val());
        assert_eq!(w(&loaded), w(&model));
        let wrong = LinearConfig::new(4, 2).init(&device);
        let e = load_safetensors(wrong, &a).unwrap_err().to_string();
        assert!(e.contains("another architecture"), "{e}");
    }

    /// Names rewritten on save are found again by the reverse rewrite on load, and only then.
    #[test]
    fn renamed_tensors_round_trip() {
        let device = Device::flex();
        device.seed(3);
        let model = LinearConfig::new(3, 2).init(&device);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.safetensors");
        save_safetensors_renamed(&model, &path, &[], &[("^weight$", "w.matrix")]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = String::from_utf8_lossy(&bytes[8..200]);
        assert!(header.contains("\"w.matrix\""), "{header}");
        device.seed(4);
        let fresh = || LinearConfig::new(3, 2).init(&device);
        assert!(load_safetensors(fresh(), &path).is_err());
        let loaded =
            load_safetensors_renamed(fresh(), &path, &[("^(w)\\.matrix$", "${1}eight")]).unwrap();
        let w = |m: &burn::nn::Linear| crate::tensor::to_vec_f32(m.weight.val());
        assert_eq!(w(&loaded), w(&model));
    }
}
