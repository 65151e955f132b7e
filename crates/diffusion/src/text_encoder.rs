//! A small transformer text encoder (Vaswani et al. 2017; pre-LN blocks as in GPT-2), trained
//! jointly with the diffusion model as in the LDM text-to-image experiments (Rombach et al.
//! 2022, which train a transformer `tau_theta` end to end instead of using a frozen CLIP).

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::{Bool, Int};
use ldm_common::precision::to_dtype;
use serde::{Deserialize, Serialize};

use crate::attention::{Mlp, SelfAttention};
use crate::denoiser::TextConditioning;
use crate::error::{DiffusionError, Result};

/// The `[text_encoder]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderConfig {
    /// Number of token ids (the tokenizer's vocabulary, padding id included).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Longest token sequence; the tokenizer truncates to it.
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Width of the token embeddings (the backbone's `text_dim`).
    #[serde(default = "d_dim")]
    pub dim: usize,
    /// Number of transformer blocks.
    #[serde(default = "d_depth")]
    pub depth: usize,
    /// Attention heads; must divide `dim`.
    #[serde(default = "d_heads")]
    pub heads: usize,
}

fn d_vocab() -> usize {
    256
}
fn d_max_len() -> usize {
    32
}
fn d_dim() -> usize {
    128
}
fn d_depth() -> usize {
    2
}
fn d_heads() -> usize {
    4
}

impl Default for TextEncoderConfig {
    fn default() -> Self {
        Self {
            vocab_size: d_vocab(),
            max_len: d_max_len(),
            dim: d_dim(),
            depth: d_depth(),
            heads: d_heads(),
        }
    }
}

impl TextEncoderConfig {
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &str, value: usize, expected: &str| {
            Err(DiffusionError::InvalidConfig {
                key: format!("text_encoder.{key}"),
                value: value.to_string(),
                expected: expected.into(),
            })
        };
        if self.vocab_size == 0 {
            return invalid("vocab_size", 0, "must be positive");
        }
        if self.max_len == 0 {
            return invalid("max_len", 0, "must be positive");
        }
        if self.heads == 0 || self.dim == 0 || !self.dim.is_multiple_of(self.heads) {
            return invalid(
                "heads",
                self.heads,
                &format!("must divide dim = {}", self.dim),
            );
        }
        Ok(())
    }

    /// Builds the encoder; `self` must have passed [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> TextEncoder {
        let normal = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        TextEncoder {
            token_embedding: EmbeddingConfig::new(self.vocab_size, self.dim)
                .with_initializer(normal.clone())
                .init(device),
            position_embedding: normal.init([self.max_len, self.dim], device),
            blocks: (0..self.depth)
                .map(|_| TransformerBlock::new(self.dim, self.heads, device))
                .collect(),
            final_norm: LayerNormConfig::new(self.dim).init(device),
        }
    }
}

