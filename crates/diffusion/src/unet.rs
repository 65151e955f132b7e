//! The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
//! after Ho et al. 2020), sized for small latents, with the text cross-attention of Rombach et
//! al. 2022.
//!
//! Residual blocks (GroupNorm, SiLU, 3x3 convs) receive the embedding of t (+ class + pooled
//! text) through a per-block projection; self-attention (and cross-attention to the text
//! tokens) runs at the configured levels and in the middle; the up path concatenates the skip
//! connections of the down path. The last conv of every residual branch, the attention output
//! projections and the output conv start at zero, as in ADM, so the network outputs exactly 0 at
//! init.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, GroupNormConfig, Initializer, Linear, LinearConfig,
    PaddingConfig2d,
};
use burn::prelude::*;
use ldm_common::activation::silu;
use ldm_common::linear::linear;
pub use ldm_common::nn::{conv3x3, upsample_nearest2x};
use serde::{Deserialize, Serialize};

use crate::attention::{SelfAttention, TextCrossAttention};
use crate::backbone::ConditioningSpec;
use crate::denoiser::{Backbone, Conditioning, TextConditioning};
use crate::embedding::{LabelEmbedder, TimestepEmbedder};
use crate::error::{DiffusionError, Result};
use ldm_common::gemm_conv::conv2d;
use ldm_common::group_norm::{group_norm, group_norm_silu};

/// The `[backbone]` section with `kind = "unet"`. The defaults suit 8x8x4 latents on a CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Channels of the first level; level i has `base_channels * channel_mult[i]`.
    #[serde(default = "d_base")]
    pub base_channels: usize,
    /// One multiplier per resolution; each level after the first halves the side.
    #[serde(default = "d_mult")]
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more, as in ADM).
    #[serde(default = "d_res")]
    pub num_res_blocks: usize,
    /// Level indices (0 = full resolution) with attention blocks; the middle always has one.
    #[serde(default = "d_attn")]
    pub attention_levels: Vec<usize>,
    /// Attention heads; must divide the channels of every level with attention.
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    /// GroupNorm groups; must divide every level's channels.
    #[serde(default = "d_groups")]
    pub groups: usize,
    /// Dropout before the second conv of each residual block.
    #[serde(default)]
    pub dropout: f64,
}

fn d_base() -> usize {
    64
}
fn d_mult() -> Vec<usize> {
    vec![1, 2]
}
fn d_res() -> usize {
    1
}
fn d_attn() -> Vec<usize> {
    vec![1]
}
fn d_heads() -> usize {
    4
}
fn d_groups() -> usize {
    32
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            base_channels: d_base(),
            channel_mult: d_mult(),
            num_res_blocks: d_res(),
            attention_levels: d_attn(),
            num_heads: d_heads(),
            groups: d_groups(),
            dropout: 0.0,
        }
    }
}

fn invalid(key: &str, value: impl std::fmt::Display, expected: String) -> DiffusionError {
    DiffusionError::InvalidConfig {
        key: format!("unet.{key}"),
        value: value.to_string(),
        expected,
    }
}

