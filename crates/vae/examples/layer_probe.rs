//! Times single layers of the VAE and the U-Net, forward and forward + backward, on one device:
//! the measurement behind docs/PERFORMANCE.md's "Where the convolutional networks' time goes".
//! `scripts/bench/layer_probe.py` times the same layers in PyTorch.
//!
//! ```sh
//! cargo run --release -p ldm-vae --example layer_probe -- [cpu|libtorch] [iters]
//! ```
//!
//! Rows, for each shape (batch, channels, side) that the recipes' networks run at:
//! - `conv3x3`: burn's `Conv2d` (3x3, padding 1, bias), loss sum(y * g);
//! - `conv3x3-gemm`: the same layer through `ldm_common::gemm_conv::conv2d`, which the models
//!   use (im2col + gemm in NCHW on burn-flex; on libtorch, libtorch's convolution with torch's
//!   backward, `ldm_common::torch_ops`, in a build with `--features ldm-common/tch`);
//! - `conv3x3-slices`: the same convolution written as im2col from 9 shifted slices of the
//!   padded input and one batched matmul (an alternative that was tried; it is slower);
//! - `groupnorm-silu`: burn-nn's silu(GroupNorm(x)), as in every residual block;
//! - `groupnorm-silu-fused`: the same through `ldm_common::group_norm::group_norm_silu`, which
//!   the models use (one operation with its own backward on burn-flex; libtorch's group norm
//!   and SiLU with torch's backward on libtorch).
//!
//! and for the U-Net's attention levels (the side x side pixels as tokens, 4 heads of c / 4):
//! - `attention-burn`: self-attention through burn's own `attention` (composed of about ten
//!   operations under autodiff);
//! - `attention`: the same through `ldm_common::layers::attention`, which the models use (one
//!   operation with its own backward on burn-flex, `ldm_common::attention`; libtorch's
//!   `scaled_dot_product_attention` on libtorch).
//!
//! Each figure is the median of `iters` runs after one warm-up run; a run ends by reading the
//! output (forward) or the input's gradient (backward) back to the host.

