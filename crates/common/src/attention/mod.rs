//! Multi-head attention for burn-flex as one operation with its own backward, a burn backend
//! extension like [`crate::gemm_conv`] and [`crate::group_norm`].
//!
//! Under autodiff burn decomposes `attention` into about ten tensor operations (the score
//! product, scale, mask, a max, subtract, exp, sum, divide, the value product), each a pass over
//! the [batch, heads, queries, keys] scores with its own autodiff node and saved tensors. At 64
//! tokens and more that made a training step's attention 2.4-3.7x slower than PyTorch's
//! (docs/PERFORMANCE.md). [`kernels`] does each (batch, head) pair's work in one scratch matrix
//! that stays in cache, and recomputes the probabilities in the backward from the log-sum-exp
//! instead of keeping them.

pub mod heads;
pub mod kernels;

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{Bool, Tensor};

use crate::flex::{contiguous, flex_tensor, values};
use heads::Heads;
use kernels::AttentionGeometry;

/// Scaled dot-product attention as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FlexAttention: Backend {
    /// softmax(q k^T / sqrt(d_head) + key_bias) v, with `key_bias` [batch, keys] (0 or -inf)
    /// added to every score row of its batch when `biased`, else ignored.
    fn flex_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        biased: bool,
    ) -> FloatTensor<Self>;

    /// Self-attention from the fused projection: `qkv` [batch, tokens, 3 * heads * d_head]
    /// (q, k, v side by side in each row) -> [batch, tokens, heads * d_head], the heads
    /// merged; `key_bias` as in [`FlexAttention::flex_attention`].
    fn flex_self_attention(
        qkv: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        biased: bool,
        heads: usize,
    ) -> FloatTensor<Self>;
}

fn geometry(q: &FlexTensor, k: &FlexTensor) -> AttentionGeometry {
    let [batch, heads, queries, d_head]: [usize; 4] = q.shape().dims();
    let keys = k.shape().dims::<4>()[2];
    AttentionGeometry::new(batch, heads, queries, keys, d_head)
}

/// The forward on contiguous tensors: O and the log-sum-exp of each score row.
fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: Option<&FlexTensor>,
) -> (FlexTensor, Vec<f32>, AttentionGeometry) {
    let g = geometry(q, k);
    let (out, lse) = kernels::forward(values(q), values(k), values(v), bias.map(values), &g);
    (flex_tensor(out, q.shape().dims::<4>().to_vec()), lse, g)
}

impl FlexAttention for Flex {
    fn flex_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        key_bias: FlexTensor,
        biased: bool,
    ) -> FlexTensor {
        let bias = biased.then(|| contiguous(&key_bias));
        forward(
            &contiguous(&q),
            &contiguous(&k),
            &contiguous(&v),
            bias.as_ref(),
        )
        .0
    }

    fn flex_self_attention(
        qkv: FlexTensor,
        key_bias: FlexTensor,
        biased: bool,
        heads: usize,
    ) -> FlexTensor {
        let bias = biased.then(|| contiguous(&key_bias));
        self_forward(&contiguous(&qkv), bias.as_ref(), heads).0
    }
}

/// The head layout of a fused projection `qkv` [batch, tokens, 3 * heads * d_head].
fn heads_of(qkv: &FlexTensor, heads: usize) -> Heads {
    let [batch, tokens, width]: [usize; 3] = qkv.shape().dims();
    assert!(
        heads > 0 && width % (3 * heads) == 0,
        "self-attention: qkv width {width} is not 3 x {heads} heads"
    );
    Heads {
        batch,
        tokens,
        heads,
        d_head: width / (3 * heads),
    }
}

/// Self-attention's forward on a contiguous `qkv`: the output [batch, tokens, width / 3], and
/// what its backward keeps (q, k, v and O in the kernels' layout, the log-sum-exp).
fn self_forward(
    qkv: &FlexTensor,
    bias: Option<&FlexTensor>,
    heads: usize,
) -> (FlexTensor, SelfSaved) {
    let s = heads_of(qkv, heads);
    let [q, k, v]: [Vec<f32>; 3] = heads::split(values(qkv), 3, &s)
        .try_into()
        .expect("three parts");
    let g = AttentionGeometry::new(s.batch, s.heads, s.tokens, s.tokens, s.d_head);
    let (out, lse) = kernels::forward(&q, &k, &v, bias.map(values), &g);
    let merged = heads::join(&[&out], &s);
    let y = flex_tensor(merged, vec![s.batch, s.tokens, s.heads * s.d_head]);
    let saved = SelfSaved {
        qkv: Arc::new([q, k, v]),
        bias: bias.cloned(),
        out: Arc::new(out),
        lse: Arc::new(lse),
        layout: s,
        geometry: g,
    };
    (y, saved)
}