impl UNetConfig {
    /// Channels of each level.
    pub fn level_channels(&self) -> Vec<usize> {
        self.channel_mult
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// Checks the config against a `latent_size x latent_size` latent.
    pub fn validate(&self, latent_size: usize) -> Result<()> {
        if self.base_channels == 0 {
            return Err(invalid("base_channels", 0, "must be positive".into()));
        }
        let mult = format!("{:?}", self.channel_mult);
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return Err(invalid(
                "channel_mult",
                mult,
                "expected positive multipliers, at least one".into(),
            ));
        }
        let levels = self.channel_mult.len();
        let halvings = latent_size.trailing_zeros() as usize;
        if levels - 1 > halvings {
            return Err(invalid(
                "channel_mult",
                mult,
                format!(
                    "{levels} levels need {} halvings, but the {latent_size}x{latent_size} latent can be halved only {halvings} times",
                    levels - 1
                ),
            ));
        }
        if self.num_res_blocks == 0 {
            return Err(invalid("num_res_blocks", 0, "must be at least 1".into()));
        }
        let ch = self.level_channels();
        if self.groups == 0 || ch.iter().any(|c| !c.is_multiple_of(self.groups)) {
            return Err(invalid(
                "groups",
                self.groups,
                format!("must divide the channels of every level {ch:?}"),
            ));
        }
        if let Some(&l) = self.attention_levels.iter().find(|&&l| l >= levels) {
            return Err(invalid(
                "attention_levels",
                format!("{:?}", self.attention_levels),
                format!("level {l} does not exist: channel_mult has {levels} levels (0..{levels})"),
            ));
        }
        let attn_ch: Vec<usize> = self
            .attention_levels
            .iter()
            .map(|&l| ch[l])
            .chain([ch[levels - 1]])
            .collect();
        if self.num_heads == 0 || attn_ch.iter().any(|c| !c.is_multiple_of(self.num_heads)) {
            return Err(invalid(
                "num_heads",
                self.num_heads,
                format!(
                    "must divide the channels of every attention level (and the middle) {attn_ch:?}"
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid(
                "dropout",
                self.dropout,
                "expected a value in [0, 1)".into(),
            ));
        }
        Ok(())
    }

    /// Builds the U-Net; `self` must have passed [`validate`](Self::validate).
    pub fn init(&self, latent_channels: usize, cond: &ConditioningSpec, device: &Device) -> UNet {
        let ch = self.level_channels();
        let emb_dim = 4 * self.base_channels;
        let g = self.groups;
        let text_dim = cond.text_dim;
        let block = |c_in: usize, c_out: usize, level: usize| UNetBlock {
            res: ResBlock::new(c_in, c_out, emb_dim, g, self.dropout, device),
            attn: self
                .attention_levels
                .contains(&level)
                .then(|| SpatialAttention::new(c_out, self.num_heads, g, text_dim, device)),
        };

        let mut c = ch[0];
        let mut skips = vec![c];
        let mut down = Vec::new();
        for (i, &c_out) in ch.iter().enumerate() {
            let mut blocks = Vec::new();
            for _ in 0..self.num_res_blocks {
                blocks.push(block(c, c_out, i));
                c = c_out;
                skips.push(c);
            }
            let downsample = (i + 1 < ch.len()).then(|| conv3x3(c, c, 2, device));
            if downsample.is_some() {
                skips.push(c);
            }
            down.push(DownLevel { blocks, downsample });
        }

        let mid = MidBlock {
            res1: ResBlock::new(c, c, emb_dim, g, self.dropout, device),
            attn: SpatialAttention::new(c, self.num_heads, g, text_dim, device),
            res2: ResBlock::new(c, c, emb_dim, g, self.dropout, device),
        };

        let mut up = Vec::new();
        for (i, &c_out) in ch.iter().enumerate().rev() {
            let mut blocks = Vec::new();
            for _ in 0..=self.num_res_blocks {
                let skip = skips.pop().expect("one skip per up block");
                blocks.push(block(c + skip, c_out, i));
                c = c_out;
            }
            let upsample = (i > 0).then(|| conv3x3(c, c, 1, device));
            up.push(UpLevel { blocks, upsample });
        }

        UNet {
            time_embed: TimestepEmbedder::new(self.base_channels, emb_dim, device),
            label_embed: cond
                .num_classes
                .map(|n| LabelEmbedder::new(n, emb_dim, device)),
            text_proj: text_dim.map(|d| LinearConfig::new(d, emb_dim).init(device)),
            conv_in: conv3x3(latent_channels, ch[0], 1, device),
            down,
            mid,
            up,
            norm_out: GroupNormConfig::new(g, c).init(device),
            conv_out: Conv2dConfig::new([c, latent_channels], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }
}

/// x + conv(dropout(silu(norm(conv(silu(norm(x))) + proj(emb))))), a 1x1 conv on the skip when
/// the channel count changes (ADM `ResBlock` without scale-shift norm); the last conv starts at 0.
#[derive(Module, Debug)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    emb_proj: Linear,
    norm2: GroupNorm,
    dropout: Dropout,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    pub fn new(
        c_in: usize,
        c_out: usize,
        emb_dim: usize,
        groups: usize,
        dropout: f64,
        device: &Device,
    ) -> Self {
        Self {
            norm1: GroupNormConfig::new(groups, c_in).init(device),
            conv1: conv3x3(c_in, c_out, 1, device),
            emb_proj: LinearConfig::new(emb_dim, c_out).init(device),
            norm2: GroupNormConfig::new(groups, c_out).init(device),
            dropout: DropoutConfig::new(dropout).init(),
            conv2: Conv2dConfig::new([c_out, c_out], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_initializer(Initializer::Zeros)
                .init(device),
            skip: (c_in != c_out).then(|| Conv2dConfig::new([c_in, c_out], [1, 1]).init(device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` -> `[batch, c_out, h, w]`
    /// - `emb`: `[batch, emb_dim]`, already through SiLU
    pub fn forward(&self, x: Tensor<4>, emb: Tensor<2>) -> Tensor<4> {
        let h = conv2d(&self.conv1, group_norm_silu(&self.norm1, x.clone()));
        let [b, c, _, _] = h.dims();
        // [b, c] -> [b, c, 1, 1], broadcast over the pixels
        let h = h + linear(&self.emb_proj, emb).reshape([b, c, 1, 1]);
        let h = conv2d(
            &self.conv2,
            self.dropout.forward(group_norm_silu(&self.norm2, h)),
        );
        let skip = match &self.skip {
            Some(conv) => conv2d(conv, x),
            None => x,
        };
        skip + h
    }
}

/// Attention over the pixels of a feature map: x + SelfAttn(GN(x)) [+ CrossAttn(LN(.), text)],
/// both output projections zero-initialised (ADM `AttentionBlock`; the cross-attention as in the
/// LDM `SpatialTransformer`).
#[derive(Module, Debug)]
pub struct SpatialAttention {
    norm: GroupNorm,
    attn: SelfAttention,
    cross: Option<TextCrossAttention>,
}

impl SpatialAttention {
    pub fn new(
        channels: usize,
        num_heads: usize,
        groups: usize,
        text_dim: Option<usize>,
        device: &Device,
    ) -> Self {
        Self {
            norm: GroupNormConfig::new(groups, channels).init(device),
            attn: SelfAttention::new(channels, num_heads, true, device),
            cross: text_dim.map(|d| TextCrossAttention::new(channels, d, num_heads, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, c, h, w]` -> `[batch, c, h, w]`
    pub fn forward(&self, x: Tensor<4>, text: Option<&TextConditioning>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // [b, c, h, w] -> [b, c, hw] -> [b, hw, c]
        let tokens = group_norm(&self.norm, x.clone(), false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let mut a = self.attn.forward(tokens.clone(), None);
        if let (Some(cross), Some(text)) = (&self.cross, text) {
            a = a.clone() + cross.forward(tokens + a, text);
        }
        // [b, hw, c] -> [b, c, hw] -> [b, c, h, w]
        x + a.swap_dims(1, 2).reshape([b, c, h, w])
    }
}

/// A residual block, then attention where configured.
#[derive(Module, Debug)]
pub struct UNetBlock {
    res: ResBlock,
    attn: Option<SpatialAttention>,
}

impl UNetBlock {
    fn forward(&self, x: Tensor<4>, emb: Tensor<2>, text: Option<&TextConditioning>) -> Tensor<4> {
        let h = self.res.forward(x, emb);
        match &self.attn {
            Some(attn) => attn.forward(h, text),
            None => h,
        }
    }
}

/// One resolution on the way down: blocks, then a stride-2 conv (all but the last level).
#[derive(Module, Debug)]
pub struct DownLevel {
    blocks: Vec<UNetBlock>,
    downsample: Option<Conv2d>,
}

/// The bottleneck: residual block, attention, residual block.
#[derive(Module, Debug)]
pub struct MidBlock {
    res1: ResBlock,
    attn: SpatialAttention,
    res2: ResBlock,
}

/// One resolution on the way up: blocks fed with skips, then nearest 2x + conv (all but the
/// full-resolution level).
#[derive(Module, Debug)]
pub struct UpLevel {
    blocks: Vec<UNetBlock>,
    upsample: Option<Conv2d>,
}

/// The U-Net backbone; build it with [`UNetConfig::init`].
#[derive(Module, Debug)]
pub struct UNet {
    time_embed: TimestepEmbedder,
    label_embed: Option<LabelEmbedder>,
    text_proj: Option<Linear>,
    conv_in: Conv2d,
    down: Vec<DownLevel>,
    mid: MidBlock,
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// The conditioning vector: emb(t) + emb(class) + proj(pooled text).
    ///
    /// A missing class on a class-conditional model means the null class; missing text skips the
    /// text terms.
    fn embed(&self, t: Tensor<1>, cond: &Conditioning) -> Tensor<2> {
        let [b] = t.dims();
        let device = t.device();
        let mut emb = self.time_embed.forward(t);
        if let Some(labels) = &self.label_embed {
            let class = cond
                .class
                .clone()
                .unwrap_or_else(|| Tensor::full([b], labels.null_class() as i64, &device));
            emb = emb + labels.forward(class);
        } else {
            assert!(
                cond.class.is_none(),
                "class labels given to a U-Net built without classes"
            );
        }
        match (&self.text_proj, &cond.text) {
            (Some(proj), Some(text)) => emb + linear(proj, text.pooled.clone()),
            (None, Some(_)) => panic!("text conditioning given to a U-Net built without text"),
            _ => emb,
        }
    }
}

impl Backbone for UNet {
    /// # Shapes
    /// - `z_t`: `[batch, latent_channels, h, w]` -> same
    /// - `t`: `[batch]`
    fn forward(&self, z_t: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
        let emb = silu(self.embed(t, cond));
        let text = cond.text.as_ref();

        let mut h = conv2d(&self.conv_in, z_t);
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(h, emb.clone(), text);
                skips.push(h.clone());
            }
            if let Some(down) = &level.downsample {
                h = conv2d(down, h);
                skips.push(h.clone());
            }
        }

        h = self.mid.res1.forward(h, emb.clone());
        h = self.mid.attn.forward(h, text);
        h = self.mid.res2.forward(h, emb.clone());

        for level in &self.up {
            for block in &level.blocks {
                let skip = skips.pop().expect("one skip per up block");
                // [b, c, h, w] ++ [b, c_skip, h, w] -> [b, c + c_skip, h, w]
                h = block.forward(Tensor::cat(vec![h, skip], 1), emb.clone(), text);
            }
            if let Some(up) = &level.upsample {
                h = conv2d(up, upsample_nearest2x(h));
            }
        }
        conv2d(&self.conv_out, group_norm_silu(&self.norm_out, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::test_util::{check_gradient, weighted_sum};
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    #[test]
    fn group_norm_gradient() {
        let device = Device::flex().autodiff();
        device.seed(21);
        let mut gn = GroupNormConfig::new(2, 4).init(&device);
        gn.gamma = Some(Param::from_tensor(randn(
            &mut stream(21, "g", 0),
            [4],
            &device,
        )));
        let x = randn(&mut stream(21, "x", 0), [2, 4, 3, 3], &device);
        let w = randn(&mut stream(21, "w", 0), [2, 4, 3, 3], &device);
        check_gradient("d/dx", |x| weighted_sum(gn.forward(x), &w), x.clone(), 1e-2);
        let gamma_loss = |g: Tensor<1>| {
            let mut n = gn.clone();
            n.gamma = Some(Param::from_tensor(g));
            weighted_sum(n.forward(x.clone()), &w)
        };
        check_gradient(
            "d/dgamma",
            gamma_loss,
            gn.gamma.as_ref().unwrap().val(),
            1e-2,
        );
    }

    #[test]
    fn strided_conv_gradient() {
        let device = Device::flex().autodiff();
        device.seed(22);
        let conv = conv3x3(2, 3, 2, &device);
        let x = randn(&mut stream(22, "x", 0), [2, 2, 4, 4], &device);
        let w = randn(&mut stream(22, "w", 0), [2, 3, 2, 2], &device);
        check_gradient(
            "d/dx",
            |x| weighted_sum(conv.forward(x), &w),
            x.clone(),
            1e-2,
        );
        let weight_loss = |k: Tensor<4>| {
            let mut c = conv.clone();
            c.weight = Param::from_tensor(k);
            weighted_sum(c.forward(x.clone()), &w)
        };
        check_gradient("d/dkernel", weight_loss, conv.weight.val(), 1e-2);
    }

    #[test]
    fn upsample_conv_gradient() {
        let device = Device::flex().autodiff();
        device.seed(23);
        let conv = conv3x3(2, 2, 1, &device);
        let x = randn(&mut stream(23, "x", 0), [2, 2, 2, 3], &device);
        let w = randn(&mut stream(23, "w", 0), [2, 2, 4, 6], &device);
        let loss = |x: Tensor<4>, c: &Conv2d| weighted_sum(c.forward(upsample_nearest2x(x)), &w);
        check_gradient("d/dx", |x| loss(x, &conv), x.clone(), 1e-2);
        let weight_loss = |k: Tensor<4>| {
            let mut c = conv.clone();
            c.weight = Param::from_tensor(k);
            loss(x.clone(), &c)
        };
        check_gradient("d/dkernel", weight_loss, conv.weight.val(), 1e-2);
    }

    #[test]
    fn upsample_repeats_each_pixel() {
        let device = Device::flex();
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device);
        let up = to_vec_f32(upsample_nearest2x(x));
        let expected = [
            1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.,
        ];
        assert_eq!(up, expected);
    }

    #[test]
    fn layer_norm_gradient() {
        let device = Device::flex().autodiff();
        device.seed(24);
        let mut ln = LayerNormConfig::new(5).init(&device);
        ln.gamma = Param::from_tensor(randn(&mut stream(24, "g", 0), [5], &device));
        let x = randn(&mut stream(24, "x", 0), [2, 3, 5], &device);
        let w = randn(&mut stream(24, "w", 0), [2, 3, 5], &device);
        check_gradient("d/dx", |x| weighted_sum(ln.forward(x), &w), x.clone(), 1e-2);
        let gamma_loss = |g: Tensor<1>| {
            let mut n = ln.clone();
            n.gamma = Param::from_tensor(g);
            weighted_sum(n.forward(x.clone()), &w)
        };
        check_gradient("d/dgamma", gamma_loss, ln.gamma.val(), 1e-2);
    }
}
