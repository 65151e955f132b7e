//! The resumable state of a run in `<run>/checkpoint/`: the model and optimizer as burnpack
//! records, and `state.json` with the step and what must match for an exact resume.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use ldm_common::adamw::AdamW;
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{atomic_write, read_json, write_json};
use ldm_common::weights::{load_record, save_record};

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    pub seed: u64,
    pub batch_size: usize,
    /// The serialised model config: a resume into another architecture is refused.
    pub architecture: String,
}

/// `<run>/checkpoint`.
pub fn dir(run: &Path) -> PathBuf {
    run.join("checkpoint")
}

/// Saves model, optimizer and state; `state.json` is written last, so a checkpoint is
/// complete exactly when its state file names its step.
pub fn save<M: Module>(run: &Path, model: &M, optim: &mut AdamW, state: &TrainState) -> Result<()> {
    let dir = dir(run);
    save_record(model, &dir.join("model.bpk"))?;
    let bytes = optim
        .into_bytes(model)
        .context("cannot serialise the optimizer state")?;
    atomic_write(&dir.join("optimizer.bpk"), &bytes)?;
    write_json(&dir.join("state.json"), state)?;
    Ok(())
}

/// Loads a checkpoint for `--resume`, refusing one made with another architecture, seed or
/// batch size (the data order would differ).
pub fn load<M: Module>(
    run: &Path,
    model: M,
    optim: AdamW,
    expected: &TrainState,
) -> Result<(M, AdamW, TrainState)> {
    let dir = dir(run);
    let state_path = dir.join("state.json");
    if !state_path.exists() {
        bail!(
            "--resume: no checkpoint in {} (expected {}); start without --resume",
            run.display(),
            state_path.display()
        );
    }
    let state: TrainState = read_json(&state_path)?;
    if state.architecture != expected.architecture {
        bail!(
            "--resume: {} holds a checkpoint of another architecture; use a new --out or the config it was trained with",
            dir.display()
        );
    }
    if state.batch_size != expected.batch_size || state.seed != expected.seed {
        bail!(
            "--resume: the checkpoint in {} was made with --batch-size {} --seed {}, not --batch-size {} --seed {}: the data order would differ",
            dir.display(),
            state.batch_size,
            state.seed,
            expected.batch_size,
            expected.seed
        );
    }
    let model = load_record(model, &dir.join("model.bpk"))?;
    let optim_path = dir.join("optimizer.bpk");
    let optim = optim.load(&optim_path).map_err(|e| {
        anyhow::anyhow!("{}: unreadable optimizer state: {e}", optim_path.display())
    })?;
    Ok((model, optim, state))
}
