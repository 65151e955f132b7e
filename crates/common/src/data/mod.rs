//! Real data sets, held in memory as u8 pixels and served through burn-dataset's `Dataset` trait.
//!
//! Sources: IDX files (Fashion-MNIST from the Debian package `dataset-fashion-mnist`,
//! Animal-MNIST converted by `scripts/prepare_animal_mnist.py`, or any MNIST-style set) and
//! image folders (one subfolder per class, optional `captions.jsonl`).

mod config;
pub mod idx;
mod image_folder;
mod image_set;
mod sampler;

pub use config::{DataConfig, DataSource, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR};
pub use image_folder::load_image_folder;
pub use image_set::{ImageItem, ImageSet, Splits};
pub use sampler::BatchOrder;

use crate::error::Result;

/// Loads the training and held-out splits described by `config`.
pub fn load(config: &DataConfig) -> Result<Splits> {
    config.validate()?;
    match config.source {
        DataSource::FashionMnist | DataSource::Idx => image_set::load_idx(config),
        DataSource::ImageFolder => load_image_folder(config),
    }
}
