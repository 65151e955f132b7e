//! Convolution and upsampling helpers shared by the VAE and the U-Net.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::Device;

/// A 3x3 convolution that keeps the spatial size (stride 1) or halves it (stride 2).
pub fn conv3x3(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

pub use crate::upsample::upsample_nearest2x;
