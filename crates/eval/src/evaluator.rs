//! The evaluation network: a small CNN classifier whose penultimate layer supplies the
//! features of FID and precision/recall, as Inception-v3's pool layer does for natural images
//! (Heusel et al. 2017) — here trained on the data set itself, small enough for 2 CPU cores.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLoss;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use ldm_common::gemm_conv::conv2d;

/// The `[evaluator]` section: architecture of the evaluation CNN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorConfig {
    /// Output channels of each 3x3 conv; the first keeps the resolution, each later one
    /// halves it (stride 2). 32x32 images with `[16, 32, 64]` end at 8x8.
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    /// Side of the adaptive average pool before the head: the last conv's map is averaged
    /// down to `pool_size x pool_size` cells and flattened (1 = global average pooling).
    /// Keeping a coarse layout helps on centred data such as Fashion-MNIST and keeps the
    /// network independent of the image resolution.
    #[serde(default = "d_pool")]
    pub pool_size: usize,
    /// Width of the penultimate layer: the feature dimension d of FID and precision/recall.
    #[serde(default = "d_feature_dim")]
    pub feature_dim: usize,
}

fn d_channels() -> Vec<usize> {
    vec![16, 32, 64]
}
fn d_pool() -> usize {
    4
}
fn d_feature_dim() -> usize {
    128
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        Self {
            channels: d_channels(),
            pool_size: d_pool(),
            feature_dim: d_feature_dim(),
        }
    }
}

impl EvaluatorConfig {
    /// Checks the config and the data's shape before a model is built.
    pub fn validate(&self, image_channels: usize, num_classes: usize) -> Result<()> {
        let bad = |key: &str, value: String, expected: &str| {
            Err(EvalError::InvalidConfig {
                key: key.into(),
                value,
                expected: expected.into(),
            })
        };
        if self.channels.is_empty() || self.channels.contains(&0) {
            return bad(
                "evaluator.channels",
                format!("{:?}", self.channels),
                "at least one conv, each with channels > 0",
            );
        }
        if self.pool_size == 0 {
            return bad(
                "evaluator.pool_size",
                "0".into(),
                "at least 1 (1 = global average pooling)",
            );
        }
        if self.feature_dim == 0 {
            return bad("evaluator.feature_dim", "0".into(), "at least 1");
        }
        if image_channels == 0 {
            return bad("image channels", "0".into(), "at least 1");
        }
        if num_classes < 2 {
            return bad(
                "number of classes",
                num_classes.to_string(),
                "at least 2 labelled classes",
            );
        }
        Ok(())
    }

    /// Builds the network for `image_channels`-channel images and `num_classes` labels.
    /// Weights are drawn lazily from the device's RNG: seed it first (`device.seed`).
    pub fn init(
        &self,
        image_channels: usize,
        num_classes: usize,
        device: &Device,
    ) -> Result<Evaluator> {
        self.validate(image_channels, num_classes)?;
        let mut convs = Vec::with_capacity(self.channels.len());
        let mut norms = Vec::with_capacity(self.channels.len());
        let mut c_in = image_channels;
        for (i, &c_out) in self.channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            convs.push(
                Conv2dConfig::new([c_in, c_out], [3, 3])
                    .with_stride([stride, stride])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
            );
            norms.push(BatchNormConfig::new(c_out).init(device));
            c_in = c_out;
        }
        Ok(Evaluator {
            convs,
            norms,
            pool: AdaptiveAvgPool2dConfig::new([self.pool_size, self.pool_size]).init(),
            feature: LinearConfig::new(c_in * self.pool_size * self.pool_size, self.feature_dim)
                .init(device),
            classifier: LinearConfig::new(self.feature_dim, num_classes).init(device),
        })
    }
}

/// conv-BatchNorm-ReLU stages -> adaptive average pool -> flatten -> Linear -> ReLU (the
/// features) -> Linear (logits). BatchNorm (Ioffe & Szegedy 2015) is what lets it reach 90% on
/// Fashion-MNIST within ~2 epochs.
#[derive(Module, Debug)]
pub struct Evaluator {
    convs: Vec<Conv2d>,
    norms: Vec<BatchNorm>,
    pool: AdaptiveAvgPool2d,
    feature: Linear,
    classifier: Linear,
}

