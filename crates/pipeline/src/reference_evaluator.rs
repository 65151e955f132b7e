//! Reference evaluators compiled into the binary: one frozen evaluation classifier per data set,
//! what `pipeline eval --evaluator auto` (the default) scores with, so that FIDs measured by
//! different code versions and machines are in one feature space, as every FID in the
//! literature is in one Inception network's.
//!
//! A retrained evaluator is not such a yardstick: the same `evaluator-animals` config and seed
//! gave a FID floor (real against real images) of 6.86 with the code of 2026-12-07 02:39 and
//! 5.60 with the code of 22:07: kernels that round differently give other weights, and another
//! feature space. Each reference here was trained by `pipeline train-evaluator --config NAME --device cpu`
//! (burn-flex, seed 0) and is reproduced bit for bit by that command with the code that made it
//! (`reference-evaluators/README.md`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::evaluator_stage::EvaluatorInfo;

/// One frozen evaluator: the three files of its `train-evaluator` run folder.
pub struct Reference {
    /// The data set it was trained on (`animals-mnist`, `fashion-mnist`).
    pub name: &'static str,
    config: &'static str,
    info: &'static str,
    weights: &'static [u8],
    /// sha256 of `model.safetensors`, as `eval.json` records it.
    pub sha256: &'static str,
}

impl Reference {
    /// Its `evaluator.json`: classes, image shape, held-out accuracy.
    pub fn info(&self) -> Result<EvaluatorInfo> {
        serde_json::from_str(self.info)
            .with_context(|| format!("the reference evaluator {}: evaluator.json", self.name))
    }
}

/// The `--evaluator` value that picks a reference.
pub const AUTO: &str = "auto";

pub const REFERENCES: &[Reference] = &[
    Reference {
        name: "animals-mnist",
        config: include_str!("../reference-evaluators/animals-mnist/config.toml"),
        info: include_str!("../reference-evaluators/animals-mnist/evaluator.json"),
        weights: include_bytes!("../reference-evaluators/animals-mnist/model.safetensors"),
        sha256: "1d32e29b8e86b6b46a6b1d1dba70109935c7874e75561ef4b3c2528020d4c823",
    },
    Reference {
        name: "fashion-mnist",
        config: include_str!("../reference-evaluators/fashion-mnist/config.toml"),
        info: include_str!("../reference-evaluators/fashion-mnist/evaluator.json"),
        weights: include_bytes!("../reference-evaluators/fashion-mnist/model.safetensors"),
        sha256: "78d4e6e99c12d6a0c8edfce0c09a46a9364e440ecc74b9cc0bc13a440222f09d",
    },
];

/// The evaluator `--evaluator` names: a folder written by `train-evaluator`, or [`AUTO`], the
/// reference whose classes and image shape are the model's, written to this process's
/// temporary folder (removed when the command ends, with the built-in configs). Returns the
/// folder and, for a reference, its name.
pub fn resolve(
    arg: &Path,
    class_names: &[String],
    image_shape: [usize; 3],
) -> Result<(PathBuf, Option<&'static str>)> {
    if arg != Path::new(AUTO) {
        return Ok((arg.to_path_buf(), None));
    }
    for r in REFERENCES {
        let info = r.info()?;
        if info.class_names == class_names && info.image_shape == image_shape {
            let dir = crate::builtin::temporary_dir().join(format!("evaluator-{}", r.name));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
            for (file, bytes) in [
                ("config.toml", r.config.as_bytes()),
                ("evaluator.json", r.info.as_bytes()),
                ("model.safetensors", r.weights),
            ] {
                ldm_common::checkpoint::atomic_write(&dir.join(file), bytes)?;
            }
            return Ok((dir, Some(r.name)));
        }
    }
    let known: Vec<String> = REFERENCES
        .iter()
        .map(|r| {
            let classes = r
                .info()
                .map(|i| i.class_names.join(", "))
                .unwrap_or_default();
            format!("{} ({classes})", r.name)
        })
        .collect();
    bail!(
        "--evaluator auto: no reference evaluator for this model's classes ({}) at {}x{}x{}; the references are {}. Train one with `pipeline train-evaluator --config FILE --out DIR` on the model's data and pass --evaluator DIR",
        class_names.join(", "),
        image_shape[1],
        image_shape[2],
        image_shape[0],
        known.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluator_stage::EvaluatorRun;
    use burn::tensor::Device;

    /// Every reference loads into its config's architecture, matches its recorded checksum, and
    /// is picked by its own classes only.
    #[test]
    fn references_load_and_are_picked_by_their_classes() {
        let device = Device::flex();
        for r in REFERENCES {
            let sha = ldm_common::checkpoint::sha256_hex(r.weights);
            assert_eq!(sha, r.sha256, "{}", r.name);
            let info = r.info().unwrap();
            let (dir, name) =
                resolve(Path::new(AUTO), &info.class_names, info.image_shape).unwrap();
            assert_eq!(name, Some(r.name));
            let run = EvaluatorRun::load(&dir, &device).unwrap();
            assert_eq!(run.info.class_names, info.class_names);
            assert!(run.info.held_out_accuracy > 0.9, "{}", r.name);
            // another image shape has no reference
            let e = resolve(Path::new(AUTO), &info.class_names, [3, 32, 32])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("no reference evaluator") && e.contains("32x32x3"),
                "{e}"
            );
        }
        let (dir, name) = resolve(Path::new("runs/mine"), &[], [1, 32, 32]).unwrap();
        assert_eq!((dir, name), (PathBuf::from("runs/mine"), None));
    }
}
