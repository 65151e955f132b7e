//! An in-memory set of labelled images, the unit every stage trains and evaluates on.

use std::path::Path;

use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor};

use super::config::{DataConfig, DataSource, FASHION_MNIST_CLASSES, read_classes_txt};
use super::idx::read_idx_u8;
use crate::error::{CommonError, Result};
use crate::upload;

/// One image with its label and optional caption.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageItem {
    /// Pixels in `[channels, height, width]` order, 0..=255.
    pub pixels: Vec<u8>,
    pub label: usize,
    pub caption: Option<String>,
}

/// Square images of one size, stored contiguously as u8.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub channels: usize,
    pub resolution: usize,
    /// `len * channels * resolution * resolution` bytes.
    pub pixels: Vec<u8>,
    pub labels: Vec<usize>,
    pub captions: Vec<Option<String>>,
    pub class_names: Vec<String>,
}

/// The training split and the held-out split used for evaluation.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: ImageSet,
    pub held_out: ImageSet,
}

impl Dataset<ImageItem> for ImageSet {
    fn get(&self, index: usize) -> std::result::Result<ImageItem, DatasetError> {
        Ok(ImageItem {
            pixels: self.image(index).to_vec(),
            label: self.labels[index],
            caption: self.captions[index].clone(),
        })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

impl ImageSet {
    fn image_len(&self) -> usize {
        self.channels * self.resolution * self.resolution
    }

    /// The pixels of image `index`.
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[index * n..(index + 1) * n]
    }

    /// The images at `indices` as a tensor scaled to [-1, 1].
    ///
    /// # Shapes
    /// - result: `[indices.len(), channels, resolution, resolution]`
    pub fn batch(&self, indices: &[usize], device: &Device) -> Tensor<4> {
        let mut values = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            values.extend(self.image(i).iter().map(|&p| f32::from(p) / 127.5 - 1.0));
        }
        let shape = [
            indices.len(),
            self.channels,
            self.resolution,
            self.resolution,
        ];
        upload::float(values, shape, device)
    }

    /// The labels at `indices`. Shape `[indices.len()]`.
    pub fn batch_labels(&self, indices: &[usize], device: &Device) -> Tensor<1, Int> {
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i] as i64).collect();
        upload::int(labels, [indices.len()], device)
    }

    /// Keeps the first `n` images (all if `n` is 0 or larger than the set).
    pub fn truncate(&mut self, n: usize) {
        if n == 0 || n >= self.labels.len() {
            return;
        }
        self.pixels.truncate(n * self.image_len());
        self.labels.truncate(n);
        self.captions.truncate(n);
    }
}

/// Loads `train-*` and `t10k-*` IDX files; `t10k` is the held-out split.
pub(super) fn load_idx(config: &DataConfig) -> Result<Splits> {
    let dir = config.resolved_dir();
    let class_names = match (&config.classes, config.source) {
        (Some(names), _) => names.clone(),
        (None, DataSource::FashionMnist) => FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        (None, _) => {
            read_classes_txt(&dir)?.unwrap_or_else(|| (0..10).map(|i| i.to_string()).collect())
        }
    };
    let mut train = load_idx_split(&dir, "train", config, &class_names)?;
    train.truncate(config.max_train);
    let held_out = load_idx_split(&dir, "t10k", config, &class_names)?;
    Ok(Splits { train, held_out })
}

fn find_file(dir: &Path, stem: &str) -> Result<std::path::PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let path = dir.join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    Err(CommonError::dataset(
        dir.join(format!("{stem}.gz")),
        "missing IDX file (expected it gzipped or plain in the data folder)",
    ))
}

fn load_idx_split(
    dir: &Path,
    prefix: &str,
    config: &DataConfig,
    class_names: &[String],
) -> Result<ImageSet> {
    let images_path = find_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx_u8(&images_path, 3)?;
    let labels = read_idx_u8(&labels_path, 1)?;
    let [n, h, w] = [images.dims[0], images.dims[1], images.dims[2]];
    if labels.dims[0] != n {
        return Err(CommonError::dataset(
            &labels_path,
            format!(
                "{} labels for {n} images in {}",
                labels.dims[0],
                images_path.display()
            ),
        ));
    }
    if let Some(&bad) = labels
        .values
        .iter()
        .find(|&&l| l as usize >= class_names.len())
    {
        return Err(CommonError::dataset(
            &labels_path,
            format!(
                "label {bad} but only {} class names are known",
                class_names.len()
            ),
        ));
    }
    let res = config.resolution;
    let c = config.channels;
    let mut pixels = Vec::with_capacity(n * c * res * res);
    for i in 0..n {
        let src = &images.values[i * h * w..(i + 1) * h * w];
        let gray = fit_gray(src, w, h, res);
        for _ in 0..c {
            pixels.extend_from_slice(&gray);
        }
    }
    Ok(ImageSet {
        channels: c,
        resolution: res,
        pixels,
        labels: labels.values.iter().map(|&l| l as usize).collect(),
        captions: vec![None; n],
        class_names: class_names.to_vec(),
    })
}

/// Fits a grayscale image to `res x res`: centred zero padding when it is smaller by an even
/// margin (Fashion-MNIST 28 -> 32, as latent-diffusion setups do), a resize otherwise.
fn fit_gray(src: &[u8], w: usize, h: usize, res: usize) -> Vec<u8> {
    if w == res && h == res {
        return src.to_vec();
    }
    if w <= res && h <= res && (res - w).is_multiple_of(2) && (res - h).is_multiple_of(2) {
        let (ox, oy) = ((res - w) / 2, (res - h) / 2);
        let mut out = vec![0u8; res * res];
        for y in 0..h {
            out[(y + oy) * res + ox..(y + oy) * res + ox + w]
                .copy_from_slice(&src[y * w..(y + 1) * w]);
        }
        return out;
    }
    let img = image::GrayImage::from_raw(w as u32, h as u32, src.to_vec())
        .expect("buffer length matches dimensions");
    image::imageops::resize(
        &img,
        res as u32,
        res as u32,
        image::imageops::FilterType::Triangle,
    )
    .into_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_28_to_32_centred() {
        let src = vec![255u8; 28 * 28];
        let out = fit_gray(&src, 28, 28, 32);
        assert_eq!(out.len(), 32 * 32);
        assert_eq!(out[0], 0);
        assert_eq!(out[2 * 32 + 2], 255);
        assert_eq!(out[29 * 32 + 29], 255);
        assert_eq!(out[30 * 32 + 30], 0);
        assert_eq!(out.iter().filter(|&&p| p == 255).count(), 28 * 28);
    }

    #[test]
    fn batch_scales_to_minus_one_one() {
        let set = ImageSet {
            channels: 1,
            resolution: 2,
            pixels: vec![0, 255, 0, 255, 255, 255, 0, 0],
            labels: vec![3, 1],
            captions: vec![None, None],
            class_names: vec![],
        };
        let device = burn::tensor::Device::flex();
        let t = set.batch(&[1, 0], &device);
        assert_eq!(t.dims(), [2, 1, 2, 2]);
        let v = crate::tensor::to_vec_f32(t);
        assert_eq!(v, vec![1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0]);
        assert_eq!(set.get(1).unwrap().label, 1);
        assert_eq!(set.len(), 2);
    }
}