/// What self-attention's backward needs.
#[derive(Debug, Clone)]
struct SelfSaved {
    /// q, k, v in the kernels' layout.
    qkv: Arc<[Vec<f32>; 3]>,
    bias: Option<FlexTensor>,
    out: Arc<Vec<f32>>,
    lse: Arc<Vec<f32>>,
    layout: Heads,
    geometry: AttentionGeometry,
}

#[derive(Debug)]
struct FlexSelfAttentionBackward;

impl Backward<Flex, 1> for FlexSelfAttentionBackward {
    type State = SelfSaved;

    fn backward(self, ops: Ops<SelfSaved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let Some(node) = node else { return };
        let s = ops.state;
        let [q, k, v] = &*s.qkv;
        let d_out = heads::split(values(&out_grad), 1, &s.layout);
        let (dq, dk, dv) = kernels::backward(
            q,
            k,
            v,
            s.bias.as_ref().map(values),
            &s.out,
            &s.lse,
            &d_out[0],
            &s.geometry,
        );
        // the fused projection's gradient, each element written once (no zero-filled
        // full-size tensor per part, as three narrows' backward would make)
        let d_qkv = heads::join(&[&dq, &dk, &dv], &s.layout);
        let l = s.layout;
        grads.register::<Flex>(
            node.id,
            flex_tensor(d_qkv, vec![l.batch, l.tokens, 3 * l.heads * l.d_head]),
        );
    }
}

/// What the backward step needs: the contiguous inputs, the output and its log-sum-exp.
#[derive(Debug, Clone)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: Option<FlexTensor>,
    out: FlexTensor,
    lse: Arc<Vec<f32>>,
    geometry: AttentionGeometry,
}

#[derive(Debug)]
struct FlexAttentionBackward;

impl Backward<Flex, 3> for FlexAttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (dq, dk, dv) = kernels::backward(
            values(&s.q),
            values(&s.k),
            values(&s.v),
            s.bias.as_ref().map(values),
            values(&s.out),
            &s.lse,
            values(&out_grad),
            &s.geometry,
        );
        for (node, grad, like) in [(node_q, dq, &s.q), (node_k, dk, &s.k), (node_v, dv, &s.v)] {
            if let Some(node) = node {
                grads.register::<Flex>(
                    node.id,
                    flex_tensor(grad, like.shape().dims::<4>().to_vec()),
                );
            }
        }
    }
}