impl Evaluator {
    /// The penultimate activations, used as the feature space of FID and precision/recall.
    /// Call it on `model.valid()` (no autodiff): BatchNorm then uses its running statistics;
    /// on an autodiff device it would use the batch's own, and features would depend on the
    /// batch they came in.
    ///
    /// # Shapes
    /// - `images`: `[batch, channels, h, w]`, pixels in [-1, 1]
    /// - result: `[batch, feature_dim]`
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = images;
        for (conv, norm) in self.convs.iter().zip(&self.norms) {
            x = relu(norm.forward(conv2d(conv, x)));
        }
        // [batch, channels, h', w'] -> [batch, channels, pool, pool]
        let pooled = self.pool.forward(x);
        let [batch, channels, ph, pw] = pooled.dims();
        // [batch, channels, pool, pool] -> [batch, channels * pool * pool]
        let flat = pooled.reshape([batch, channels * ph * pw]);
        relu(self.feature.forward(flat))
    }

    /// Class logits.
    ///
    /// # Shapes
    /// - `images`: `[batch, channels, h, w]`, pixels in [-1, 1]
    /// - result: `[batch, num_classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.classifier.forward(self.features(images))
    }

    /// The training objective of a batch: the cross-entropy -log softmax(logits)[label]
    /// averaged over the batch, and the batch accuracy (for logging), both one-element
    /// tensors left on the device.
    ///
    /// # Shapes
    /// - `images`: `[batch, channels, h, w]` in [-1, 1]; `labels`: `[batch]`
    pub fn loss_and_accuracy(
        &self,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
    ) -> (Tensor<1>, Tensor<1>) {
        let logits = self.forward(images);
        let loss =
            CrossEntropyLoss::new(None, &logits.device()).forward(logits.clone(), labels.clone());
        (loss, batch_accuracy(logits, labels))
    }
}

/// Fraction of rows whose argmax is the label, as a one-element tensor.
///
/// # Shapes
/// - `logits`: `[batch, num_classes]`; `labels`: `[batch]`
pub fn batch_accuracy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    // [batch, 1] -> [batch]
    let predicted = logits.argmax(1).reshape([batch]);
    predicted.equal(labels).float().mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_argmax_hits() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_floats(
            [
                [2.0, 1.0, 0.0],
                [0.0, 3.0, 1.0],
                [0.0, 0.0, 5.0],
                [9.0, 0.0, 0.0],
            ],
            &device,
        );
        let labels = Tensor::<1, Int>::from_ints([0, 1, 1, 2], &device);
        assert_eq!(batch_accuracy(logits, labels).into_scalar::<f32>(), 0.5);
    }

    #[test]
    fn loss_is_the_mean_cross_entropy() {
        // against log-sum-exp of the logits the model itself produces, in f64
        let device = Device::flex();
        let model = EvaluatorConfig {
            channels: vec![4],
            pool_size: 1,
            feature_dim: 3,
        }
        .init(1, 3, &device)
        .unwrap();
        let images = ldm_common::rng::randn(
            &mut ldm_common::rng::stream(5, "images", 0),
            [4, 1, 8, 8],
            &device,
        );
        let labels = [2i64, 0, 1, 1];
        let logits: Vec<Vec<f32>> = ldm_common::tensor::to_vec_f32(model.forward(images.clone()))
            .chunks(3)
            .map(<[f32]>::to_vec)
            .collect();
        let expected: f64 = logits
            .iter()
            .zip(labels)
            .map(|(r, y)| {
                let max = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let lse = max + r.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                lse - r[y as usize] as f64
            })
            .sum::<f64>()
            / 4.0;
        let (loss, _) =
            model.loss_and_accuracy(images, Tensor::<1, Int>::from_ints(labels, &device));
        let loss = f64::from(loss.into_scalar::<f32>());
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn shapes_of_logits_and_features() {
        let device = Device::flex();
        device.seed(31);
        let model = EvaluatorConfig::default().init(1, 10, &device).unwrap();
        let x = Tensor::<4>::zeros([3, 1, 32, 32], &device);
        assert_eq!(model.forward(x.clone()).dims(), [3, 10]);
        assert_eq!(model.features(x).dims(), [3, 128]);

        let small = EvaluatorConfig {
            channels: vec![4, 8],
            pool_size: 1,
            feature_dim: 6,
        };
        let model = small.init(3, 5, &device).unwrap();
        let x = Tensor::<4>::zeros([2, 3, 16, 12], &device);
        assert_eq!(model.forward(x.clone()).dims(), [2, 5]);
        assert_eq!(model.features(x).dims(), [2, 6]);
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: EvaluatorConfig = toml::from_str("feature_dim = 64").unwrap();
        assert_eq!(c.channels, vec![16, 32, 64]);
        assert_eq!(c.pool_size, 4);
        assert_eq!(c.feature_dim, 64);
        let text = toml::to_string(&EvaluatorConfig::default()).unwrap();
        assert_eq!(
            toml::from_str::<EvaluatorConfig>(&text).unwrap(),
            EvaluatorConfig::default()
        );
        let err = toml::from_str::<EvaluatorConfig>("channel = [8]").unwrap_err();
        assert!(err.to_string().contains("unknown field `channel`"), "{err}");
    }

    #[test]
    fn invalid_configs_are_refused() {
        let device = Device::flex();
        let c = EvaluatorConfig {
            channels: vec![8, 0],
            ..EvaluatorConfig::default()
        };
        let err = c.init(1, 10, &device).unwrap_err();
        assert_eq!(
            err.to_string(),
            "evaluator.channels = [8, 0]: expected at least one conv, each with channels > 0"
        );
        let err = EvaluatorConfig::default().init(1, 1, &device).unwrap_err();
        assert_eq!(
            err.to_string(),
            "number of classes = 1: expected at least 2 labelled classes"
        );
    }
}