/// x + SelfAttn(LN(x)), then x + MLP(LN(x)) (pre-LN), padding keys ignored.
#[derive(Module, Debug)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl TransformerBlock {
    pub fn new(dim: usize, heads: usize, device: &Device) -> Self {
        Self {
            norm1: LayerNormConfig::new(dim).init(device),
            attn: SelfAttention::new(dim, heads, false, device),
            norm2: LayerNormConfig::new(dim).init(device),
            mlp: Mlp::new(dim, 4 * dim, false, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, dim]` -> same; `padding_mask`: `[batch, tokens]`
    pub fn forward(&self, x: Tensor<3>, padding_mask: Tensor<2, Bool>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), Some(padding_mask));
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// Token ids -> per-token embeddings, a pooled embedding and the padding mask: the
/// [`TextConditioning`] a backbone consumes.
#[derive(Module, Debug)]
pub struct TextEncoder {
    token_embedding: Embedding,
    /// `[max_len, dim]`
    position_embedding: Param<Tensor<2>>,
    blocks: Vec<TransformerBlock>,
    final_norm: LayerNorm,
}

impl TextEncoder {
    /// Encodes a batch of token sequences. Padding tokens never influence the outputs at
    /// non-padding positions nor the pooled vector (their own per-token outputs are masked out
    /// by cross-attention); the pooled vector is the mean over non-padding tokens (zero for an
    /// all-padding row).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, len]`, `len <= max_len`
    /// - `padding_mask`: `[batch, len]`, true = padding
    /// - output: tokens `[batch, len, dim]`, pooled `[batch, dim]`, the mask
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        padding_mask: Tensor<2, Bool>,
    ) -> TextConditioning {
        let [b, l] = tokens.dims();
        let [max_len, d] = self.position_embedding.dims();
        assert!(
            l <= max_len,
            "{l} tokens exceed text_encoder.max_len = {max_len}"
        );
        // [max_len, d] -> [l, d] -> [1, l, d], broadcast over the batch
        let pos = self
            .position_embedding
            .val()
            .narrow(0, 0, l)
            .reshape([1, l, d]);
        let mut x = self.token_embedding.forward(tokens) + pos;
        for block in &self.blocks {
            x = block.forward(x, padding_mask.clone());
        }
        let x = self.final_norm.forward(x);

        // [b, l] -> [b, l, 1]: 1 for real tokens, 0 for padding
        let keep = to_dtype(padding_mask.clone().bool_not().float(), x.dtype()).reshape([b, l, 1]);
        let count = keep.clone().sum_dim(1).clamp_min(1.0);
        // [b, 1, d] -> [b, d]
        let pooled = ((x.clone() * keep).sum_dim(1) / count).reshape([b, d]);
        TextConditioning {
            tokens: x,
            pooled,
            padding_mask: Some(padding_mask),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use ldm_common::tensor::to_vec_f32;

    fn batch(
        ids: &[&[i64]],
        pad: &[&[bool]],
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Bool>) {
        let l = ids[0].len();
        let flat: Vec<i64> = ids.iter().flat_map(|r| r.iter().copied()).collect();
        let mask: Vec<bool> = pad.iter().flat_map(|r| r.iter().copied()).collect();
        (
            Tensor::from_ints(TensorData::new(flat, [ids.len(), l]), device),
            Tensor::from_bool(TensorData::new(mask, [ids.len(), l]), device),
        )
    }

    fn small() -> TextEncoderConfig {
        TextEncoderConfig {
            vocab_size: 20,
            max_len: 6,
            dim: 8,
            depth: 2,
            heads: 2,
        }
    }

    #[test]
    fn shapes_and_padding_invariance() {
        let device = Device::flex();
        device.seed(41);
        let enc = small().init(&device);
        let pad = [
            &[false, false, false, true, true][..],
            &[false, false, false, false, false][..],
        ];
        let (a, mask) = batch(&[&[3, 4, 5, 0, 0], &[1, 2, 3, 4, 5]], &pad, &device);
        let (b, _) = batch(&[&[3, 4, 5, 17, 9], &[1, 2, 3, 4, 5]], &pad, &device);
        let ta = enc.forward(a, mask.clone());
        let tb = enc.forward(b, mask);
        assert_eq!(ta.tokens.dims(), [2, 5, 8]);
        assert_eq!(ta.pooled.dims(), [2, 8]);
        assert_eq!(to_vec_f32(ta.pooled), to_vec_f32(tb.pooled));
        let (xa, xb) = (to_vec_f32(ta.tokens), to_vec_f32(tb.tokens));
        // real tokens of row 0 (positions 0..3) and all of row 1 are unchanged
        assert_eq!(&xa[..3 * 8], &xb[..3 * 8]);
        assert_eq!(&xa[5 * 8..], &xb[5 * 8..]);
    }

    #[test]
    fn all_padding_pools_to_zero() {
        let device = Device::flex();
        device.seed(42);
        let enc = small().init(&device);
        let (ids, mask) = batch(&[&[0, 0, 0]], &[&[true, true, true]], &device);
        let out = enc.forward(ids, mask);
        assert!(to_vec_f32(out.pooled).iter().all(|&v| v == 0.0));
        assert!(to_vec_f32(out.tokens).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn invalid_heads_name_the_key() {
        let c = TextEncoderConfig {
            heads: 3,
            ..small()
        };
        let err = c.validate().unwrap_err().to_string();
        assert_eq!(err, "text_encoder.heads = 3: must divide dim = 8");
    }

    /// Through the whole encoder (embeddings, masked self-attention, MLP, LayerNorms, masked
    /// mean pooling), w.r.t. the position table.
    #[test]
    fn gradient_through_the_encoder() {
        use crate::backbone::test_util::{check_gradient, perturb, weighted_sum};
        use ldm_common::rng::{randn, stream};

        let device = Device::flex().autodiff();
        device.seed(43);
        // N(0, 0.02^2) embeddings make LayerNorm's input ~0.03 wide, too narrow for h = 1e-2:
        // widen everything first
        let config = TextEncoderConfig {
            max_len: 3,
            dim: 4,
            depth: 1,
            ..small()
        };
        let enc = perturb(config.init(&device), 0.5, 43);
        let (ids, mask) = batch(
            &[&[3, 4, 0], &[5, 6, 7]],
            &[&[false, false, true], &[false; 3]],
            &device,
        );
        let wt = randn(&mut stream(43, "wt", 0), [2, 3, 4], &device);
        let wp = randn(&mut stream(43, "wp", 0), [2, 4], &device);
        let pos_loss = |pos: Tensor<2>| {
            let mut e = enc.clone();
            e.position_embedding = Param::from_tensor(pos);
            let out = e.forward(ids.clone(), mask.clone());
            weighted_sum(out.tokens, &wt) + weighted_sum(out.pooled, &wp)
        };
        check_gradient("d/dpositions", pos_loss, enc.position_embedding.val(), 1e-2);
    }
}
