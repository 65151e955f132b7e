//! The VAE (Kingma & Welling 2014) over a spatial latent: q(z|x) = N(mu, diag(sigma^2)),
//! z = mu + sigma * eps, p(x|z) by the decoder.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig};
use burn::prelude::*;
use ldm_common::precision::{param_dtype, to_dtype, to_f32};

use crate::blocks::{ResBlock, conv3x3, upsample_nearest2x};
use crate::config::VaeConfig;
use crate::loss::{VaeLoss, kl_to_standard_normal, reconstruction_loss};
use ldm_common::gemm_conv::conv2d;
use ldm_common::group_norm::group_norm_silu;

/// One resolution level: residual blocks, then an optional resampling conv.
#[derive(Module, Debug)]
pub struct Level {
    blocks: Vec<ResBlock>,
    resample: Option<Conv2d>,
}

/// x -> (mu, logvar) of q(z|x).
#[derive(Module, Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    mid: ResBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// z -> x, the mean of p(x|z).
#[derive(Module, Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: ResBlock,
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// Encoder and decoder of the first stage.
#[derive(Module, Debug)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
}

/// The Gaussian posterior q(z|x).
#[derive(Debug, Clone)]
pub struct Posterior {
    /// Shape `[batch, latent_channels, h/f, w/f]`.
    pub mean: Tensor<4>,
    /// log sigma^2, clamped to [-30, 20] as in CompVis' DiagonalGaussianDistribution.
    pub logvar: Tensor<4>,
}

impl Posterior {
    /// z = mu + sigma * eps  (the reparameterization trick, Kingma & Welling 2014 eq. 10).
    pub fn sample(&self, eps: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + (self.logvar.clone() * 0.5).exp() * eps
    }
}

impl Vae {
    /// Builds the model for `image_channels`-channel images; `config` must be validated.
    pub fn new(config: &VaeConfig, image_channels: usize, device: &Device) -> Self {
        let ch = config.level_channels();
        let g = config.groups;
        let last = ch.len() - 1;

        let mut enc_levels = Vec::new();
        let mut c = ch[0];
        for (i, &c_out) in ch.iter().enumerate() {
            let mut blocks = Vec::new();
            for _ in 0..config.num_res_blocks {
                blocks.push(ResBlock::new(c, c_out, g, device));
                c = c_out;
            }
            let resample = (i < last).then(|| conv3x3(c, c, 2, device));
            enc_levels.push(Level { blocks, resample });
        }
        let encoder = Encoder {
            conv_in: conv3x3(image_channels, ch[0], 1, device),
            levels: enc_levels,
            mid: ResBlock::new(c, c, g, device),
            norm_out: GroupNormConfig::new(g, c).init(device),
            conv_out: conv3x3(c, 2 * config.latent_channels, 1, device),
        };

        let mut dec_levels = Vec::new();
        for (i, &c_out) in ch.iter().enumerate().rev() {
            let mut blocks = Vec::new();
            for _ in 0..config.num_res_blocks {
                blocks.push(ResBlock::new(c, c_out, g, device));
                c = c_out;
            }
            let resample = (i > 0).then(|| conv3x3(c, c, 1, device));
            dec_levels.push(Level { blocks, resample });
        }
        let decoder = Decoder {
            conv_in: conv3x3(config.latent_channels, ch[last], 1, device),
            mid: ResBlock::new(ch[last], ch[last], g, device),
            levels: dec_levels,
            norm_out: GroupNormConfig::new(g, c).init(device),
            conv_out: Conv2dConfig::new([c, image_channels], [3, 3])
                .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
        };
        Self { encoder, decoder }
    }

