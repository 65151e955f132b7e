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

/// The file each kind of finished run folder has, and what the errors call that kind.
const RUN_KINDS: [(&str, &str); 4] = [
    ("vae.json", "VAE run"),
    ("ldm.json", "LDM run"),
    ("evaluator.json", "trained evaluator"),
    ("classifier.json", "trained classifier"),
];

/// Fails with one line naming the first of `files` missing from `dir` and the command that
/// makes it (`how`, e.g. "pipeline train-vae --out runs/vae"), or, when `dir` is a finished
/// run of another kind (a VAE folder given as `--model`), saying so.
pub fn require(dir: &Path, what: &str, files: &[&str], how: &str) -> Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: no such {what} folder (make one with `{how}`)",
            dir.display()
        );
    }
    if let Some(file) = files.iter().find(|f| !dir.join(f).exists()) {
        if let Some((other_file, other)) = RUN_KINDS
            .iter()
            .find(|(info, _)| !files.contains(info) && dir.join(info).exists())
        {
            let command = how.split(" --out").next().unwrap_or(how);
            anyhow::bail!(
                "{}: {} folder ({other_file}) where {} folder was expected (one made by `{command}`)",
                dir.display(),
                with_article(other),
                with_article(what)
            );
        }
        anyhow::bail!(
            "{}: incomplete {what}, {file} is missing (was training interrupted? finish it with `{how} --resume`)",
            dir.display()
        );
    }
    Ok(())
}

/// The SHA-256 of `<dir>/model.safetensors`, with a warning when it is not `recorded`, the
/// `weights_sha256` that `info_file` holds from the end of training: the weights were
/// replaced since. They are used as they are, and what is recorded downstream (the
/// checksum `generate.json` names, the VAE check of an LDM) is the file's own.
/// The run whose weights a training run started from (`--init-from`, `train.init_from`),
/// recorded in its `vae.json` / `ldm.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InitFrom {
    pub dir: std::path::PathBuf,
    /// SHA-256 of the `model.safetensors` the weights were read from.
    pub weights_sha256: String,
}

impl InitFrom {
    /// Where a run folder keeps the record from the start of training to its end (through
    /// `--resume`, which does not read the source run again).
    const FILE: &'static str = "init_from.json";

    /// The record of the source run `src`: its folder and the checksum of its weights.
    fn of(src: &Path) -> Result<Self> {
        Ok(Self {
            dir: std::path::absolute(src).unwrap_or_else(|_| src.to_path_buf()),
            weights_sha256: ldm_common::checkpoint::sha256_file(&src.join("model.safetensors"))?,
        })
    }

    /// The model a training run in `out` starts from: on `--resume` `model` as it is (the
    /// checkpoint holds the weights, and the kept record stays); else `model` as initialised,
    /// or with `src` (`--init-from`) `load(model, src)`, announced and remembered for the run's
    /// `vae.json` / `ldm.json`.
    pub fn start<M>(
        out: &Path,
        src: Option<&Path>,
        resume: bool,
        model: M,
        load: impl FnOnce(M, &Path) -> Result<M>,
    ) -> Result<M> {
        if resume {
            return Ok(model);
        }
        let Some(src) = src else {
            Self::remember(out, None)?;
            return Ok(model);
        };
        let model = load(model, src)?;
        Self::remember(out, Some(&Self::of(src)?))?;
        eprintln!(
            "starting from the weights of {} (--init-from)",
            src.display()
        );
        Ok(model)
    }

    /// At the start of a fresh run in `out`: keeps `record`, or removes an earlier run's.
    fn remember(out: &Path, record: Option<&Self>) -> Result<()> {
        let file = out.join(Self::FILE);
        match record {
            Some(r) => ldm_common::checkpoint::write_json(&file, r)?,
            None if file.exists() => std::fs::remove_file(&file)?,
            None => {}
        }
        Ok(())
    }

    /// At the end of training: the record kept in `out`, if any.
    pub fn recall(out: &Path) -> Result<Option<Self>> {
        let file = out.join(Self::FILE);
        Ok(if file.exists() {
            Some(ldm_common::checkpoint::read_json(&file)?)
        } else {
            None
        })
    }
}

pub fn weights_sha256(dir: &Path, info_file: &str, recorded: &str) -> Result<String> {
    let weights = dir.join("model.safetensors");
    let actual = ldm_common::checkpoint::sha256_file(&weights)?;
    if actual != recorded {
        eprintln!(
            "warning: {}: sha256 {}… differs from the {}… that {info_file} recorded when training ended (the weights were replaced since); using them as they are",
            weights.display(),
            &actual[..12],
            &recorded[..12.min(recorded.len())]
        );
    }
    Ok(actual)
}

/// "a VAE run", "an LDM run": the article as the words are read aloud.
fn with_article(what: &str) -> String {
    let an = what.starts_with("LDM") || what.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {what}", if an { "an" } else { "a" })
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
