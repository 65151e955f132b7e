//! The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
//! Transformers"): patchify, DiT blocks with adaLN-Zero conditioning, a zero-initialised final
//! layer, unpatchify. Text conditioning adds a cross-attention to the text tokens inside each
//! block, as in PixArt-alpha (Chen et al. 2023).

use std::fmt;

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use ldm_common::activation::silu;
use ldm_common::layers::layer_norm;
use ldm_common::linear::linear;
use ldm_common::precision::to_dtype;
use serde::{Deserialize, Serialize};

use crate::attention::{Mlp, SelfAttention, TextCrossAttention, zero_linear};
use crate::backbone::ConditioningSpec;
use crate::denoiser::{Backbone, Conditioning, TextConditioning};
use crate::embedding::{LabelEmbedder, TimestepEmbedder};
use crate::error::{DiffusionError, Result};
use ldm_common::gemm_conv::conv2d;

/// Sinusoids fed to the timestep MLP (DiT's `frequency_embedding_size`).
pub(crate) const FREQUENCY_DIM: usize = 256;

/// Epsilon of the parameter-free LayerNorms (DiT).
const NORM_EPS: f64 = 1e-6;

/// How patches learn where they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbed {
    /// Fixed 2-D sine-cosine embedding (DiT, after MAE): not trained.
    Sincos,
    /// A trained table, one vector per patch position, N(0, 0.02^2) at init.
    Learned,
}

/// The nonlinearity of the blocks' MLP. TOML: `"gelu"` (exact, x Phi(x); the default, and
/// what runs saved before this key existed were trained with) or `"gelu-tanh"` (the tanh
/// approximation the DiT paper's code uses, [`crate::attention::gelu_tanh`]). On burn-flex the
/// exact form is a scalar erf per element whose slow branch (|x| > 1.77) grows with training:
/// the README's recipe trained 30% slower with it by step 2000.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MlpActivation {
    #[default]
    Gelu,
    GeluTanh,
}

/// A named DiT size: the paper's `S`, `B`, `L`, `XL` and two smaller ones for tiny latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiTSize {
    pub name: &'static str,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
}

/// The sizes a `preset = "DiT-<size>/<patch>"` can name (Table 1 of the paper, plus `T` and `M`).
#[rustfmt::skip]
pub const DIT_SIZES: [DiTSize; 6] = [
    // ours ("tiny"): 1.3M parameters at patch 2 on 4 latent channels, for smoke runs on a CPU
    DiTSize { name: "T", hidden_size: 128, depth: 4, num_heads: 2 },
    // ours ("mini"): 2.8M parameters, about the default U-Net's count
    DiTSize { name: "M", hidden_size: 192, depth: 4, num_heads: 3 },
    DiTSize { name: "S", hidden_size: 384, depth: 12, num_heads: 6 },
    DiTSize { name: "B", hidden_size: 768, depth: 12, num_heads: 12 },
    DiTSize { name: "L", hidden_size: 1024, depth: 24, num_heads: 16 },
    DiTSize { name: "XL", hidden_size: 1152, depth: 28, num_heads: 16 },
];

/// The `[backbone]` section with `kind = "dit"`.
///
/// `preset = "DiT-S/2"` fills `hidden_size`, `depth`, `num_heads` and `patch_size` from
/// [`DIT_SIZES`]; keys given next to it override the preset. The resolved config (saved with a
/// run) lists every field and no preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DiTConfigFile")]
pub struct DiTConfig {
    /// Side of the square patches; must divide the latent side.
    pub patch_size: usize,
    /// Width of the tokens.
    pub hidden_size: usize,
    /// Number of DiT blocks.
    pub depth: usize,
    /// Attention heads; must divide `hidden_size`.
    pub num_heads: usize,
    /// MLP width / `hidden_size`.
    pub mlp_ratio: f64,
    pub pos_embed: PosEmbed,
    pub activation: MlpActivation,
}

impl Default for DiTConfig {
    /// `DiT-M/2` with sine-cosine positions.
    fn default() -> Self {
        Self::preset("DiT-M/2").expect("a listed preset")
    }
}

