//! GroupNorm (+ SiLU) for burn-flex as one operation with its own backward, a burn backend
//! extension like [`crate::gemm_conv`].
//!
//! burn-nn's `GroupNorm` composes about eight tensor operations (mean, subtract, square, mean,
//! add, sqrt, divide, scale, shift), and `silu` two more with a scalar `expf` per element; each
//! is a pass over memory with its own autodiff node, which made GroupNorm + SiLU 4-5x slower on
//! burn-flex than PyTorch's fused kernels (docs/PERFORMANCE.md). [`group_norm`] routes a
//! [`GroupNorm`] through [`kernels`] where it applies (a burn-flex f32 tensor, affine norm);
//! everything else takes burn-nn's own forward and `silu`.

pub mod kernels;

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::nn::GroupNorm;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor};

use crate::flex::{contiguous, flex_tensor, on_flex_f32, values};
use kernels::NormGeometry;

/// GroupNorm with an optional SiLU as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FusedGroupNorm: Backend {
    /// silu?(groupnorm(x) * gamma + beta) over `groups` groups of x [n, c, ...].
    fn fused_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FloatTensor<Self>;
}

fn geometry(x: &FlexTensor, groups: usize, epsilon: f64, silu: bool) -> NormGeometry {
    let dims = x.shape().dims::<4>();
    NormGeometry {
        batch: dims[0],
        channels: dims[1],
        pixels: dims[2] * dims[3],
        groups,
        epsilon,
        silu,
    }
}

/// The forward on contiguous tensors: y and the per-group (mean, rstd).
fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    g: &NormGeometry,
) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let (y, mean, rstd) = kernels::forward(values(x), values(gamma), values(beta), g);
    (flex_tensor(y, x.shape().dims::<4>().to_vec()), mean, rstd)
}

impl FusedGroupNorm for Flex {
    fn fused_group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FlexTensor {
        let g = geometry(&x, groups, epsilon, silu);
        forward(&contiguous(&x), &contiguous(&gamma), &contiguous(&beta), &g).0
    }
}

/// What the backward step needs: the contiguous inputs and the forward's (mean, rstd).
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    stats: Arc<(Vec<f32>, Vec<f32>)>,
    geometry: NormGeometry,
}

#[derive(Debug)]
struct FusedGroupNormBackward;

impl Backward<Flex, 3> for FusedGroupNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (mean, rstd) = &*s.stats;
        let (dx, dgamma, dbeta) = kernels::backward(
            values(&s.x),
            values(&s.gamma),
            values(&s.beta),
            mean,
            rstd,
            values(&out_grad),
            &s.geometry,
        );
        let channels = vec![s.geometry.channels];
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, flex_tensor(dx, s.x.shape().dims::<4>().to_vec()));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, flex_tensor(dgamma, channels.clone()));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, flex_tensor(dbeta, channels));
        }
    }
}

impl<C: CheckpointStrategy> FusedGroupNorm for Autodiff<Flex, C> {
    fn fused_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (
            contiguous(x.primitive()),
            contiguous(gamma.primitive()),
            contiguous(beta.primitive()),
        );
        let geometry = geometry(&x, groups, epsilon, silu);
        let (y, mean, rstd) = forward(&x, &gamma, &beta, &geometry);
        match FusedGroupNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let stats = Arc::new((mean, rstd));
                prep.finish(
                    Saved {
                        x,
                        gamma,
                        beta,
                        stats,
                        geometry,
                    },
                    y,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// silu?(norm(x)), through [`FusedGroupNorm`] where it applies (module docs), on burn-tch
/// through libtorch's own group norm ([`crate::torch_ops`]), else burn-nn's `GroupNorm::forward`
/// and `silu`.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]` -> the same
pub fn group_norm(norm: &GroupNorm, x: Tensor<4>, with_silu: bool) -> Tensor<4> {
    if let (true, Some(gamma), Some(beta)) = (norm.affine, &norm.gamma, &norm.beta) {
        let (gamma, beta) = (gamma.val(), beta.val());
        #[cfg(feature = "tch")]
        if crate::torch_ops::on_libtorch(&x) {
            use crate::torch_ops::TorchOps;
            return Tensor::from_dispatch(<Dispatch as TorchOps>::torch_group_norm(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                norm.num_groups,
                norm.epsilon,
                with_silu,
            ));
        }
        if on_flex_f32(&x) && gamma.dtype() == DType::F32 {
            return Tensor::from_dispatch(<Dispatch as FusedGroupNorm>::fused_group_norm(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                norm.num_groups,
                norm.epsilon,
                with_silu,
            ));
        }
    }
    let y = norm.forward(x);
    if with_silu { silu(y) } else { y }
}

/// silu(norm(x)): the pre-activation of every residual block.
pub fn group_norm_silu(norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
    group_norm(norm, x, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Device, Distribution};

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output and the gradients of x, gamma and beta against burn-nn's GroupNorm (+ silu),
    /// through burn-flex's autodiff, with trained-looking (non-unit) gamma and beta.
    #[test]
    fn matches_burn_nn_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (groups, channels, with_silu) in [(2, 4, true), (3, 6, false), (4, 4, true)] {
            let mut norm: GroupNorm = GroupNormConfig::new(groups, channels).init(&device);
            let random = |seed| {
                Tensor::<1>::random([channels], Distribution::Normal(0.5, 1.0), &device)
                    .add_scalar(seed)
            };
            norm.gamma = norm.gamma.map(|p| p.map(|_| random(0.0).require_grad()));
            norm.beta = norm.beta.map(|p| p.map(|_| random(0.1).require_grad()));
            let x =
                Tensor::<4>::random([3, channels, 5, 4], Distribution::Normal(1.0, 2.0), &device)
                    .require_grad();
            let reference = if with_silu {
                silu(norm.forward(x.clone()))
            } else {
                norm.forward(x.clone())
            };
            let ours = group_norm(&norm, x.clone(), with_silu);
            assert!(max_diff(ours.clone(), reference.clone()) < 1e-5, "forward");
            let dy = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &device);
            let g_ref = (reference * dy.clone()).sum().backward();
            let g = (ours * dy).sum().backward();
            assert!(
                max_diff(x.grad(&g).unwrap(), x.grad(&g_ref).unwrap()) < 1e-4,
                "dx"
            );
            for p in [norm.gamma.as_ref().unwrap(), norm.beta.as_ref().unwrap()] {
                let grad = |g| p.val().grad(g).unwrap().reshape([1, 1, 1, channels]);
                assert!(max_diff(grad(&g), grad(&g_ref)) < 1e-4, "dgamma / dbeta");
            }
        }
    }

    #[test]
    fn inference_path_matches_too() {
        let device = Device::flex();
        let norm: GroupNorm = GroupNormConfig::new(2, 4).init(&device);
        let x = Tensor::<4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 3.0), &device);
        assert!(max_diff(group_norm_silu(&norm, x.clone()), silu(norm.forward(x))) < 1e-5);
    }
}
