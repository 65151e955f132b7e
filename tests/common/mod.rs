//! Helpers of the integration tests: run the real `pipeline` binary on small data made here.

#![allow(dead_code)]

mod ldm;

// (each test binary compiles this module; not all of them use every helper)
#[allow(unused_imports)]
pub use ldm::TinyLdmConfig;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `pipeline` with `args` from `cwd`. Not for `run`, which records its model as the
/// default of `generate` in the per-user folder: that takes [`pipeline_home`], so that the
/// tests never replace the model of the developer's README command.
pub fn pipeline_in(cwd: &Path, args: &[&str]) -> Output {
    assert_ne!(
        args.first(),
        Some(&"run"),
        "`pipeline run` writes the per-user default model: use pipeline_home"
    );
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .output()
        .expect("the pipeline binary runs")
}

/// Runs `pipeline` with `args` from `cwd`, with `home` as its per-user folder
/// (`$PIPELINE_HOME`: the default model, the copied data sets).
pub fn pipeline_home(cwd: &Path, home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(cwd)
        .env("PIPELINE_HOME", home)
        .env("NO_COLOR", "1")
        .output()
        .expect("the pipeline binary runs")
}

/// Runs `pipeline` with `args` from the test's temporary folder.
pub fn pipeline(args: &[&str]) -> Output {
    pipeline_in(&std::env::temp_dir(), args)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a success, showing stderr otherwise.
#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Asserts a failure whose last stderr line is one `error: ...` line containing `needle`,
/// with no panic.
pub fn assert_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected a failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        (last.starts_with("error: ") || last.starts_with("error:")) && last.contains(needle),
        "expected an error line containing {needle:?}, got: {err}"
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes a tiny MNIST-style IDX data set: `n` training and `n / 4` held-out 28x28 images of
/// 4 classes (a bright square whose position encodes the class), with `classes.txt`.
pub fn write_tiny_idx(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, count) in [("train", n), ("t10k", n / 4)] {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..count {
            let label = (i % 4) as u8;
            let (ox, oy) = (4 + 12 * (label as usize % 2), 4 + 12 * (label as usize / 2));
            let size = 6 + (i * 7 % 5);
            for y in 0..28 {
                for x in 0..28 {
                    let inside = (ox..ox + size).contains(&x) && (oy..oy + size).contains(&y);
                    pixels.push(if inside {
                        200 + (i % 50) as u8
                    } else {
                        (i * 13 % 20) as u8
                    });
                }
            }
            labels.push(label);
        }
        let images = ldm_common::data::idx::encode_idx_u8(&[count, 28, 28], &pixels);
        let labels = ldm_common::data::idx::encode_idx_u8(&[count], &labels);
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            gzip(&images),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            gzip(&labels),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("classes.txt"),
        "top-left\ntop-right\nbottom-left\nbottom-right\n",
    )
    .unwrap();
}

/// A VAE config small enough to train a few steps in well under a second.
pub fn tiny_vae_config(data_dir: &Path, extra_vae: &str) -> String {
    format!(
        r#"
[data]
source = "idx"
dir = "{}"
resolution = 32
channels = 1

[vae]
downsample_factor = 4
latent_channels = 2
base_channels = 8
channel_mult = [1, 1, 2]
groups = 4
{extra_vae}

[train]
steps = 4
batch_size = 8
lr = 1e-3
warmup_steps = 1
log_every = 1
sample_every = 2
checkpoint_every = 2
"#,
        data_dir.display()
    )
}

/// The usual `[train]` lines of a tiny evaluator: 6 steps of batch 16 at lr 3e-3.
pub const TINY_EVALUATOR_TRAIN: &str =
    "steps = 6\nbatch_size = 16\nlr = 3e-3\nwarmup_steps = 1\nlog_every = 2\n";

/// A tiny evaluator config (two conv layers of 8 channels, `feature_dim` features) on the IDX
/// set in `data`, with the lines `train` as its `[train]` section.
pub fn tiny_evaluator_config(data: &Path, feature_dim: usize, train: &str) -> String {
    format!(
        "[data]\nsource = \"idx\"\ndir = \"{}\"\n\n[evaluator]\nchannels = [8, 8]\npool_size = 2\nfeature_dim = {feature_dim}\n\n[train]\n{train}",
        data.display()
    )
}

/// A temporary folder with the tiny IDX set in `data/` and its config in `vae.toml`.
pub struct TinyVae {
    pub dir: tempfile::TempDir,
}

impl TinyVae {
    pub fn new(extra_vae: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_idx(&dir.path().join("data"), 64);
        std::fs::write(
            dir.path().join("vae.toml"),
            tiny_vae_config(&dir.path().join("data"), extra_vae),
        )
        .unwrap();
        Self { dir }
    }

    /// A new folder whose VAE is trained (`train-vae` of `vae.toml` on the CPU) in `vae/`.
    pub fn trained() -> Self {
        let t = Self::new("");
        assert_ok(&t.train_vae("vae.toml", "vae", &[]));
        t
    }

    /// `pipeline train-vae --config <config> --out <out>` and `flags`, the two paths relative
    /// to this folder (`flags` pick the device).
    pub fn train_vae_on(&self, config: &str, out: &str, flags: &[&str]) -> Output {
        let (config, out) = (self.p(config), self.p(out));
        let mut args = vec!["train-vae", "--config", &config, "--out", &out];
        args.extend_from_slice(flags);
        pipeline(&args)
    }

    /// `train-vae` of `config` on the CPU into `out`, plus `extra`.
    pub fn train_vae(&self, config: &str, out: &str, extra: &[&str]) -> Output {
        let mut flags = vec!["--device", "cpu"];
        flags.extend_from_slice(extra);
        self.train_vae_on(config, out, &flags)
    }

    /// `train-evaluator` of `config` on the CPU into `out`, plus `extra`.
    pub fn train_evaluator(&self, config: &str, out: &str, extra: &[&str]) -> Output {
        let (config, out) = (self.p(config), self.p(out));
        let mut args = vec![
            "train-evaluator",
            "--config",
            &config,
            "--out",
            &out,
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        pipeline(&args)
    }

    /// SHA-256 of the file `rel` in this folder.
    pub fn sha(&self, rel: &str) -> String {
        ldm_common::checkpoint::sha256_file(&self.path(rel)).unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn p(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }
}

/// `metrics.csv` as (column, values by row), without the wall-clock column.
pub fn metrics(run: &Path) -> BTreeMap<String, Vec<f64>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let names: Vec<&str> = lines.next().unwrap().split(',').collect();
    let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in lines {
        for (name, cell) in names.iter().zip(line.split(',')) {
            if *name != "images_per_s" {
                columns
                    .entry(name.to_string())
                    .or_default()
                    .push(cell.parse().unwrap());
            }
        }
    }
    columns
}

/// Every tensor of a safetensors file (all F32 here), by name.
pub fn weights(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            assert_eq!(info["dtype"], "F32", "{name}");
            let at = |i: usize| info["data_offsets"][i].as_u64().unwrap() as usize;
            let values = data[at(0)..at(1)]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name.clone(), values)
        })
        .collect()
}

/// The largest |a - b| over all weights of two runs of one architecture.
pub fn max_weight_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the two runs hold different tensors"
    );
    let mut max = 0f32;
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (u, v) in x.iter().zip(y) {
            assert!(u.is_finite() && v.is_finite(), "{name}");
            max = max.max((u - v).abs());
        }
    }
    max
}
