//! `--resume` continues a run only under the settings it was started with: the resolved config
//! (after the file, `--set` and the flags) must equal the run folder's `config.toml` in every
//! key but `train.steps` (raising it trains further) and those that say where the run
//! computes and how often it reports, not what it learns. The checkpoint's optimizer state,
//! EMA and data order were made under those settings, so anything else would be another run.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// The keys that may differ on resume.
const MAY_CHANGE: &[&str] = &[
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.devices",
    "train.gradient_accumulation_steps",
    "train.foreach",
];

/// Refuses to resume the run in `out` with `config` when its saved `config.toml` differs,
/// naming every differing key with both values. Without `resume`, or without a saved
/// config, there is nothing to compare.
pub fn check<T: Serialize + DeserializeOwned>(out: &Path, config: &T, resume: bool) -> Result<()> {
    if !resume {
        return Ok(());
    }
    compare(out, config, "--resume")
}

/// Refuses `config` when it differs from the saved `config.toml` of the run in `out` (if any)
/// in a key that matters; the error starts with `what` (e.g. `--resume`).
pub fn compare<T: Serialize + DeserializeOwned>(out: &Path, config: &T, what: &str) -> Result<()> {
    let saved_path = out.join("config.toml");
    if !saved_path.exists() {
        return Ok(());
    }
    // read through the typed config, so keys added with defaults since the run began agree
    let saved: T = crate::config::read(&saved_path)?;
    let diffs = differences(&as_table(&saved)?, &as_table(config)?);
    if diffs.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 4;
    let mut list: Vec<String> = diffs
        .iter()
        .take(SHOWN)
        .map(|(key, (was, now))| format!("{key} = {now} (the run has {was})"))
        .collect();
    if diffs.len() > SHOWN {
        list.push(format!("and {} more", diffs.len() - SHOWN));
    }
    bail!(
        "{what}: the settings differ from {}, the config the run was started with: {}; resume with the same --config, --set and flags (--steps may change), or train into a new --out",
        saved_path.display(),
        list.join(", ")
    )
}

fn as_table<T: Serialize>(config: &T) -> Result<Table> {
    Ok(Table::try_from(config)?)
}

/// `key -> (old, new)` for every leaf that differs (absent on one side counts), except
/// [`MAY_CHANGE`]; arrays are compared whole.
fn differences(old: &Table, new: &Table) -> BTreeMap<String, (String, String)> {
    let (old, new) = (leaves(old), leaves(new));
    let absent = || "nothing".to_string();
    let mut diffs = BTreeMap::new();
    for key in old.keys().chain(new.keys()) {
        let (a, b) = (old.get(key), new.get(key));
        if a != b && !MAY_CHANGE.contains(&key.as_str()) {
            let show = |v: Option<&Value>| v.map_or_else(absent, Value::to_string);
            diffs.insert(key.clone(), (show(a), show(b)));
        }
    }
    diffs
}

/// Dotted key -> value of every non-table value.
fn leaves(table: &Table) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, table: &Table, out: &mut BTreeMap<String, Value>) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(t) => walk(&key, t, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Train {
        steps: u64,
        lr: f64,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        kind: String,
        #[serde(default)]
        extra: Option<u32>,
        train: Train,
    }

    fn config(kind: &str, steps: u64, lr: f64) -> Config {
        Config {
            kind: kind.into(),
            extra: None,
            train: Train { steps, lr },
        }
    }

    #[test]
    fn only_train_steps_may_change_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let saved = config("dit", 4, 0.1);
        crate::run_dir::write_config(dir.path(), &saved).unwrap();
        check(dir.path(), &config("dit", 4, 0.1), true).unwrap();
        check(dir.path(), &config("dit", 8, 0.1), true).unwrap();
        // without --resume, a new run may overwrite the folder with other settings
        check(dir.path(), &config("unet", 4, 0.2), false).unwrap();
        let e = check(dir.path(), &config("unet", 8, 0.2), true)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--resume: the settings differ from "), "{e}");
        assert!(
            e.contains(
                "config.toml, the config the run was started with: kind = \"unet\" (the run has \"dit\"), train.lr = 0.2 (the run has 0.1); "
            ),
            "{e}"
        );
        let mut with_extra = config("dit", 4, 0.1);
        with_extra.extra = Some(3);
        let e = check(dir.path(), &with_extra, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra = 3 (the run has nothing)"), "{e}");
        // a fresh folder has nothing to compare (the trainer says there is no checkpoint)
        let empty = tempfile::tempdir().unwrap();
        check(empty.path(), &config("unet", 1, 1.0), true).unwrap();
    }
}
