//! Nearest-neighbour 2x upsampling for burn-flex as one operation with its own backward, a burn
//! backend extension like [`crate::group_norm`].
//!
//! * forward: y[n, c, 2i + a, 2j + b] = x[n, c, i, j] for a, b in {0, 1}
//! * backward: dx[n, c, i, j] = sum over a, b of dy[n, c, 2i + a, 2j + b]
//!
//! burn's broadcast form (`reshape`, `expand`, `reshape`) becomes a strided copy through
//! burn-flex's generic index iterator, and its backward a `sum_dim` over the broadcast axes:
//! 1.3-2.4x PyTorch's `F.interpolate` forward + backward at the VAE's and U-Net's shapes
//! (docs/PERFORMANCE.md). Here both are one pass per (image, channel) plane.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::flex::{contiguous, flex_tensor, on_flex_f32, values};

/// y = nearest-neighbour 2x upsampling of x, one [h, w] plane -> [2h, 2w] at a time.
fn forward_planes(x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len() * 4];
    if x.is_empty() {
        return y;
    }
    y.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(yp, xp)| {
            for (pair, row) in yp.chunks_mut(4 * w).zip(xp.chunks(w)) {
                let (top, bottom) = pair.split_at_mut(2 * w);
                for (out, &v) in top.chunks_mut(2).zip(row) {
                    out.fill(v);
                }
                bottom.copy_from_slice(top);
            }
        });
    y
}

/// dx = the sum of each 2x2 block of dy, one [2h, 2w] plane -> [h, w] at a time.
fn backward_planes(dy: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; dy.len() / 4];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(4 * h * w))
        .for_each(|(xp, yp)| {
            for (row, pair) in xp.chunks_mut(w).zip(yp.chunks(4 * w)) {
                let (top, bottom) = pair.split_at(2 * w);
                for (j, d) in row.iter_mut().enumerate() {
                    *d = top[2 * j] + top[2 * j + 1] + bottom[2 * j] + bottom[2 * j + 1];
                }
            }
        });
    dx
}

/// Nearest-neighbour 2x upsampling as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait Upsample2x: Backend {
    /// x [n, c, h, w] -> [n, c, 2h, 2w], each value repeated in a 2x2 block.
    fn upsample_nearest2x(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// [n, c, h, w] of a tensor.
fn dims(x: &FlexTensor) -> [usize; 4] {
    x.shape().dims::<4>()
}

impl Upsample2x for Flex {
    fn upsample_nearest2x(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let [n, c, h, w] = dims(&x);
        flex_tensor(forward_planes(values(&x), h, w), vec![n, c, 2 * h, 2 * w])
    }
}

#[derive(Debug)]
struct Upsample2xBackward;

impl Backward<Flex, 1> for Upsample2xBackward {
    /// The input's [n, c, h, w].
    type State = [usize; 4];

    fn backward(self, ops: Ops<[usize; 4], 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let [n, c, h, w] = ops.state;
        if let Some(node) = node {
            let dx = backward_planes(values(&out_grad), h, w);
            grads.register::<Flex>(node.id, flex_tensor(dx, vec![n, c, h, w]));
        }
    }
}

impl<C: CheckpointStrategy> Upsample2x for Autodiff<Flex, C> {
    fn upsample_nearest2x(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [x.node()];
        let x = x.into_primitive();
        let shape = dims(&x);
        let y = Flex::upsample_nearest2x(x);
        match Upsample2xBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(shape, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// Nearest-neighbour 2x upsampling: through [`Upsample2x`] for an f32 burn-flex tensor, else
/// by broadcasting (its backward a plain sum).
///
/// # Shapes
/// - `x`: `[batch, c, h, w]` -> `[batch, c, 2h, 2w]`
pub fn upsample_nearest2x(x: Tensor<4>) -> Tensor<4> {
    if on_flex_f32(&x) {
        return Tensor::from_dispatch(<Dispatch as Upsample2x>::upsample_nearest2x(
            x.into_dispatch(),
        ));
    }
    broadcast_upsample(x)
}

/// [`upsample_nearest2x`] in tensor operations: [b, c, h, 1, w, 1] expanded to
/// [b, c, h, 2, w, 2].
fn broadcast_upsample(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output and input gradient against the broadcast form, on burn-flex with and without
    /// autodiff, at odd and even sides; and the values of a small case written out.
    #[test]
    fn matches_the_broadcast_form_forward_and_backward() {
        for device in [Device::flex().autodiff(), Device::flex()] {
            for dims in [[2, 3, 5, 4], [1, 1, 1, 1], [3, 2, 4, 7]] {
                let x = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
                let x = if device.is_autodiff() {
                    x.require_grad()
                } else {
                    x
                };
                let ours = upsample_nearest2x(x.clone());
                let reference = broadcast_upsample(x.clone());
                assert_eq!(max_diff(ours.clone(), reference.clone()), 0.0, "{dims:?}");
                if device.is_autodiff() {
                    let w =
                        Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &device);
                    let g = (ours * w.clone()).sum().backward();
                    let g_ref = (reference * w).sum().backward();
                    let diff = max_diff(x.grad(&g).unwrap(), x.grad(&g_ref).unwrap());
                    assert!(diff < 1e-5, "{dims:?}: dx {diff}");
                }
            }
        }
        let y = forward_planes(&[1.0, 2.0, 3.0, 4.0], 2, 2);
        #[rustfmt::skip]
        let expected = [
            1.0, 1.0, 2.0, 2.0,
            1.0, 1.0, 2.0, 2.0,
            3.0, 3.0, 4.0, 4.0,
            3.0, 3.0, 4.0, 4.0,
        ];
        assert_eq!(y, expected);
        assert_eq!(backward_planes(&expected, 2, 2), [4.0, 8.0, 12.0, 16.0]);
    }
}
