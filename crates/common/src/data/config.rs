//! The `[data]` section of a config: where the images come from and how they are shaped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CommonError, Result};

/// Where the Debian package `dataset-fashion-mnist` installs its IDX files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's class names, in label order (Xiao et al. 2017).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// The kind of data source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataSource {
    /// Fashion-MNIST IDX files; `dir` defaults to [`FASHION_MNIST_DIR`].
    FashionMnist,
    /// MNIST-style IDX files (`train-*` and `t10k-*`) with class names from `classes` or
    /// `classes.txt` in the folder.
    Idx,
    /// One subfolder per class, any format the `image` crate reads, optional `captions.jsonl`.
    ImageFolder,
}

/// The `[data]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: DataSource,
    /// Folder of the data set. Required except for `fashion-mnist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Class names in label order (IDX sources without a `classes.txt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Side of the square images the models see; smaller sources are padded, larger resized.
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    /// 1 (grayscale) or 3 (RGB).
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Image folders: fraction of each class held out for evaluation (chosen by a hash of the
    /// file name, so the split never depends on the seed).
    #[serde(default = "default_held_out")]
    pub held_out_fraction: f64,
    /// Largest number of training images to load (0 = all); useful for quick runs.
    #[serde(default)]
    pub max_train: usize,
}

fn default_resolution() -> usize {
    32
}
fn default_channels() -> usize {
    1
}
fn default_held_out() -> f64 {
    0.1
}

impl DataConfig {
    /// Fashion-MNIST at 32x32 (28x28 padded by 2 on each side).
    pub fn fashion_mnist() -> Self {
        Self {
            source: DataSource::FashionMnist,
            dir: None,
            classes: None,
            resolution: 32,
            channels: 1,
            held_out_fraction: 0.1,
            max_train: 0,
        }
    }

    /// The folder to read, with the Fashion-MNIST default filled in. A relative folder that is
    /// not there from the working folder is looked up under the per-user folder, where
    /// `scripts/install_data.sh` copies the converted data sets ([`crate::home`]).
    pub fn resolved_dir(&self) -> PathBuf {
        match (&self.dir, self.source) {
            (Some(dir), _) => crate::home::relative_or_under(dir, &crate::home::dir()),
            (None, DataSource::FashionMnist) => PathBuf::from(FASHION_MNIST_DIR),
            (None, _) => PathBuf::new(),
        }
    }

    /// Checks values before any file is read.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(CommonError::Invalid(m));
        if self.dir.is_none() && self.source != DataSource::FashionMnist {
            return invalid("data.dir is missing: this data source needs a folder".into());
        }
        if !(1..=1024).contains(&self.resolution) {
            return invalid(format!(
                "data.resolution = {}: expected 1 to 1024 pixels",
                self.resolution
            ));
        }
        if self.channels != 1 && self.channels != 3 {
            return invalid(format!(
                "data.channels = {}: expected 1 (grayscale) or 3 (RGB)",
                self.channels
            ));
        }
        if !(0.0..1.0).contains(&self.held_out_fraction) {
            return invalid(format!(
                "data.held_out_fraction = {}: expected a number in [0, 1)",
                self.held_out_fraction
            ));
        }
        let dir = self.resolved_dir();
        if !dir.is_dir() {
            let hint = match self.source {
                DataSource::FashionMnist => {
                    "install it with `bash scripts/install_data.sh` (apt-get install dataset-fashion-mnist)"
                }
                DataSource::Idx => {
                    "for Animal-MNIST run `bash scripts/install_data.sh` in the repository, which also copies it to the per-user folder for any working folder"
                }
                DataSource::ImageFolder => "expected a folder with one subfolder per class",
            };
            let where_ = if dir.is_relative() {
                format!(
                    ", neither in the working folder nor under {}",
                    crate::home::dir().display()
                )
            } else {
                String::new()
            };
            return Err(CommonError::dataset(
                &dir,
                format!("data set folder not found{where_}: {hint}"),
            ));
        }
        Ok(())
    }
}

/// Reads class names from `classes.txt` (one per line) if the folder has one.
pub(crate) fn read_classes_txt(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join("classes.txt");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| CommonError::io(&path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(CommonError::dataset(
            &path,
            "empty: expected one class name per line",
        ));
    }
    Ok(Some(names))
}