impl DiTConfig {
    /// The config of a named preset `DiT-<size>/<patch>`, e.g. `DiT-S/2`; sizes in [`DIT_SIZES`].
    pub fn preset(name: &str) -> Result<Self> {
        let bad = || DiffusionError::InvalidConfig {
            key: "dit.preset".into(),
            value: format!("\"{name}\""),
            expected: format!(
                "expected DiT-<size>/<patch> with size one of {} and patch a positive integer, e.g. \"DiT-S/2\"",
                DIT_SIZES.map(|s| s.name).join(", ")
            ),
        };
        let (size, patch) = name
            .strip_prefix("DiT-")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(bad)?;
        let size = DIT_SIZES.iter().find(|s| s.name == size).ok_or_else(bad)?;
        let patch_size = patch.parse().ok().filter(|&p| p > 0).ok_or_else(bad)?;
        Ok(Self {
            patch_size,
            hidden_size: size.hidden_size,
            depth: size.depth,
            num_heads: size.num_heads,
            mlp_ratio: 4.0,
            pos_embed: PosEmbed::Sincos,
            activation: MlpActivation::Gelu,
        })
    }

    pub(crate) fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio).round() as usize
    }

    /// Checks the config against a `latent_size x latent_size` latent.
    pub fn validate(&self, latent_size: usize) -> Result<()> {
        let invalid = |key: &str, value: &dyn fmt::Display, expected: String| {
            Err(DiffusionError::InvalidConfig {
                key: format!("dit.{key}"),
                value: value.to_string(),
                expected,
            })
        };
        let p = self.patch_size;
        if p == 0 || !latent_size.is_multiple_of(p) {
            return invalid(
                "patch_size",
                &p,
                format!("does not divide the {latent_size}x{latent_size} latent"),
            );
        }
        if self.depth == 0 {
            return invalid("depth", &0, "must be at least 1".into());
        }
        if self.num_heads == 0
            || self.hidden_size == 0
            || !self.hidden_size.is_multiple_of(self.num_heads)
        {
            return invalid(
                "num_heads",
                &self.num_heads,
                format!("must divide hidden_size = {}", self.hidden_size),
            );
        }
        if self.pos_embed == PosEmbed::Sincos && !self.hidden_size.is_multiple_of(4) {
            return invalid(
                "hidden_size",
                &self.hidden_size,
                "must be a multiple of 4 for pos_embed = \"sincos\"".into(),
            );
        }
        if !(self.mlp_ratio > 0.0 && self.mlp_hidden() > 0) {
            return invalid("mlp_ratio", &self.mlp_ratio, "must be positive".into());
        }
        Ok(())
    }

    /// Builds the DiT; `self` must have passed [`validate`](Self::validate).
    pub fn init(
        &self,
        latent_channels: usize,
        latent_size: usize,
        cond: &ConditioningSpec,
        device: &Device,
    ) -> DiT {
        let d = self.hidden_size;
        let p = self.patch_size;
        let grid = latent_size / p;
        let pos_embed = match self.pos_embed {
            PosEmbed::Sincos => {
                Param::from_tensor(sincos_2d(d, grid, device)).set_require_grad(false)
            }
            PosEmbed::Learned => Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, grid * grid, d], device),
        };
        DiT {
            x_embedder: Conv2dConfig::new([latent_channels, d], [p, p])
                .with_stride([p, p])
                .init(device),
            pos_embed,
            t_embedder: TimestepEmbedder::new(FREQUENCY_DIM, d, device),
            y_embedder: cond.num_classes.map(|n| LabelEmbedder::new(n, d, device)),
            text_proj: cond
                .text_dim
                .map(|td| LinearConfig::new(td, d).init(device)),
            blocks: (0..self.depth)
                .map(|_| {
                    DiTBlock::new(
                        d,
                        self.num_heads,
                        self.mlp_hidden(),
                        self.activation,
                        cond.text_dim,
                        device,
                    )
                })
                .collect(),
            final_layer: FinalLayer::new(d, p, latent_channels, device),
            patch_size: p,
            latent_channels,
        }
    }
}

/// The TOML form of [`DiTConfig`]: an optional preset and overrides.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiTConfigFile {
    preset: Option<String>,
    patch_size: Option<usize>,
    hidden_size: Option<usize>,
    depth: Option<usize>,
    num_heads: Option<usize>,
    mlp_ratio: Option<f64>,
    pos_embed: Option<PosEmbed>,
    activation: Option<MlpActivation>,
}

