//! Multi-head scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need"):
//! self-attention over image or text tokens, and cross-attention from image tokens to text
//! tokens (Rombach et al. 2022), plus the position-wise MLP of a transformer block.
//!
//! The product itself is [`ldm_common::layers::attention`]: on burn-flex (f32) this project's
//! own operation with its own backward (`ldm_common::attention`, checked against burn's
//! `attention` and against finite differences), on burn-tch libtorch's
//! `scaled_dot_product_attention` with torch's own backward, elsewhere burn's `attention`.
//! Self-attention hands the fused q/k/v projection to [`ldm_common::layers::self_attention`],
//! which on burn-flex attends from that layout directly and returns its gradient in it.

use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Bool;
use burn::tensor::activation::gelu;
use ldm_common::layers::{attention, self_attention};
use ldm_common::linear::linear;

use crate::denoiser::TextConditioning;

/// A Linear whose weight and bias start at zero, so a residual branch ending in it starts as
/// the identity (ADM's `zero_module`, DiT's adaLN-Zero).
pub fn zero_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// Multi-head self-attention with one fused q/k/v projection.
#[derive(Module, Debug)]
pub struct SelfAttention {
    qkv: Linear,
    out: Linear,
    num_heads: usize,
}

impl SelfAttention {
    /// `dim` must be a multiple of `num_heads`; `zero_out` zero-initialises the output
    /// projection.
    pub fn new(dim: usize, num_heads: usize, zero_out: bool, device: &Device) -> Self {
        Self {
            qkv: LinearConfig::new(dim, 3 * dim).init(device),
            out: if zero_out {
                zero_linear(dim, dim, device)
            } else {
                LinearConfig::new(dim, dim).init(device)
            },
            num_heads,
        }
    }

    /// softmax(Q K^T / sqrt(d_head)) V per head, keys where `padding_mask` is true ignored.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    /// - `padding_mask`: `[batch, tokens]`, true = padding
    pub fn forward(&self, x: Tensor<3>, padding_mask: Option<Tensor<2, Bool>>) -> Tensor<3> {
        let qkv = linear(&self.qkv, x);
        linear(&self.out, self_attention(qkv, self.num_heads, padding_mask))
    }
}

/// Multi-head cross-attention: queries from `x`, keys and values from a `context` of another
/// width (text tokens).
#[derive(Module, Debug)]
pub struct CrossAttention {
    q: Linear,
    kv: Linear,
    out: Linear,
    num_heads: usize,
}

impl CrossAttention {
    /// `dim` (the queries' width) must be a multiple of `num_heads`; `zero_out` zero-initialises
    /// the output projection.
    pub fn new(
        dim: usize,
        context_dim: usize,
        num_heads: usize,
        zero_out: bool,
        device: &Device,
    ) -> Self {
        Self {
            q: LinearConfig::new(dim, dim).init(device),
            kv: LinearConfig::new(context_dim, 2 * dim).init(device),
            out: if zero_out {
                zero_linear(dim, dim, device)
            } else {
                LinearConfig::new(dim, dim).init(device)
            },
            num_heads,
        }
    }

    /// Each query token attends to the context tokens; where `padding_mask` is true a context
    /// token is ignored (a fully padded row attends to nothing and yields the output bias).
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    /// - `context`: `[batch, context_tokens, context_dim]`
    /// - `padding_mask`: `[batch, context_tokens]`, true = padding
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
        padding_mask: Option<Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let [_, l, _] = context.dims();
        let h = self.num_heads;
        // [b, n, d] -> [b, n, h, d/h] -> [b, h, n, d/h]
        let q = linear(&self.q, x).reshape([b, n, h, d / h]).swap_dims(1, 2);
        // [b, l, 2d] -> [b, l, 2h, d/h] -> [b, 2h, l, d/h]
        let kv = linear(&self.kv, context)
            .reshape([b, l, 2 * h, d / h])
            .swap_dims(1, 2);
        let k = kv.clone().narrow(1, 0, h);
        let v = kv.narrow(1, h, h);
        linear(&self.out, merge_heads(attention(q, k, v, padding_mask)))
    }
}

/// Pre-LayerNorm cross-attention to text tokens.
#[derive(Module, Debug)]
pub struct TextCrossAttention {
    norm: LayerNorm,
    attn: CrossAttention,
}

impl TextCrossAttention {
    pub fn new(dim: usize, text_dim: usize, num_heads: usize, device: &Device) -> Self {
        Self {
            norm: LayerNormConfig::new(dim).init(device),
            attn: CrossAttention::new(dim, text_dim, num_heads, true, device),
        }
    }

