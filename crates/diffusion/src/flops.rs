//! Floating-point operations of a DiT forward pass, counted from the config: the numerator of
//! achieved TFLOP/s and of model FLOPs utilisation (MFU, Chowdhery et al. 2022, "PaLM",
//! appendix B).
//!
//! Only matrix products count (the linear layers, the patch embedding, the two products of
//! attention), at 2 FLOPs per multiply-add, as in a device's peak TFLOP/s and in PyTorch's
//! `torch.utils.flop_counter`; norms, activations, softmax and additions are left out (under 1%
//! at DiT sizes). A training step is about 3x the forward pass: the backward computes two
//! products (input and weight gradient) for each product of the forward.

use crate::backbone::ConditioningSpec;
use crate::dit::{DiTConfig, FREQUENCY_DIM};

/// 2 m k n: the FLOPs of an [m, k] x [k, n] product.
fn matmul(m: usize, k: usize, n: usize) -> u64 {
    2 * (m * k * n) as u64
}

impl DiTConfig {
    /// Matrix-product FLOPs of one sample's forward pass on a `latent_channels` x
    /// `latent_size`^2 latent, with `text_tokens` tokens of context for a text-conditional
    /// model (ignored otherwise). With T = (latent_size / p)^2 tokens of width D, MLP width H,
    /// context width D_c and L context tokens:
    ///
    /// - patch embedding 2 T (C p^2) D; timestep MLP 2 (256 D + D D); pooled-text projection
    ///   2 D_c D
    /// - per block: adaLN 2 D 6D; q, k, v 2 T D 3D; Q K^T and A V 2 T T D each; output 2 T D D;
    ///   MLP 2 T D H twice; with text, cross-attention 2 T D D (q) + 2 L D_c 2D (k, v) +
    ///   2 T L D twice + 2 T D D (output)
    /// - final layer: adaLN 2 D 2D; projection 2 T D (p^2 C)
    pub fn forward_flops(
        &self,
        latent_channels: usize,
        latent_size: usize,
        cond: &ConditioningSpec,
        text_tokens: usize,
    ) -> u64 {
        let (d, p, c) = (self.hidden_size, self.patch_size, latent_channels);
        let tokens = (latent_size / p).pow(2);
        let hidden = self.mlp_hidden();
        let attention = |queries: usize, keys: usize| 2 * matmul(queries, d, keys);
        let mut block = matmul(1, d, 6 * d)
            + matmul(tokens, d, 3 * d)
            + attention(tokens, tokens)
            + matmul(tokens, d, d)
            + matmul(tokens, d, hidden)
            + matmul(tokens, hidden, d);
        let mut embed =
            matmul(tokens, c * p * p, d) + matmul(1, FREQUENCY_DIM, d) + matmul(1, d, d);
        if let Some(context) = cond.text_dim {
            embed += matmul(1, context, d);
            block += matmul(tokens, d, d)
                + matmul(text_tokens, context, 2 * d)
                + attention(tokens, text_tokens)
                + matmul(tokens, d, d);
        }
        let last = matmul(1, d, 2 * d) + matmul(tokens, d, p * p * c);
        embed + self.depth as u64 * block + last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DiT-S/2 on a 4 x 32 x 32 latent (the paper's 256x256 setting) by hand: 256 tokens of
    /// width 384, MLP 1536, 12 blocks. The paper's Table 1 gives 6.06 GFLOPs, counting a
    /// multiply-add as one operation; the matrix products here come to 2 x 6.05 GFLOPs.
    #[test]
    fn dit_s2_by_hand() {
        let config = DiTConfig::preset("DiT-S/2").unwrap();
        let none = ConditioningSpec::default();
        let (t, d, h) = (256u64, 384u64, 1536u64);
        let block = 2 * d * 6 * d
            + 2 * t * d * 3 * d
            + 2 * 2 * t * t * d
            + 2 * t * d * d
            + 2 * 2 * t * d * h;
        let expected =
            2 * t * 16 * d + 2 * 256 * d + 2 * d * d + 12 * block + 2 * d * 2 * d + 2 * t * d * 16;
        assert_eq!(config.forward_flops(4, 32, &none, 0), expected);
        let gflops_as_macs = expected as f64 / 2e9;
        assert!((gflops_as_macs - 6.06).abs() < 0.02, "{gflops_as_macs}");
    }

    /// Text conditioning adds the pooled projection and one cross-attention per block.
    #[test]
    fn text_adds_cross_attention() {
        let config = DiTConfig::preset("DiT-T/2").unwrap();
        let (t, d, dc, l) = (16u64, 128u64, 64u64, 8u64);
        let plain = config.forward_flops(4, 8, &ConditioningSpec::default(), 0);
        let text = ConditioningSpec {
            num_classes: None,
            text_dim: Some(dc as usize),
        };
        let cross = 2 * t * d * d + 2 * l * dc * 2 * d + 2 * 2 * t * l * d + 2 * t * d * d;
        assert_eq!(
            config.forward_flops(4, 8, &text, l as usize),
            plain + 2 * dc * d + 4 * cross
        );
        // classes are a table lookup: no FLOPs
        let class = ConditioningSpec {
            num_classes: Some(10),
            text_dim: None,
        };
        assert_eq!(config.forward_flops(4, 8, &class, 0), plain);
    }
}
