//! The `[vae]` section: architecture and loss of the first stage.

use serde::{Deserialize, Serialize};

use crate::error::{Result, VaeError};

/// Reconstruction term of the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconstruction {
    /// Mean absolute error (a Laplace likelihood), sharper than L2.
    L1,
    /// Mean squared error (a Gaussian likelihood).
    L2,
}

/// Architecture and loss of the VAE.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Image side / latent side; a power of two. 32x32 images with factor 4 give 8x8 latents.
    #[serde(default = "d_factor")]
    pub downsample_factor: usize,
    /// Channels of the latent z.
    #[serde(default = "d_latent")]
    pub latent_channels: usize,
    /// Channels of the first level; level i has `base_channels * channel_mult[i]`.
    #[serde(default = "d_base")]
    pub base_channels: usize,
    /// One multiplier per resolution: `log2(downsample_factor) + 1` entries.
    #[serde(default = "d_mult")]
    pub channel_mult: Vec<usize>,
    /// Residual blocks per resolution.
    #[serde(default = "d_res")]
    pub num_res_blocks: usize,
    /// GroupNorm groups; must divide every level's channels.
    #[serde(default = "d_groups")]
    pub groups: usize,
    #[serde(default = "d_recon")]
    pub reconstruction: Reconstruction,
    /// beta in loss = recon + beta * KL, both averaged per element (pixel / latent dim).
    #[serde(default = "d_kl")]
    pub kl_weight: f64,
}

fn d_factor() -> usize {
    4
}
fn d_latent() -> usize {
    4
}
fn d_base() -> usize {
    32
}
fn d_mult() -> Vec<usize> {
    vec![1, 2, 2]
}
fn d_res() -> usize {
    1
}
fn d_groups() -> usize {
    8
}
fn d_recon() -> Reconstruction {
    Reconstruction::L1
}
fn d_kl() -> f64 {
    1e-3
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            downsample_factor: d_factor(),
            latent_channels: d_latent(),
            base_channels: d_base(),
            channel_mult: d_mult(),
            num_res_blocks: d_res(),
            groups: d_groups(),
            reconstruction: d_recon(),
            kl_weight: d_kl(),
        }
    }
}

impl VaeConfig {
    /// Number of downsampling steps, log2(downsample_factor).
    pub fn num_downsamples(&self) -> usize {
        self.downsample_factor.trailing_zeros() as usize
    }

    /// Channels at each resolution level.
    pub fn level_channels(&self) -> Vec<usize> {
        self.channel_mult
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// Side of the latent for images of side `resolution`.
    pub fn latent_size(&self, resolution: usize) -> usize {
        resolution / self.downsample_factor
    }

    /// Checks the config against the image size before a model is built.
    pub fn validate(&self, resolution: usize) -> Result<()> {
        let bad = |key: &str, value: String, expected: String| {
            Err(VaeError::InvalidConfig {
                key: format!("vae.{key}"),
                value,
                expected,
            })
        };
        let f = self.downsample_factor;
        if f == 0 || !f.is_power_of_two() {
            return bad(
                "downsample_factor",
                f.to_string(),
                "a power of two (1, 2, 4, 8, ...)".into(),
            );
        }
        if self.channel_mult.len() != self.num_downsamples() + 1 {
            return bad(
                "channel_mult",
                format!("{:?}", self.channel_mult),
                format!(
                    "{} entries, one per resolution for downsample_factor {f}",
                    self.num_downsamples() + 1
                ),
            );
        }
        if !resolution.is_multiple_of(f) {
            return bad(
                "downsample_factor",
                f.to_string(),
                format!("a divisor of the image resolution {resolution} (data.resolution)"),
            );
        }
        if self.latent_channels == 0 || self.base_channels == 0 || self.channel_mult.contains(&0) {
            return bad(
                "latent_channels",
                self.latent_channels.to_string(),
                "channels > 0".into(),
            );
        }
        if self.num_res_blocks == 0 {
            return bad("num_res_blocks", "0".into(), "at least 1".into());
        }
        if let Some(c) = self
            .level_channels()
            .into_iter()
            .find(|c| self.groups == 0 || c % self.groups != 0)
        {
            return bad(
                "groups",
                self.groups.to_string(),
                format!("a divisor of every level's channels (level with {c} channels)"),
            );
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            return bad(
                "kl_weight",
                self.kl_weight.to_string(),
                "a finite number >= 0".into(),
            );
        }
        Ok(())
    }
}
