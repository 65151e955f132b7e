//! The noisy-latent classifier p(y | z_t, t) of classifier guidance (Dhariwal & Nichol 2021,
//! "Diffusion Models Beat GANs on Image Synthesis", section 4): a small convolutional network over
//! the noisy latent with the timestep's sinusoidal embedding injected into every residual block
//! (the U-Net's [`ResBlock`]), GroupNorm throughout, and a global-average-pooled linear head.
//!
//! GroupNorm (not BatchNorm) keeps every sample's logits a function of that sample alone, so the
//! gradient of `sum_i log p(y_i | z_t,i)` w.r.t. `z_t` is, row by row, each sample's own
//! grad log p(y_i | z_t,i) — what [`NoisyClassifier::grad_log_prob`] returns for guidance.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, TensorData};
use ldm_common::activation::silu;
use serde::{Deserialize, Serialize};

use crate::embedding::TimestepEmbedder;
use crate::error::{DiffusionError, Result};
use crate::unet::{ResBlock, conv3x3};
use ldm_common::gemm_conv::conv2d;
use ldm_common::group_norm::group_norm_silu;

/// The `[classifier]` section: the shape of the noisy-latent classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisyClassifierConfig {
    /// Channels of each level; every level after the first halves the side (stride-2 conv).
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    /// Residual blocks per level, each receiving the time embedding.
    #[serde(default = "d_blocks")]
    pub num_res_blocks: usize,
    /// GroupNorm groups; must divide every level's channels.
    #[serde(default = "d_groups")]
    pub groups: usize,
    /// Width of the time embedding MLP (its sinusoid has `channels[0]` features).
    #[serde(default = "d_time_dim")]
    pub time_dim: usize,
    /// Dropout inside the residual blocks.
    #[serde(default)]
    pub dropout: f64,
}

fn d_channels() -> Vec<usize> {
    vec![32, 64]
}
fn d_blocks() -> usize {
    1
}
fn d_groups() -> usize {
    8
}
fn d_time_dim() -> usize {
    128
}

impl Default for NoisyClassifierConfig {
    fn default() -> Self {
        Self {
            channels: d_channels(),
            num_res_blocks: d_blocks(),
            groups: d_groups(),
            time_dim: d_time_dim(),
            dropout: 0.0,
        }
    }
}

fn invalid(key: &str, value: impl std::fmt::Display, expected: String) -> DiffusionError {
    DiffusionError::InvalidConfig {
        key: format!("classifier.{key}"),
        value: value.to_string(),
        expected,
    }
}

impl NoisyClassifierConfig {
    /// Checks the config against `latent_channels x latent_size x latent_size` latents and the
    /// number of classes; messages name the key.
    pub fn validate(
        &self,
        latent_channels: usize,
        latent_size: usize,
        num_classes: usize,
    ) -> Result<()> {
        let ch = &self.channels;
        if ch.is_empty() || ch.contains(&0) {
            return Err(invalid(
                "channels",
                format!("{ch:?}"),
                "expected at least one level, each with channels > 0".into(),
            ));
        }
        let halvings = latent_size.trailing_zeros() as usize;
        if latent_size == 0 || ch.len() - 1 > halvings {
            return Err(invalid(
                "channels",
                format!("{ch:?}"),
                format!(
                    "{} levels need {} halvings, but the {latent_size}x{latent_size} latent can be halved only {halvings} times",
                    ch.len(),
                    ch.len() - 1
                ),
            ));
        }
        if self.num_res_blocks == 0 {
            return Err(invalid("num_res_blocks", 0, "must be at least 1".into()));
        }
        if self.groups == 0 || ch.iter().any(|c| !c.is_multiple_of(self.groups)) {
            return Err(invalid(
                "groups",
                self.groups,
                format!("must divide the channels of every level {ch:?}"),
            ));
        }
        if self.time_dim == 0 {
            return Err(invalid("time_dim", 0, "must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid(
                "dropout",
                self.dropout,
                "expected a value in [0, 1)".into(),
            ));
        }
        if latent_channels == 0 {
            return Err(invalid("latent_channels", 0, "must be positive".into()));
        }
        if num_classes < 2 {
            return Err(invalid(
                "num_classes",
                num_classes,
                "a classifier needs at least 2 classes".into(),
            ));
        }
        Ok(())
    }

