//! Building blocks of the autoencoder (after the CompVis latent-diffusion first stage,
//! Rombach et al. 2022): pre-activation residual blocks with GroupNorm, strided-conv
//! downsampling and nearest-neighbour upsampling.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig};
use burn::prelude::*;
use ldm_common::gemm_conv::conv2d;
use ldm_common::group_norm::group_norm_silu;
pub use ldm_common::nn::{conv3x3, upsample_nearest2x};

/// x + F(x) with F = conv(silu(norm(conv(silu(norm(x)))))); a 1x1 conv on the skip when the
/// channel count changes.
#[derive(Module, Debug)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    pub fn new(c_in: usize, c_out: usize, groups: usize, device: &Device) -> Self {
        Self {
            norm1: GroupNormConfig::new(groups, c_in).init(device),
            conv1: conv3x3(c_in, c_out, 1, device),
            norm2: GroupNormConfig::new(groups, c_out).init(device),
            conv2: conv3x3(c_out, c_out, 1, device),
            skip: (c_in != c_out).then(|| Conv2dConfig::new([c_in, c_out], [1, 1]).init(device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` -> `[batch, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = conv2d(&self.conv1, group_norm_silu(&self.norm1, x.clone()));
        let h = conv2d(&self.conv2, group_norm_silu(&self.norm2, h));
        let skip = match &self.skip {
            Some(conv) => conv2d(conv, x),
            None => x,
        };
        skip + h
    }
}
