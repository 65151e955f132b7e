//! LayerNorm and attention as the transformer blocks call them, each on the fastest path of the
//! tensor's backend: on burn-tch PyTorch's own kernels with torch's backward
//! ([`crate::torch_ops`], the `tch` build), attention on burn-flex (f32) this crate's own
//! operation ([`crate::attention`]), elsewhere burn's `layer_norm` and `attention`.

use burn::tensor::module::{attention as burn_attention, layer_norm as burn_layer_norm};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

/// (x - mean) / sqrt(var + epsilon) * gamma + beta over the last axis (biased variance).
///
/// # Shapes
/// - `x`: `[..., d]`, `gamma`, `beta`: `[d]` -> `[..., d]`
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    epsilon: f64,
) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if crate::torch_ops::on_libtorch(&x) {
        use crate::torch_ops::TorchOps;
        use burn::backend::Dispatch;
        let beta = beta.unwrap_or_else(|| gamma.zeros_like());
        return Tensor::from_dispatch(<Dispatch as TorchOps>::torch_layer_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            epsilon,
        ));
    }
    burn_layer_norm(x, gamma, beta, epsilon)
}

/// softmax(q k^T / sqrt(d_head)) v, keys masked out where `padding_mask` is true.
///
/// # Shapes
/// - `q`: `[batch, heads, queries, d_head]`; `k`, `v`: `[batch, heads, keys, d_head]`
/// - `padding_mask`: `[batch, keys]`
/// - output: `[batch, heads, queries, d_head]`
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    padding_mask: Option<Tensor<2, Bool>>,
) -> Tensor<4> {
    let [b, h, n, _] = q.dims();
    let [_, _, l, _] = k.dims();
    #[cfg(feature = "tch")]
    if crate::torch_ops::on_libtorch(&q) {
        use crate::torch_ops::TorchOps;
        use burn::backend::Dispatch;
        // torch reads a bool mask the other way round (true = attend): pass an additive bias
        // instead, 0 where a key takes part and -inf where it is padding, [b, 1, 1, l]
        let bias = padding_mask.map(|mask| {
            let zeros =
                crate::precision::to_dtype(Tensor::zeros([b, 1, 1, l], &q.device()), q.dtype());
            zeros.mask_fill(mask.reshape([b, 1, 1, l]), f32::NEG_INFINITY)
        });
        let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
        let out = match bias {
            Some(bias) => <Dispatch as TorchOps>::torch_attention(q, k, v, bias.into_dispatch()),
            None => <Dispatch as TorchOps>::torch_attention_unmasked(q, k, v),
        };
        return Tensor::from_dispatch(out);
    }
    if crate::flex::on_flex_f32(&q) {
        return crate::attention::flex_attention(q, k, v, padding_mask);
    }
    // [b, l] -> [b, 1, 1, l] -> [b, h, n, l] (a broadcast view)
    let mask = padding_mask.map(|m| m.reshape([b, 1, 1, l]).expand([b, h, n, l]));
    burn_attention(q, k, v, mask, None, AttentionModuleOptions::default())
}

/// Multi-head self-attention from a fused projection: `qkv` [batch, tokens, 3 * width] (q, k
/// and v side by side in each row, `heads` heads each) -> [batch, tokens, width], the heads
/// merged. On burn-flex (f32) one operation that reads the fused layout and writes the fused
/// gradient ([`crate::attention::flex_self_attention`]); elsewhere q, k, v are split off as
/// views and go through [`attention`].
pub fn self_attention(
    qkv: Tensor<3>,
    heads: usize,
    padding_mask: Option<Tensor<2, Bool>>,
) -> Tensor<3> {
    if crate::flex::on_flex_f32(&qkv) {
        return crate::attention::flex_self_attention(qkv, heads, padding_mask);
    }
    let [b, n, w3] = qkv.dims();
    let dh = w3 / (3 * heads);
    // [b, n, 3d] -> [b, n, 3h, dh] -> [b, 3h, n, dh]: q, k, v are views of head blocks
    let qkv = qkv.reshape([b, n, 3 * heads, dh]).swap_dims(1, 2);
    let q = qkv.clone().narrow(1, 0, heads);
    let k = qkv.clone().narrow(1, heads, heads);
    let v = qkv.narrow(1, 2 * heads, heads);
    // [b, h, n, dh] -> [b, n, h, dh] -> [b, n, h * dh]
    attention(q, k, v, padding_mask)
        .swap_dims(1, 2)
        .reshape([b, n, heads * dh])
}