    /// Validates, then builds the network. Weights are drawn from the device's RNG: seed it
    /// first (`device.seed`).
    pub fn init(
        &self,
        latent_channels: usize,
        latent_size: usize,
        num_classes: usize,
        device: &Device,
    ) -> Result<NoisyClassifier> {
        self.validate(latent_channels, latent_size, num_classes)?;
        let g = self.groups;
        let mut c = self.channels[0];
        let mut levels = Vec::with_capacity(self.channels.len());
        for (i, &c_out) in self.channels.iter().enumerate() {
            let blocks = (0..self.num_res_blocks)
                .map(|k| {
                    let c_in = if k == 0 { c } else { c_out };
                    ResBlock::new(c_in, c_out, self.time_dim, g, self.dropout, device)
                })
                .collect();
            c = c_out;
            let downsample = (i + 1 < self.channels.len()).then(|| conv3x3(c, c, 2, device));
            levels.push(ClassifierLevel { blocks, downsample });
        }
        Ok(NoisyClassifier {
            time_embed: TimestepEmbedder::new(self.channels[0], self.time_dim, device),
            conv_in: conv3x3(latent_channels, self.channels[0], 1, device),
            levels,
            norm_out: GroupNormConfig::new(g, c).init(device),
            head: LinearConfig::new(c, num_classes).init(device),
        })
    }
}

/// One resolution: residual blocks with the time embedding, then a stride-2 conv (all but the
/// last level).
#[derive(Module, Debug)]
pub struct ClassifierLevel {
    blocks: Vec<ResBlock>,
    downsample: Option<Conv2d>,
}

/// p(y | z_t, t); build it with [`NoisyClassifierConfig::init`].
#[derive(Module, Debug)]
pub struct NoisyClassifier {
    time_embed: TimestepEmbedder,
    conv_in: Conv2d,
    levels: Vec<ClassifierLevel>,
    norm_out: GroupNorm,
    head: Linear,
}

impl NoisyClassifier {
    /// Class logits: head(mean_{h,w} SiLU(GN(levels(conv_in(z_t), SiLU(emb(t)))))).
    ///
    /// # Shapes
    /// - `z_t`: `[batch, latent_channels, side, side]`; `t`: `[batch]` float timesteps
    /// - output: `[batch, num_classes]`
    pub fn forward(&self, z_t: Tensor<4>, t: Tensor<1>) -> Tensor<2> {
        let emb = silu(self.time_embed.forward(t));
        let mut h = conv2d(&self.conv_in, z_t);
        for level in &self.levels {
            for block in &level.blocks {
                h = block.forward(h, emb.clone());
            }
            if let Some(down) = &level.downsample {
                h = conv2d(down, h);
            }
        }
        let h = group_norm_silu(&self.norm_out, h);
        let [b, c, _, _] = h.dims();
        // [b, c, h, w] -> [b, c, 1, 1] -> [b, c]
        let pooled = h.mean_dim(3).mean_dim(2).reshape([b, c]);
        self.head.forward(pooled)
    }

    /// log p(y_i | z_t,i, t_i) = log_softmax(logits_i)[y_i].
    ///
    /// # Shapes
    /// - `z_t`: `[batch, c, h, w]`; `t`, `labels`: `[batch]` -> `[batch]`
    pub fn log_prob(&self, z_t: Tensor<4>, t: Tensor<1>, labels: Tensor<1, Int>) -> Tensor<1> {
        let [b] = labels.dims();
        log_softmax(self.forward(z_t, t), 1)
            .gather(1, labels.reshape([b, 1]))
            .reshape([b])
    }