    /// q(z|x).
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, h, w]` in [-1, 1]
    /// - mean, logvar: `[batch, latent_channels, h/f, w/f]`
    pub fn encode(&self, x: Tensor<4>) -> Posterior {
        let e = &self.encoder;
        let mut h = conv2d(&e.conv_in, x);
        for level in &e.levels {
            for block in &level.blocks {
                h = block.forward(h);
            }
            if let Some(down) = &level.resample {
                h = conv2d(down, h);
            }
        }
        let h = e.mid.forward(h);
        let h = conv2d(&e.conv_out, group_norm_silu(&e.norm_out, h));
        let [b, c2, hh, ww] = h.dims();
        let c = c2 / 2;
        // [b, 2c, h, w] -> mean [b, c, h, w], logvar [b, c, h, w]
        let mean = h.clone().slice([0..b, 0..c, 0..hh, 0..ww]);
        let logvar = h.slice([0..b, c..c2, 0..hh, 0..ww]).clamp(-30.0, 20.0);
        Posterior { mean, logvar }
    }

    /// The mean of p(x|z).
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, h/f, w/f]` -> `[batch, channels, h, w]`
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let mut h = d.mid.forward(conv2d(&d.conv_in, z));
        for level in &d.levels {
            for block in &level.blocks {
                h = block.forward(h);
            }
            if let Some(up) = &level.resample {
                h = conv2d(up, upsample_nearest2x(h));
            }
        }
        conv2d(&d.conv_out, group_norm_silu(&d.norm_out, h))
    }

    /// The training objective on a batch: recon(x, decode(z)) + beta * KL(q(z|x) || N(0, I)),
    /// with z drawn by the reparameterization trick from the given `eps`.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, h, w]`; `eps`: like the latent
    ///
    /// The networks run in the weights' dtype (bf16 under mixed precision:
    /// `ldm_common::precision`); the reconstruction and the losses are f32.
    pub fn loss(&self, x: Tensor<4>, eps: Tensor<4>, config: &VaeConfig) -> VaeLoss {
        let dtype = param_dtype(self);
        let posterior = self.encode(to_dtype(x.clone(), dtype));
        let z = posterior.sample(to_dtype(eps, dtype));
        let reconstruction = to_f32(self.decode(z));
        let recon = reconstruction_loss(reconstruction.clone(), x, config.reconstruction);
        let posterior = Posterior {
            mean: to_f32(posterior.mean),
            logvar: to_f32(posterior.logvar),
        };
        let kl = kl_to_standard_normal(&posterior).mean();
        let loss = recon.clone() + kl.clone() * config.kl_weight;
        VaeLoss {
            loss,
            recon,
            kl,
            reconstruction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Reconstruction;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    #[test]
    fn reparameterization_has_the_posterior_moments() {
        let device = Device::flex();
        let n = 20_000;
        let q = Posterior {
            mean: Tensor::<4>::full([n, 1, 1, 1], 1.5, &device),
            logvar: Tensor::<4>::full([n, 1, 1, 1], 0.64f32.ln(), &device),
        };
        let z = to_vec_f32(q.sample(randn(&mut stream(1, "test", 0), [n, 1, 1, 1], &device)));
        let mean = z.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = z
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        // standard errors: 0.8 / sqrt(n) = 0.0057 for the mean, ~0.0064 for the variance
        assert!((mean - 1.5).abs() < 0.03, "mean {mean}");
        assert!((var - 0.64).abs() < 0.03, "var {var}");
    }

    #[test]
    fn shapes_for_odd_configs() {
        let device = Device::flex();
        for (factor, mult, res, channels, latent, blocks) in [
            (4, vec![1, 2, 2], 32, 1, 4, 1),
            (2, vec![1, 1], 12, 3, 3, 2),
            (8, vec![1, 1, 2, 2], 16, 1, 1, 1),
            (1, vec![1], 5, 3, 2, 1),
        ] {
            let config = VaeConfig {
                downsample_factor: factor,
                channel_mult: mult,
                latent_channels: latent,
                num_res_blocks: blocks,
                base_channels: 8,
                groups: 4,
                ..VaeConfig::default()
            };
            config.validate(res).unwrap();
            let vae = Vae::new(&config, channels, &device);
            let x = Tensor::<4>::zeros([2, channels, res, res], &device);
            let q = vae.encode(x.clone());
            let side = res / factor;
            assert_eq!(q.mean.dims(), [2, latent, side, side]);
            assert_eq!(q.logvar.dims(), [2, latent, side, side]);
            assert_eq!(vae.decode(q.mean).dims(), [2, channels, res, res]);
        }
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let mut c = VaeConfig::default();
        let err = c.validate(30).unwrap_err().to_string();
        assert!(
            err.contains("vae.downsample_factor = 4") && err.contains("resolution 30"),
            "{err}"
        );
        c.downsample_factor = 8;
        let err = c.validate(32).unwrap_err().to_string();
        assert!(
            err.contains("vae.channel_mult") && err.contains("4 entries"),
            "{err}"
        );
        c.downsample_factor = 3;
        assert!(
            c.validate(33)
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
        let c = VaeConfig {
            groups: 5,
            ..VaeConfig::default()
        };
        assert!(
            c.validate(32)
                .unwrap_err()
                .to_string()
                .contains("vae.groups = 5")
        );
    }

    /// Central differences of a scalar loss against autodiff, for the input of the whole VAE
    /// (convs with stride 2, GroupNorm, nearest upsampling, the reparameterization, the KL).
    #[test]
    fn loss_gradient_matches_finite_differences() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let config = VaeConfig {
            base_channels: 4,
            groups: 2,
            channel_mult: vec![1, 2],
            downsample_factor: 2,
            latent_channels: 2,
            reconstruction: Reconstruction::L2,
            kl_weight: 0.5,
            ..VaeConfig::default()
        };
        let vae = Vae::new(&config, 1, &device);
        let x = randn(&mut stream(2, "x", 0), [1, 1, 4, 4], &device);
        let eps = randn(&mut stream(2, "eps", 0), [1, 2, 2, 2], &device);
        let loss_at = |x: Tensor<4>| vae.loss(x, eps.clone(), &config).loss;
        let xg = x.clone().require_grad();
        let grads = loss_at(xg.clone()).backward();
        let analytic = to_vec_f32(xg.grad(&grads).unwrap());
        let base = to_vec_f32(x.clone());
        let h = 1e-2f32;
        for i in [0usize, 5, 10, 15] {
            let shifted = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                Tensor::<4>::from_data(burn::tensor::TensorData::new(v, [1, 1, 4, 4]), &device)
            };
            let fd = (ldm_common::tensor::scalar(loss_at(shifted(h)))
                - ldm_common::tensor::scalar(loss_at(shifted(-h))))
                / (2.0 * f64::from(h));
            let a = f64::from(analytic[i]);
            assert!(
                (fd - a).abs() <= 2e-2 * a.abs().max(1e-2),
                "d loss / d x[{i}]: autodiff {a}, finite difference {fd}"
            );
        }
    }
}
