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
    let [b, _, _, _] = q.dims();
    let l = k.dims()[2];
    let biased = padding_mask.is_some();
    let bias: Tensor<2> = match padding_mask {
        Some(mask) => Tensor::zeros([b, l], &q.device()).mask_fill(mask, f32::NEG_INFINITY),
        None => Tensor::zeros([1, 1], &q.device()),
    };
    Tensor::from_dispatch(<Dispatch as FlexAttention>::flex_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        biased,
    ))
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
}