    /// grad_{z_t} log p(y_i | z_t,i, t) for every sample of the batch, the term classifier
    /// guidance adds to the score (Dhariwal & Nichol 2021, Algorithm 2). `z_t` is lifted onto
    /// autodiff for this one backward pass (the weights stay constants), so the classifier may
    /// live on a plain device; the result has no autodiff association.
    ///
    /// # Shapes
    /// - `z_t` and the result: `[batch, c, h, w]`; `labels`: `batch` class ids
    pub fn grad_log_prob(&self, z_t: Tensor<4>, t: usize, labels: &[usize]) -> Tensor<4> {
        let [b, ..] = z_t.dims();
        assert_eq!(b, labels.len(), "one label per latent");
        let device = z_t.device();
        let x = z_t.detach().autodiff().require_grad();
        let ids: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(ids, [b]), &device);
        let t = Tensor::<1>::full([b], t as f32, &device);
        let grads = self.log_prob(x.clone(), t, y).sum().backward();
        x.grad(&grads)
            .expect("z_t takes part in log p")
            .to_device(&device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::test_util::{check_gradient, perturb};
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::{scalar, to_vec_f32};

    fn tiny() -> NoisyClassifierConfig {
        NoisyClassifierConfig {
            channels: vec![8, 16],
            num_res_blocks: 1,
            groups: 4,
            time_dim: 16,
            dropout: 0.0,
        }
    }

    fn labels(ids: &[i64], device: &Device) -> Tensor<1, Int> {
        Tensor::from_ints(ids, device)
    }

    #[test]
    fn logits_have_one_column_per_class() {
        let device = Device::flex();
        device.seed(1);
        let model = tiny().init(2, 8, 5, &device).unwrap();
        let z = randn(&mut stream(1, "z", 0), [3, 2, 8, 8], &device);
        let t = Tensor::<1>::from_floats([0.0, 400.0, 999.0], &device);
        assert_eq!(model.forward(z.clone(), t.clone()).dims(), [3, 5]);
        // Probabilities over the classes sum to 1.
        let total: f64 = (0..5)
            .map(|c| {
                scalar(
                    model
                        .log_prob(z.clone(), t.clone(), labels(&[c, c, c], &device))
                        .exp()
                        .sum(),
                )
            })
            .sum();
        assert!((total - 3.0).abs() < 1e-4, "{total}");
    }

    /// d log p / d z_t and d log p / d(head weight) by autodiff match central differences, with
    /// every zero-initialised conv perturbed so the time path is alive.
    #[test]
    fn log_prob_gradient() {
        let device = Device::flex().autodiff();
        device.seed(2);
        let model = perturb(tiny().init(2, 8, 3, &device).unwrap(), 0.2, 2);
        let z = randn(&mut stream(2, "z", 0), [2, 2, 8, 8], &device);
        let t = Tensor::<1>::from_floats([50.0, 700.0], &device);
        let y = labels(&[2, 0], &device);
        check_gradient(
            "d/dz",
            |z| model.log_prob(z, t.clone(), y.clone()).sum(),
            z.clone(),
            1e-2,
        );
        let head_loss = |w: Tensor<2>| {
            let mut m = model.clone();
            m.head.weight = burn::module::Param::from_tensor(w);
            m.log_prob(z.clone(), t.clone(), y.clone()).sum()
        };
        check_gradient("d/dhead", head_loss, model.head.weight.val(), 1e-2);
    }

    /// The guidance gradient of a classifier on a plain device: per sample, equal to central
    /// differences of that sample's own log p, and independent of the rest of the batch.
    #[test]
    fn guidance_gradient_is_each_samples_own() {
        let device = Device::flex();
        device.seed(3);
        let model = perturb(tiny().init(2, 8, 3, &device).unwrap(), 0.2, 3);
        let z = randn(&mut stream(3, "z", 0), [2, 2, 8, 8], &device);
        let t = 300;
        let grad = model.grad_log_prob(z.clone(), t, &[1, 2]);
        assert!(!grad.is_autodiff());
        assert_eq!(grad.dims(), [2, 2, 8, 8]);
        let g = to_vec_f32(grad);
        // The second sample alone gives the same rows.
        let alone = to_vec_f32(model.grad_log_prob(z.clone().narrow(0, 1, 1), t, &[2]));
        for (a, b) in g[128..].iter().zip(&alone) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let base = to_vec_f32(z.clone());
        let log_p = |v: Vec<f32>, i: usize| {
            let z = Tensor::<4>::from_data(TensorData::new(v, [2, 2, 8, 8]), &device);
            let lp = model.log_prob(
                z,
                Tensor::full([2], t as f32, &device),
                labels(&[1, 2], &device),
            );
            f64::from(to_vec_f32(lp)[i])
        };
        let h = 1e-2f32;
        let largest = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(largest > 1e-4, "gradient vanishes");
        for k in [0usize, 37, 90, 128, 170, 255] {
            let i = k / 128;
            let (mut up, mut down) = (base.clone(), base.clone());
            up[k] += h;
            down[k] -= h;
            let fd = (log_p(up, i) - log_p(down, i)) / (2.0 * f64::from(h));
            let a = f64::from(g[k]);
            assert!(
                (fd - a).abs() <= 2e-2 * a.abs() + 1e-3 * f64::from(largest),
                "[{k}]: autodiff {a}, finite difference {fd}"
            );
        }
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            (
                NoisyClassifierConfig {
                    channels: vec![],
                    ..tiny()
                },
                "classifier.channels = []",
            ),
            (
                NoisyClassifierConfig {
                    channels: vec![8, 8, 8, 8, 8],
                    ..tiny()
                },
                "can be halved only 3 times",
            ),
            (
                NoisyClassifierConfig {
                    groups: 3,
                    ..tiny()
                },
                "classifier.groups = 3: must divide",
            ),
            (
                NoisyClassifierConfig {
                    num_res_blocks: 0,
                    ..tiny()
                },
                "classifier.num_res_blocks = 0",
            ),
            (
                NoisyClassifierConfig {
                    dropout: 1.0,
                    ..tiny()
                },
                "classifier.dropout = 1",
            ),
        ];
        for (config, needle) in cases {
            let e = config.validate(2, 8, 4).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let e = tiny().validate(2, 8, 1).unwrap_err().to_string();
        assert!(e.contains("at least 2 classes"), "{e}");
    }
}