impl<C: CheckpointStrategy> FlexAttention for Autodiff<Flex, C> {
    fn flex_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        biased: bool,
    ) -> FloatTensor<Self> {
        // the key bias is a mask: no gradient flows to it
        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (
            contiguous(q.primitive()),
            contiguous(k.primitive()),
            contiguous(v.primitive()),
        );
        let bias = biased.then(|| contiguous(key_bias.primitive()));
        let (out, lse, geometry) = forward(&q, &k, &v, bias.as_ref());
        match FlexAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let saved = Saved {
                    q,
                    k,
                    v,
                    bias,
                    out: out.clone(),
                    lse: Arc::new(lse),
                    geometry,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn flex_self_attention(
        qkv: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        biased: bool,
        heads: usize,
    ) -> FloatTensor<Self> {
        let nodes = [qkv.node()];
        let qkv = contiguous(qkv.primitive());
        let bias = biased.then(|| contiguous(key_bias.primitive()));
        let (out, saved) = self_forward(&qkv, bias.as_ref(), heads);
        match FlexSelfAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(saved, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// softmax(q k^T / sqrt(d_head)) v through [`FlexAttention`], keys masked out where
/// `padding_mask` is true. The caller checks that the tensors are f32 on burn-flex.
///
/// # Shapes
/// - `q`: `[batch, heads, queries, d_head]`; `k`, `v`: `[batch, heads, keys, d_head]`
/// - `padding_mask`: `[batch, keys]`
pub fn flex_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    padding_mask: Option<Tensor<2, Bool>>,
) -> Tensor<4> {
    let (bias, biased) = key_bias(padding_mask, q.dims()[0], k.dims()[2], &q.device());
    Tensor::from_dispatch(<Dispatch as FlexAttention>::flex_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        biased,
    ))
}

/// Multi-head self-attention from the fused projection through
/// [`FlexAttention::flex_self_attention`]: `qkv` [batch, tokens, 3 * width] (q, k, v side by
/// side, `heads` heads each) -> [batch, tokens, width], keys masked out where `padding_mask`
/// [batch, tokens] is true. The same as splitting q, k, v off with `narrow`, attending per
/// head and merging the heads, without the narrows' zero-filled gradients and the layout
/// copies between them. The caller checks that `qkv` is f32 on burn-flex.
pub fn flex_self_attention(
    qkv: Tensor<3>,
    heads: usize,
    padding_mask: Option<Tensor<2, Bool>>,
) -> Tensor<3> {
    let [b, n, _] = qkv.dims();
    let (bias, biased) = key_bias(padding_mask, b, n, &qkv.device());
    Tensor::from_dispatch(<Dispatch as FlexAttention>::flex_self_attention(
        qkv.into_dispatch(),
        bias.into_dispatch(),
        biased,
        heads,
    ))
}

/// The additive key bias of a padding mask [batch, keys] (0 where a key takes part, -inf where
/// it is padding) and whether there is one (without a mask, a placeholder the kernels ignore).
fn key_bias(
    padding_mask: Option<Tensor<2, Bool>>,
    batch: usize,
    keys: usize,
    device: &burn::tensor::Device,
) -> (Tensor<2>, bool) {
    match padding_mask {
        Some(mask) => (
            Tensor::zeros([batch, keys], device).mask_fill(mask, f32::NEG_INFINITY),
            true,
        ),
        None => (Tensor::zeros([1, 1], device), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, TensorData};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output and the gradients of q, k and v against burn's own `attention` (its composed
    /// form under burn-flex's autodiff), with and without a padding mask that masks one whole
    /// batch; and without autodiff.
    #[test]
    fn matches_burns_attention_forward_and_backward() {
        for device in [Device::flex().autodiff(), Device::flex()] {
            let (b, h, n, l, d) = (3, 2, 5, 4, 8);
            let r = |dims: [usize; 4]| {
                let t = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.5), &device);
                if device.is_autodiff() {
                    t.require_grad()
                } else {
                    t
                }
            };
            let (q, k, v) = (r([b, h, n, d]), r([b, h, l, d]), r([b, h, l, d]));
            let mask = Tensor::<2, Bool>::from_data(
                TensorData::new(
                    vec![
                        false, false, false, true, //
                        true, true, true, true, // every key of this batch is padding
                        false, false, false, false,
                    ],
                    [b, l],
                ),
                &device,
            );
            for mask in [None, Some(mask)] {
                let ours = flex_attention(q.clone(), k.clone(), v.clone(), mask.clone());
                let expanded = mask.map(|m| m.reshape([b, 1, 1, l]).expand([b, h, n, l]));
                let reference = burn_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    expanded,
                    None,
                    AttentionModuleOptions::default(),
                );
                assert!(max_diff(ours.clone(), reference.clone()) < 1e-5, "forward");
                if !device.is_autodiff() {
                    continue;
                }
                let w = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &device);
                let g = (ours * w.clone()).sum().backward();
                let g_ref = (reference * w).sum().backward();
                for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                    let diff = max_diff(t.grad(&g).unwrap(), t.grad(&g_ref).unwrap());
                    assert!(diff < 1e-4, "d{name}: {diff}");
                }
            }
        }
    }

    /// Self-attention from the fused projection equals splitting q, k, v off with narrows,
    /// attending and merging the heads: output and the gradient of qkv, with and without a
    /// padding mask, with and without autodiff.
    #[test]
    fn self_attention_matches_the_narrowed_composition() {
        for device in [Device::flex().autodiff(), Device::flex()] {
            let (b, n, h, dh) = (3, 5, 2, 4);
            let qkv =
                Tensor::<3>::random([b, n, 3 * h * dh], Distribution::Normal(0.0, 1.5), &device);
            let qkv = if device.is_autodiff() {
                qkv.require_grad()
            } else {
                qkv
            };
            let mask = Tensor::<2, Bool>::from_data(
                TensorData::new(
                    vec![
                        false, false, false, true, false, //
                        true, true, true, true, true, // every key of this batch is padding
                        false, false, false, false, false,
                    ],
                    [b, n],
                ),
                &device,
            );
            for mask in [None, Some(mask)] {
                let ours = flex_self_attention(qkv.clone(), h, mask.clone());
                let split = qkv.clone().reshape([b, n, 3 * h, dh]).swap_dims(1, 2);
                let part = |i: usize| split.clone().narrow(1, i * h, h);
                let reference = flex_attention(part(0), part(1), part(2), mask)
                    .swap_dims(1, 2)
                    .reshape([b, n, h * dh]);
                assert_eq!(ours.dims(), [b, n, h * dh]);
                assert!(max_diff(ours.clone(), reference.clone()) < 1e-6, "forward");
                if !device.is_autodiff() {
                    continue;
                }
                let w = Tensor::<3>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &device);
                let g = (ours * w.clone()).sum().backward();
                let g_ref = (reference * w).sum().backward();
                let diff = max_diff(qkv.grad(&g).unwrap(), qkv.grad(&g_ref).unwrap());
                assert!(diff < 1e-6, "d qkv: {diff}");
            }
        }
    }
}