impl TryFrom<DiTConfigFile> for DiTConfig {
    type Error = DiffusionError;

    fn try_from(f: DiTConfigFile) -> Result<Self> {
        let base = match &f.preset {
            Some(name) => Self::preset(name)?,
            None => Self::default(),
        };
        Ok(Self {
            patch_size: f.patch_size.unwrap_or(base.patch_size),
            hidden_size: f.hidden_size.unwrap_or(base.hidden_size),
            depth: f.depth.unwrap_or(base.depth),
            num_heads: f.num_heads.unwrap_or(base.num_heads),
            mlp_ratio: f.mlp_ratio.unwrap_or(base.mlp_ratio),
            pos_embed: f.pos_embed.unwrap_or(base.pos_embed),
            activation: f.activation.unwrap_or(base.activation),
        })
    }
}

/// The fixed 2-D sine-cosine position embedding of MAE / DiT: the first half of the features
/// encodes the patch column, the second half its row, each as [sin(pos w_k), cos(pos w_k)] with
/// w_k = 10000^(-k / (dim/4)).
///
/// # Shapes
/// - output: `[1, grid * grid, dim]`, patches in row-major order
pub fn sincos_2d(dim: usize, grid: usize, device: &Device) -> Tensor<3> {
    let quarter = dim / 4;
    let mut values = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for col in 0..grid {
            for pos in [col, row] {
                let angles =
                    (0..quarter).map(|k| pos as f64 * 10_000f64.powf(-(k as f64) / quarter as f64));
                values.extend(angles.clone().map(|a| a.sin() as f32));
                values.extend(angles.map(|a| a.cos() as f32));
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [1, grid * grid, dim]), device)
}

/// x * (1 + scale) + shift, per sample (DiT `modulate`).
///
/// # Shapes
/// - `x`: `[batch, tokens, dim]`; `shift`, `scale`: `[batch, dim]`
pub fn modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    // [b, d] -> [b, 1, d], broadcast over the tokens
    x * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim(1)
}

/// LayerNorm without a learned affine (DiT: the adaLN modulation supplies it).
///
/// # Shapes
/// - `x`: `[batch, tokens, dim]` -> same
fn plain_layer_norm(x: Tensor<3>) -> Tensor<3> {
    let [_, _, d] = x.dims();
    let ones = to_dtype(Tensor::ones([d], &x.device()), x.dtype());
    layer_norm(x, ones, None, NORM_EPS)
}

/// A transformer block conditioned by adaLN-Zero: six vectors regressed from c shift, scale and
/// gate the attention and MLP branches; the regression starts at zero, so the block starts as
/// the identity. With text, a pre-LN cross-attention (zero-initialised output) sits between the
/// two branches.
#[derive(Module, Debug)]
pub struct DiTBlock {
    attn: SelfAttention,
    cross: Option<TextCrossAttention>,
    mlp: Mlp,
    ada_ln: Linear,
}

