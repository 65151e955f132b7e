//! Convolution helpers shared by the VAE and the U-Net.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

/// A 3x3 convolution that keeps the spatial size (stride 1) or halves it (stride 2).
pub fn conv3x3(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
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