    /// CrossAttn(LN(x), text tokens), padding tokens ignored.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    pub fn forward(&self, x: Tensor<3>, text: &TextConditioning) -> Tensor<3> {
        self.attn.forward(
            self.norm.forward(x),
            text.tokens.clone(),
            text.padding_mask.clone(),
        )
    }
}

/// Heads back into the feature axis.
///
/// # Shapes
/// - `x`: `[batch, heads, tokens, d_head]` -> `[batch, tokens, heads * d_head]`
fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, dh] = x.dims();
    // [b, h, n, dh] -> [b, n, h, dh] -> [b, n, h * dh]
    x.swap_dims(1, 2).reshape([b, n, h * dh])
}

pub use ldm_common::activation::gelu_tanh;

/// The position-wise feed-forward of a transformer block: Linear -> GELU -> Linear, the GELU
/// exact or its tanh approximation ([`gelu_tanh`]).
#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    gelu_tanh: bool,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, gelu_tanh: bool, device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(dim, hidden).init(device),
            fc2: LinearConfig::new(hidden, dim).init(device),
            gelu_tanh,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = linear(&self.fc1, x);
        let h = if self.gelu_tanh {
            gelu_tanh(h)
        } else {
            gelu(h)
        };
        linear(&self.fc2, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::test_util::{check_gradient, weighted_sum};
    use burn::module::Param;
    use burn::tensor::TensorData;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    #[test]
    fn gelu_tanh_matches_the_tanh_formula_and_stays_near_exact_gelu() {
        let device = Device::flex();
        let xs = [-6.0f32, -3.0, -1.5, -0.3, 0.0, 0.7, 1.8, 4.0];
        let out = to_vec_f32(gelu_tanh(Tensor::<1>::from_floats(xs, &device)));
        let exact = to_vec_f32(gelu(Tensor::<1>::from_floats(xs, &device)));
        for ((&x, &y), &e) in xs.iter().zip(&out).zip(&exact) {
            let x = f64::from(x);
            let tanh_form = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (f64::from(y) - tanh_form).abs() < 1e-6,
                "x {x}: {y} vs {tanh_form}"
            );
            assert!((y - e).abs() < 5e-4, "x {x}: {y} vs exact {e}");
        }
    }

    #[test]
    fn gelu_tanh_backward_matches_finite_differences() {
        let device = Device::flex().autodiff();
        let x = randn(&mut stream(41, "x", 0), [2, 3, 4], &device) * 2.0;
        let w = randn(&mut stream(41, "w", 0), [2, 3, 4], &device);
        check_gradient("d/dx", |x| weighted_sum(gelu_tanh(x), &w), x, 1e-2);
        let mlp = Mlp::new(4, 8, true, &device);
        let x = randn(&mut stream(42, "x", 0), [2, 3, 4], &device);
        check_gradient("mlp d/dx", |x| weighted_sum(mlp.forward(x), &w), x, 1e-2);
    }

    fn mask(rows: &[&[bool]], device: &Device) -> Tensor<2, Bool> {
        let l = rows[0].len();
        let flat: Vec<bool> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_bool(TensorData::new(flat, [rows.len(), l]), device)
    }

    /// Against a direct per-head softmax computed on the host, for the fused kernel (plain
    /// device) and for its autodiff decomposition.
    #[test]
    fn self_attention_matches_a_host_reference() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            device.seed(1);
            let (b, n, d, h) = (2, 3, 4, 2);
            let attn = SelfAttention::new(d, h, false, &device);
            let x = randn(&mut stream(1, "x", 0), [b, n, d], &device);
            let pad = mask(&[&[false, false, true], &[false, false, false]], &device);
            let out = to_vec_f32(attn.forward(x.clone(), Some(pad)));

            let qkv = to_vec_f32(attn.qkv.forward(x));
            let dh = d / h;
            let mut ctx = vec![0f32; b * n * d];
            for bi in 0..b {
                for hi in 0..h {
                    for i in 0..n {
                        let at = |t: usize, part: usize, c: usize| {
                            qkv[(bi * n + t) * 3 * d + part * d + hi * dh + c]
                        };
                        let keys: Vec<usize> = (0..n).filter(|&j| !(bi == 0 && j == 2)).collect();
                        let s: Vec<f32> = keys
                            .iter()
                            .map(|&j| {
                                (0..dh).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f32>()
                                    / (dh as f32).sqrt()
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f32::MIN, f32::max);
                        let z: f32 = s.iter().map(|v| (v - m).exp()).sum();
                        for c in 0..dh {
                            ctx[(bi * n + i) * d + hi * dh + c] = keys
                                .iter()
                                .zip(&s)
                                .map(|(&j, v)| (v - m).exp() / z * at(j, 2, c))
                                .sum();
                        }
                    }
                }
            }
            let ctx = Tensor::<3>::from_data(TensorData::new(ctx, [b, n, d]), &device);
            let reference = to_vec_f32(attn.out.forward(ctx));
            for (a, r) in out.iter().zip(&reference) {
                assert!((a - r).abs() < 1e-5, "{a} vs {r}");
            }
        }
    }

    /// A prompt that is all padding attends to nothing: the output is the output bias, and the
    /// gradient stays finite (no 0/0 in the masked softmax).
    #[test]
    fn fully_padded_context_gives_the_output_bias() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            device.seed(5);
            let attn = CrossAttention::new(4, 6, 2, false, &device);
            let x = randn(&mut stream(5, "x", 0), [1, 3, 4], &device);
            let x = if device.is_autodiff() {
                x.require_grad()
            } else {
                x
            };
            let ctx = randn(&mut stream(5, "ctx", 0), [1, 2, 6], &device);
            let out = attn.forward(x.clone(), ctx, Some(mask(&[&[true, true]], &device)));
            let bias = to_vec_f32(attn.out.bias.as_ref().unwrap().val());
            let values = to_vec_f32(out.clone());
            for row in values.chunks(4) {
                assert_eq!(row, &bias[..]);
            }
            if device.is_autodiff() {
                let grads = out.sum().backward();
                let g = to_vec_f32(x.grad(&grads).unwrap());
                assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
            }
        }
    }

    #[test]
    fn self_attention_gradient_with_padding_mask() {
        let device = Device::flex().autodiff();
        device.seed(2);
        let attn = SelfAttention::new(4, 2, false, &device);
        let x = randn(&mut stream(2, "x", 0), [2, 3, 4], &device);
        let w = randn(&mut stream(2, "w", 0), [2, 3, 4], &device);
        let pad = mask(&[&[false, true, false], &[false, false, false]], &device);
        let loss =
            |x: Tensor<3>, a: &SelfAttention| weighted_sum(a.forward(x, Some(pad.clone())), &w);
        check_gradient("d/dx", |x| loss(x, &attn), x.clone(), 1e-2);
        let weight_loss = |wt: Tensor<2>| {
            let mut a = attn.clone();
            a.qkv.weight = Param::from_tensor(wt);
            loss(x.clone(), &a)
        };
        check_gradient("d/dW_qkv", weight_loss, attn.qkv.weight.val(), 1e-2);
    }

    #[test]
    fn cross_attention_gradient_with_padding_mask() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let attn = CrossAttention::new(4, 6, 2, false, &device);
        let x = randn(&mut stream(3, "x", 0), [2, 3, 4], &device);
        let ctx = randn(&mut stream(3, "ctx", 0), [2, 5, 6], &device);
        let w = randn(&mut stream(3, "w", 0), [2, 3, 4], &device);
        let pad = mask(
            &[
                &[false, false, true, true, true],
                &[false, false, false, false, true],
            ],
            &device,
        );
        let loss = |x: Tensor<3>, c: Tensor<3>, a: &CrossAttention| {
            weighted_sum(a.forward(x, c, Some(pad.clone())), &w)
        };
        check_gradient("d/dx", |x| loss(x, ctx.clone(), &attn), x.clone(), 1e-2);
        check_gradient(
            "d/dcontext",
            |c| loss(x.clone(), c, &attn),
            ctx.clone(),
            1e-2,
        );
        let weight_loss = |wt: Tensor<2>| {
            let mut a = attn.clone();
            a.kv.weight = Param::from_tensor(wt);
            loss(x.clone(), ctx.clone(), &a)
        };
        check_gradient("d/dW_kv", weight_loss, attn.kv.weight.val(), 1e-2);
    }

    #[test]
    fn padded_context_tokens_are_ignored() {
        let device = Device::flex();
        device.seed(4);
        let attn = CrossAttention::new(4, 6, 2, false, &device);
        let x = randn(&mut stream(4, "x", 0), [1, 3, 4], &device);
        let ctx = randn(&mut stream(4, "ctx", 0), [1, 4, 6], &device);
        let other = randn(&mut stream(4, "other", 0), [1, 4, 6], &device);
        // the last two context tokens are padding: replace them by other values
        let ctx2 = Tensor::cat(vec![ctx.clone().narrow(1, 0, 2), other.narrow(1, 2, 2)], 1);
        let pad = mask(&[&[false, false, true, true]], &device);
        let a = to_vec_f32(attn.forward(x.clone(), ctx, Some(pad.clone())));
        let b = to_vec_f32(attn.forward(x, ctx2, Some(pad)));
        assert_eq!(a, b);
    }
}