impl DiTBlock {
    pub fn new(
        dim: usize,
        num_heads: usize,
        mlp_hidden: usize,
        activation: MlpActivation,
        text_dim: Option<usize>,
        device: &Device,
    ) -> Self {
        Self {
            attn: SelfAttention::new(dim, num_heads, false, device),
            cross: text_dim.map(|td| TextCrossAttention::new(dim, td, num_heads, device)),
            mlp: Mlp::new(
                dim,
                mlp_hidden,
                activation == MlpActivation::GeluTanh,
                device,
            ),
            ada_ln: zero_linear(dim, 6 * dim, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> same
    /// - `c`: `[batch, dim]`, already through SiLU
    pub fn forward(
        &self,
        x: Tensor<3>,
        c: Tensor<2>,
        text: Option<&TextConditioning>,
    ) -> Tensor<3> {
        // [b, 6d] -> 6 x [b, d]
        let mut m = linear(&self.ada_ln, c).chunk(6, 1).into_iter();
        let mut next = || m.next().expect("six chunks");
        let (shift_msa, scale_msa, gate_msa) = (next(), next(), next());
        let (shift_mlp, scale_mlp, gate_mlp) = (next(), next(), next());
        let h = modulate(plain_layer_norm(x.clone()), shift_msa, scale_msa);
        let x = x + gate_msa.unsqueeze_dim(1) * self.attn.forward(h, None);
        let x = match (&self.cross, text) {
            (Some(cross), Some(text)) => x.clone() + cross.forward(x, text),
            _ => x,
        };
        let h = modulate(plain_layer_norm(x.clone()), shift_mlp, scale_mlp);
        x + gate_mlp.unsqueeze_dim(1) * self.mlp.forward(h)
    }
}

/// adaLN, then a Linear to p*p*channels per token, both zero-initialised (DiT `FinalLayer`).
#[derive(Module, Debug)]
pub struct FinalLayer {
    ada_ln: Linear,
    linear: Linear,
}

impl FinalLayer {
    pub fn new(dim: usize, patch_size: usize, out_channels: usize, device: &Device) -> Self {
        Self {
            ada_ln: zero_linear(dim, 2 * dim, device),
            linear: zero_linear(dim, patch_size * patch_size * out_channels, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> `[batch, tokens, p * p * out_channels]`
    /// - `c`: `[batch, dim]`, already through SiLU
    pub fn forward(&self, x: Tensor<3>, c: Tensor<2>) -> Tensor<3> {
        // [b, 2d] -> 2 x [b, d]
        let m = linear(&self.ada_ln, c).chunk(2, 1);
        let [shift, scale] = <[Tensor<2>; 2]>::try_from(m).expect("two chunks");
        linear(&self.linear, modulate(plain_layer_norm(x), shift, scale))
    }
}

/// The DiT backbone; build it with [`DiTConfig::init`].
#[derive(Module, Debug)]
pub struct DiT {
    x_embedder: Conv2d,
    /// `[1, tokens, hidden]`; frozen for sine-cosine positions.
    pos_embed: Param<Tensor<3>>,
    t_embedder: TimestepEmbedder,
    y_embedder: Option<LabelEmbedder>,
    text_proj: Option<Linear>,
    blocks: Vec<DiTBlock>,
    final_layer: FinalLayer,
    patch_size: usize,
    latent_channels: usize,
}

impl DiT {
    /// c = emb(t) + emb(class) + proj(pooled text). A missing class on a class-conditional model
    /// means the null class; missing text skips the text terms.
    fn embed(&self, t: Tensor<1>, cond: &Conditioning) -> Tensor<2> {
        let [b] = t.dims();
        let device = t.device();
        let mut c = self.t_embedder.forward(t);
        if let Some(labels) = &self.y_embedder {
            let class = cond
                .class
                .clone()
                .unwrap_or_else(|| Tensor::full([b], labels.null_class() as i64, &device));
            c = c + labels.forward(class);
        } else {
            assert!(
                cond.class.is_none(),
                "class labels given to a DiT built without classes"
            );
        }
        match (&self.text_proj, &cond.text) {
            (Some(proj), Some(text)) => c + linear(proj, text.pooled.clone()),
            (None, Some(_)) => panic!("text conditioning given to a DiT built without text"),
            _ => c,
        }
    }
}

impl Backbone for DiT {
    /// # Shapes
    /// - `z_t`: `[batch, latent_channels, h, w]` -> same
    /// - `t`: `[batch]`
    fn forward(&self, z_t: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
        let [b, _, h, w] = z_t.dims();
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let x = conv2d(&self.x_embedder, z_t);
        let [_, d, _, _] = x.dims();
        // [b, d, gh, gw] -> [b, d, gh*gw] -> [b, tokens, d]
        let x = x.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let mut x = x + self.pos_embed.val();

        let c = silu(self.embed(t, cond));
        let text = cond.text.as_ref();
        for block in &self.blocks {
            x = block.forward(x, c.clone(), text);
        }
        let x = self.final_layer.forward(x, c);

        let ch = self.latent_channels;
        // [b, gh*gw, p*p*ch] -> [b, gh, gw, p, p, ch] -> [b, ch, gh, p, gw, p] -> [b, ch, h, w]
        x.reshape([b, gh, gw, p, p, ch])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, ch, h, w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::test_util::{check_gradient, weighted_sum};
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    #[test]
    fn presets_parse_and_reject_unknown_names() {
        let s = DiTConfig::preset("DiT-S/2").unwrap();
        assert_eq!(
            (s.hidden_size, s.depth, s.num_heads, s.patch_size),
            (384, 12, 6, 2)
        );
        let xl = DiTConfig::preset("DiT-XL/8").unwrap();
        assert_eq!((xl.hidden_size, xl.patch_size), (1152, 8));
        for bad in ["DiT-Q/2", "DiT-S", "S/2", "DiT-S/0"] {
            let err = DiTConfig::preset(bad).unwrap_err().to_string();
            assert!(
                err.contains("dit.preset") && err.contains("T, M, S, B, L, XL"),
                "{err}"
            );
        }
    }

    #[test]
    fn sincos_rows_and_columns() {
        let device = Device::flex();
        let pe = to_vec_f32(sincos_2d(8, 3, &device));
        // patch (row 1, col 2): first half from col = 2, second half from row = 1
        let at = |patch: usize, k: usize| pe[patch * 8 + k];
        let patch = 3 + 2;
        assert!((at(patch, 0) - 2f32.sin()).abs() < 1e-6);
        assert!((at(patch, 1) - (2.0f32 * 0.01).sin()).abs() < 1e-6);
        assert!((at(patch, 2) - 2f32.cos()).abs() < 1e-6);
        assert!((at(patch, 4) - 1f32.sin()).abs() < 1e-6);
        assert!((at(patch, 6) - 1f32.cos()).abs() < 1e-6);
    }

    /// The adaLN modulation: gradients through modulate(LN(x)), gate and the regression of the
    /// six vectors from c, for x, c and the regression weight (made non-zero first).
    #[test]
    fn ada_ln_modulation_gradient() {
        let device = Device::flex().autodiff();
        device.seed(31);
        let mut block = DiTBlock::new(4, 2, 8, MlpActivation::GeluTanh, None, &device);
        block.ada_ln = LinearConfig::new(4, 24).init(&device);
        let x = randn(&mut stream(31, "x", 0), [2, 3, 4], &device);
        let c = randn(&mut stream(31, "c", 0), [2, 4], &device);
        let w = randn(&mut stream(31, "w", 0), [2, 3, 4], &device);
        let loss =
            |x: Tensor<3>, c: Tensor<2>, blk: &DiTBlock| weighted_sum(blk.forward(x, c, None), &w);
        check_gradient("d/dx", |x| loss(x, c.clone(), &block), x.clone(), 1e-2);
        check_gradient("d/dc", |c| loss(x.clone(), c, &block), c.clone(), 1e-2);
        let weight_loss = |wt: Tensor<2>| {
            let mut blk = block.clone();
            blk.ada_ln.weight = Param::from_tensor(wt);
            loss(x.clone(), c.clone(), &blk)
        };
        check_gradient("d/dW_adaLN", weight_loss, block.ada_ln.weight.val(), 1e-2);
    }

    #[test]
    fn plain_layer_norm_normalises_the_last_axis() {
        let device = Device::flex();
        let x = randn(&mut stream(32, "x", 0), [2, 3, 16], &device) * 3.0 + 1.0;
        let y = to_vec_f32(plain_layer_norm(x));
        for row in y.chunks(16) {
            let mean = row.iter().sum::<f32>() / 16.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
                "{mean} {var}"
            );
        }
    }

    /// Sine-cosine positions get no gradient (the optimizer leaves them alone); learned ones do.
    #[test]
    fn only_learned_positions_train() {
        let device = Device::flex().autodiff();
        device.seed(33);
        for (pos, trains) in [(PosEmbed::Sincos, false), (PosEmbed::Learned, true)] {
            let config = DiTConfig {
                pos_embed: pos,
                ..DiTConfig::preset("DiT-T/4").unwrap()
            };
            let dit = config.init(2, 8, &ConditioningSpec::default(), &device);
            let z = randn(&mut stream(33, "z", 0), [1, 2, 8, 8], &device);
            let t = Tensor::<1>::from_floats([5.0], &device);
            let loss = dit.forward(z, t, &Conditioning::none()).sum();
            let grads = loss.backward();
            assert_eq!(
                dit.pos_embed.val().grad(&grads).is_some(),
                trains,
                "{pos:?}"
            );
        }
    }
}