use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::{GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::silu;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use ldm_common::device::{DeviceChoice, select};
use ldm_common::gemm_conv::conv2d;
use ldm_common::group_norm::group_norm_silu;
use ldm_common::layers::attention;

/// The (batch, channels, side) of the layers measured: the VAE's three levels at batch 32, the
/// U-Net's two levels at batch 64.
const SHAPES: [(usize, usize, usize); 5] = [
    (32, 16, 32),
    (32, 32, 16),
    (32, 32, 8),
    (64, 64, 8),
    (64, 128, 4),
];

/// (batch, channels, side) of the attention rows: the U-Net's two levels at batch 64 (the
/// recipe has attention at the 4x4 one), and a 16x16 level as a larger image's U-Net has.
const ATTENTION_SHAPES: [(usize, usize, usize); 3] = [(64, 64, 8), (64, 128, 4), (16, 128, 16)];

/// Heads of the attention rows.
const HEADS: usize = 4;

/// Self-attention over the pixels of x [n, c, s, s] with [`HEADS`] heads of c / HEADS, through
/// `attend(q, k, v)`, back in x's layout.
fn self_attention(
    x: Tensor<4>,
    attend: impl Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let tokens = x.reshape([n, HEADS, c / HEADS, h * w]).swap_dims(2, 3);
    attend(tokens.clone(), tokens.clone(), tokens)
        .swap_dims(2, 3)
        .reshape([n, c, h, w])
}

/// A 3x3 convolution (padding 1) as im2col + matmul: the 9 shifted views of the padded input
/// concatenated on the channel axis, `[n, 9c, h w]`, multiplied by `w: [c_out, 9c]`.
fn conv3x3_slices(x: Tensor<4>, w: Tensor<2>, b: Tensor<1>) -> Tensor<4> {
    let [n, c, h, wd] = x.dims();
    let c_out = w.dims()[0];
    let padded = x.pad((1, 1, 1, 1), PadMode::Constant(0.0));
    let views = (0..9)
        .map(|k| {
            padded
                .clone()
                .slice([0..n, 0..c, k / 3..k / 3 + h, k % 3..k % 3 + wd])
        })
        .collect();
    let columns = Tensor::cat(views, 1).reshape([n, 9 * c, h * wd]);
    let y = w.unsqueeze::<3>().matmul(columns);
    y.reshape([n, c_out, h, wd]) + b.reshape([1, c_out, 1, 1])
}

/// Median milliseconds of the forward and of forward + backward of `layer` on `x`.
fn time(iters: usize, x: &Tensor<4>, layer: impl Fn(Tensor<4>) -> Tensor<4>) -> (f64, f64) {
    let g = Tensor::<4>::random(
        layer(x.clone()).dims(),
        Distribution::Normal(0.0, 1.0),
        &x.device(),
    );
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for i in 0..=iters {
        let start = Instant::now();
        let xg = x.clone().require_grad();
        let y = layer(xg.clone());
        let _ = y.clone().into_data();
        let t_fwd = start.elapsed().as_secs_f64() * 1e3;
        let grads = (y * g.clone()).sum().backward();
        let _ = xg.grad(&grads).expect("input gradient").into_data();
        if i > 0 {
            fwd.push(t_fwd);
            both.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(fwd), median(both))
}

fn main() {
    ldm_common::alloc::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let choice: DeviceChoice = args
        .next()
        .as_deref()
        .unwrap_or("cpu")
        .parse()
        .unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        });
    let iters: usize = args
        .next()
        .map_or(10, |s| s.parse().expect("iters: a number"));
    let selected = select(choice).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let device = selected.device.autodiff();
    device.seed(0);
    println!(
        "# burn, {}, median of {iters} runs (ms)",
        selected.description
    );
    println!("layer batch channels side forward forward+backward");
    for (n, c, side) in SHAPES {
        let x = Tensor::<4>::random([n, c, side, side], Distribution::Normal(0.0, 1.0), &device);
        let conv = Conv2dConfig::new([c, c], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let w =
            Tensor::<2>::random([c, 9 * c], Distribution::Normal(0.0, 0.1), &device).require_grad();
        let b = Tensor::<1>::zeros([c], &device).require_grad();
        let norm = GroupNormConfig::new(if c <= 32 { 8 } else { 32 }, c).init(&device);
        let rows: [(&str, (f64, f64)); 5] = [
            ("conv3x3", time(iters, &x, |x| conv.forward(x))),
            ("conv3x3-gemm", time(iters, &x, |x| conv2d(&conv, x))),
            (
                "conv3x3-slices",
                time(iters, &x, |x| conv3x3_slices(x, w.clone(), b.clone())),
            ),
            ("groupnorm-silu", time(iters, &x, |x| silu(norm.forward(x)))),
            (
                "groupnorm-silu-fused",
                time(iters, &x, |x| group_norm_silu(&norm, x)),
            ),
        ];
        for (name, (fwd, both)) in rows {
            println!("{name} {n} {c} {side} {fwd:.2} {both:.2}");
        }
    }
    for (n, c, side) in ATTENTION_SHAPES {
        let x = Tensor::<4>::random([n, c, side, side], Distribution::Normal(0.0, 1.0), &device);
        let burns =
            |q, k, v| burn_attention(q, k, v, None, None, AttentionModuleOptions::default());
        let rows = [
            (
                "attention-burn",
                time(iters, &x, |x| self_attention(x, burns)),
            ),
            (
                "attention",
                time(iters, &x, |x| {
                    self_attention(x, |q, k, v| attention(q, k, v, None))
                }),
            ),
        ];
        for (name, (fwd, both)) in rows {
            println!("{name} {n} {c} {side} {fwd:.2} {both:.2}");
        }
    }
}
