//! Building blocks of the autoencoder (after the CompVis latent-diffusion first stage,
//! Rombach et al. 2022): pre-activation residual blocks with GroupNorm, strided-conv
//! downsampling and nearest-neighbour upsampling.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::silu;

/// A 3x3 convolution that keeps the spatial size (stride 1) or halves it (stride 2).
pub fn conv3x3(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

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
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let skip = match &self.skip {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}

/// Nearest-neighbour 2x upsampling by broadcasting (its backward is a plain sum).
///
/// # Shapes
/// - `x`: `[batch, c, h, w]` -> `[batch, c, 2h, 2w]`
pub fn upsample_nearest2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    // [b, c, h, 1, w, 1] -> [b, c, h, 2, w, 2] -> [b, c, 2h, 2w]
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}
