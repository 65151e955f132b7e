//! Where networks and samplers meet.
//!
//! A [`Backbone`] is a network (U-Net, DiT) mapping `(z_t, t, cond)` to its raw output, which is
//! epsilon, x0 or v depending on the configured parameterization. A [`Denoiser`] is what every
//! sampler calls: it answers epsilon for a batch at one integer timestep. Wrappers (the
//! parameterization conversion, classifier-free guidance, classifier guidance) are Denoisers
//! built around other Denoisers, so no sampler has a guidance branch.

use burn::tensor::{Bool, Int, Tensor};

/// Text conditioning produced by a text encoder.
#[derive(Clone, Debug)]
pub struct TextConditioning {
    /// Per-token embeddings. Shape `[batch, tokens, dim]`.
    pub tokens: Tensor<3>,
    /// One pooled embedding per prompt, added to the time embedding. Shape `[batch, dim]`.
    pub pooled: Tensor<2>,
    /// `true` where a token is padding and must be ignored by cross-attention. Shape `[batch, tokens]`.
    pub padding_mask: Option<Tensor<2, Bool>>,
}

/// Optional conditioning inputs of a backbone. Both `None` means unconditional.
#[derive(Clone, Debug, Default)]
pub struct Conditioning {
    /// Class ids, shape `[batch]`. The id `num_classes` is the learned null class used for
    /// classifier-free guidance.
    pub class: Option<Tensor<1, Int>>,
    /// Text-token embeddings from the text encoder.
    pub text: Option<TextConditioning>,
}

impl Conditioning {
    /// No conditioning at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Concatenates two conditionings along the batch axis (for one batched CFG forward pass).
    /// Both must carry the same kinds of conditioning.
    pub fn cat(a: &Self, b: &Self) -> Self {
        let class = match (&a.class, &b.class) {
            (Some(x), Some(y)) => Some(Tensor::cat(vec![x.clone(), y.clone()], 0)),
            _ => None,
        };
        let text = match (&a.text, &b.text) {
            (Some(x), Some(y)) => Some(TextConditioning {
                tokens: Tensor::cat(vec![x.tokens.clone(), y.tokens.clone()], 0),
                pooled: Tensor::cat(vec![x.pooled.clone(), y.pooled.clone()], 0),
                padding_mask: match (&x.padding_mask, &y.padding_mask) {
                    (Some(p), Some(q)) => Some(Tensor::cat(vec![p.clone(), q.clone()], 0)),
                    _ => None,
                },
            }),
            _ => None,
        };
        Self { class, text }
    }
}

/// A noise-prediction network: `(z_t, t, cond) -> raw output` in the configured
/// parameterization.
///
/// # Shapes
/// - `z_t`: `[batch, channels, height, width]`
/// - `t`: `[batch]`, timestep indices in `0..T` as floats (fed to the sinusoidal embedding)
/// - output: same shape as `z_t`
pub trait Backbone {
    fn forward(&self, z_t: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Tensor<4>;
}

/// What samplers call: the predicted noise epsilon for a batch `z_t` at timestep index `t`
/// (`0..T`, the same for the whole batch).
///
/// # Shapes
/// - `z_t` and the result: `[batch, channels, height, width]`
pub trait Denoiser {
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4>;
}

impl<F: Fn(Tensor<4>, usize) -> Tensor<4>> Denoiser for F {
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4> {
        self(z_t, t)
    }
}
