//! SiLU and the tanh GELU for burn-flex as single operations with their own backward, a burn
//! backend extension like [`crate::gemm_conv`].
//!
//! burn computes both from tensor operations (x * sigmoid(x); the tanh GELU as x * sigmoid of a
//! cubic), each a pass over memory with its own autodiff node, and burn-flex's sigmoid calls
//! libm's scalar `expf` per element: a fifth of the DiT training step went there. [`silu`] and
//! [`gelu_tanh`] run [`kernels`] (vectorised, [`crate::fast_math`]) on a burn-flex f32 tensor
//! and burn's own composition anywhere else.

pub mod kernels;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;

use crate::flex::{contiguous, flex_tensor, on_flex_f32, values};
use kernels::Kind;

/// SiLU or the tanh GELU as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FusedActivation: Backend {
    /// x sigmoid(x), or with `gelu_tanh` x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)).
    fn fused_activation(x: FloatTensor<Self>, gelu_tanh: bool) -> FloatTensor<Self>;
}

fn kind(gelu_tanh: bool) -> Kind {
    if gelu_tanh {
        Kind::GeluTanh
    } else {
        Kind::Silu
    }
}

impl FusedActivation for Flex {
    fn fused_activation(x: FlexTensor, gelu_tanh: bool) -> FlexTensor {
        let x = contiguous(&x);
        flex_tensor(
            kernels::forward(values(&x), kind(gelu_tanh)),
            x.shape().to_vec(),
        )
    }
}

#[derive(Debug)]
struct FusedActivationBackward;

impl Backward<Flex, 1> for FusedActivationBackward {
    /// The (contiguous) input and which activation.
    type State = (FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, gelu_tanh) = ops.state;
        if let Some(node) = node_x {
            let dx = kernels::backward(values(&x), values(&out_grad), kind(gelu_tanh));
            grads.register::<Flex>(node.id, flex_tensor(dx, x.shape().to_vec()));
        }
    }
}

impl<C: CheckpointStrategy> FusedActivation for Autodiff<Flex, C> {
    fn fused_activation(x: FloatTensor<Self>, gelu_tanh: bool) -> FloatTensor<Self> {
        let node = x.node();
        let x = contiguous(x.primitive());
        let y = Flex::fused_activation(x.clone(), gelu_tanh);
        match FusedActivationBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, gelu_tanh), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

fn fused<const D: usize>(x: Tensor<D>, gelu_tanh: bool) -> Tensor<D> {
    let x = x.into_dispatch();
    Tensor::from_dispatch(<Dispatch as FusedActivation>::fused_activation(
        x, gelu_tanh,
    ))
}

/// SiLU: x sigmoid(x).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if crate::torch_ops::on_libtorch(&x) {
        return torch_activation(x, false);
    }
    if on_flex_f32(&x) {
        fused(x, false)
    } else {
        burn::tensor::activation::silu(x)
    }
}

/// GELU, tanh approximation (Hendrycks & Gimpel 2016, section 2; PyTorch's
/// `GELU(approximate="tanh")`, which DiT uses):
/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)).
/// Within 5e-4 of the exact x Phi(x) everywhere, and built from multiplications and one
/// sigmoid, so its backward needs no erf.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if crate::torch_ops::on_libtorch(&x) {
        return torch_activation(x, true);
    }
    if on_flex_f32(&x) {
        fused(x, true)
    } else {
        composed_gelu_tanh(x)
    }
}

/// burn's composition of the tanh GELU (the path off burn-flex, and the tests' reference).
fn composed_gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let inner = (x.clone() * x.clone() * 0.044715 + 1.0) * x.clone() * kernels::GELU_C as f64;
    x * sigmoid(inner)
}

/// [`silu`] or [`gelu_tanh`] on burn-tch: one libtorch call with torch's backward.
#[cfg(feature = "tch")]
fn torch_activation<const D: usize>(x: Tensor<D>, gelu_tanh: bool) -> Tensor<D> {
    use crate::torch_ops::TorchOps;
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_activation(
        x.into_dispatch(),
        gelu_tanh,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Both activations and their gradients against burn's own composition on burn-flex.
    #[test]
    fn match_burns_composition_forward_and_backward() {
        let device = Device::flex().autodiff();
        let x =
            Tensor::<3>::random([4, 5, 6], Distribution::Normal(0.0, 3.0), &device).require_grad();
        type Activation<'a> = &'a dyn Fn(Tensor<3>) -> Tensor<3>;
        let cases: [(Activation, Activation); 2] = [
            (&silu, &burn::tensor::activation::silu),
            (&gelu_tanh, &composed_gelu_tanh),
        ];
        for (ours, reference) in cases {
            let (y, y_ref) = (ours(x.clone()), reference(x.clone()));
            assert!(max_diff(y.clone(), y_ref.clone()) < 1e-5, "forward");
            let dy = Tensor::<3>::random(y.dims(), Distribution::Normal(0.0, 1.0), &device);
            let g = (y * dy.clone()).sum().backward();
            let g_ref = (y_ref * dy).sum().backward();
            assert!(
                max_diff(x.grad(&g).unwrap(), x.grad(&g_ref).unwrap()) < 1e-5,
                "dx"
            );
        }
    }
}
