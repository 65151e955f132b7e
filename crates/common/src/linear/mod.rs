//! A linear layer for burn-flex as one operation with its own backward (a burn backend
//! extension, as [`crate::gemm_conv`]).
//!
//! burn's `Linear` on burn-flex is a matrix product and then a separate bias addition, each
//! with its own output and autodiff step. Every product's output comes from
//! `FlexTensor::empty`, which zeroes a byte vector and then copies it into a new allocation
//! (the byte vector's declared alignment is 1, below what burn-flex's buffers must have): a
//! profile of the DiT's training step put 6% of its time in that copy and 3% in the zeroing.
//! [`linear`] writes y = x W + b with one product onto the bias, into a vector that becomes
//! the tensor as it is, and its backward does dx = dy W^T, dW = x^T dy and db in one call
//! ([`kernels`]). On burn-tch a layer with a bias is one `addmm` with PyTorch's backward for it
//! ([`crate::torch_ops`]); other backends and dtypes take burn's `Linear::forward`.

pub mod kernels;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::nn::Linear;
use burn::tensor::{DType, Tensor};

use crate::flex::{contiguous, flex_tensor, on_flex_f32, values};

/// The layer as a backend operation on x [m, d_in], weight [d_in, d_out], bias [d_out].
#[backend_extension(Flex, Autodiff)]
pub trait FlexLinear: Backend {
    /// y = x W + b.
    fn flex_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// [m, d_in, d_out] of x [m, d_in] and W [d_in, d_out].
fn sizes(x: &FlexTensor, weight: &FlexTensor) -> [usize; 3] {
    let [m, k]: [usize; 2] = x.shape().dims();
    let [_, n]: [usize; 2] = weight.shape().dims();
    [m, k, n]
}

impl FlexLinear for Flex {
    fn flex_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let [m, k, n] = sizes(&x, &weight);
        let (x, weight, bias) = (contiguous(&x), contiguous(&weight), contiguous(&bias));
        let y = kernels::forward(values(&x), values(&weight), Some(values(&bias)), [m, k, n]);
        flex_tensor(y, vec![m, n])
    }
}

/// The backward step: x and W (contiguous).
#[derive(Debug)]
struct FlexLinearBackward;

impl Backward<Flex, 3> for FlexLinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, weight) = ops.state;
        let [m, k, n] = sizes(&x, &weight);
        let wanted = [node_x.is_some(), node_weight.is_some(), node_bias.is_some()];
        let (dx, dw, db) = kernels::backward(
            values(&x),
            values(&weight),
            values(&out_grad),
            [m, k, n],
            wanted,
        );
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, flex_tensor(dx, vec![m, k]));
        }
        if let (Some(node), Some(dw)) = (node_weight, dw) {
            grads.register::<Flex>(node.id, flex_tensor(dw, vec![k, n]));
        }
        if let (Some(node), Some(db)) = (node_bias, db) {
            grads.register::<Flex>(node.id, flex_tensor(db, vec![n]));
        }
    }
}

impl<C: CheckpointStrategy> FlexLinear for Autodiff<Flex, C> {
    fn flex_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, weight, bias) = (
            contiguous(x.primitive()),
            contiguous(weight.primitive()),
            bias.into_primitive(),
        );
        match FlexLinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::flex_linear(x.clone(), weight.clone(), bias);
                prep.finish((x, weight), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::flex_linear(x, weight, bias)),
        }
    }
}

/// `layer.forward(x)`: through [`FlexLinear`] for f32 burn-flex tensors, through one
/// libtorch `addmm` for a layer with a bias on burn-tch ([`crate::torch_ops`]), else burn's own.
///
/// # Shapes
/// - `x`: `[..., d_in]` -> `[..., d_out]`
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let weight = layer.weight.val();
    let d_out = weight.dims()[1];
    #[cfg(feature = "tch")]
    if let (true, Some(bias)) = (crate::torch_ops::on_libtorch(&x), &layer.bias) {
        use crate::torch_ops::TorchOps;
        let bias = bias.val();
        if D >= 2 && x.dtype() == weight.dtype() && bias.dtype() == weight.dtype() {
            return on_rows(x, d_out, |x| {
                Tensor::from_dispatch(<Dispatch as TorchOps>::torch_linear(
                    x.into_dispatch(),
                    weight.into_dispatch(),
                    bias.into_dispatch(),
                ))
            });
        }
    }
    if D < 2 || !on_flex_f32(&x) || weight.dtype() != DType::F32 {
        return layer.forward(x);
    }
    let bias = match &layer.bias {
        Some(bias) => bias.val(),
        None => Tensor::zeros([d_out], &x.device()),
    };
    on_rows(x, d_out, |x| {
        Tensor::from_dispatch(<Dispatch as FlexLinear>::flex_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
        ))
    })
}

/// `f` on the rows of x `[..., d_in]` as `[rows, d_in]`, its `[rows, d_out]` back as
/// `[..., d_out]`.
fn on_rows<const D: usize>(
    x: Tensor<D>,
    d_out: usize,
    f: impl FnOnce(Tensor<2>) -> Tensor<2>,
) -> Tensor<D> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = f(x.reshape([rows, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output and all three gradients against burn's `Linear`, through burn-flex's autodiff, on
    /// 2-D and 3-D inputs, with and without bias, and a non-contiguous input.
    #[test]
    fn matches_burns_linear_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(1);
        let data =
            Tensor::<3>::random([3, 4, 6], Distribution::Normal(0.0, 1.0), &device).into_data();
        for bias in [true, false] {
            let layer: Linear = LinearConfig::new(6, 5).with_bias(bias).init(&device);
            // the input as it is, and a view with other strides (the [4, 3, 6] transpose)
            for transpose in [false, true] {
                let dy = Tensor::<3>::random([3, 4, 5], Distribution::Normal(0.0, 1.0), &device);
                // (y, dx, dW, db) through `forward`, from a fresh leaf x
                let run = |forward: &dyn Fn(Tensor<3>) -> Tensor<3>| {
                    let x = Tensor::<3>::from_data(data.clone(), &device).require_grad();
                    let input = if transpose {
                        x.clone().swap_dims(0, 1)
                    } else {
                        x.clone()
                    };
                    let y = forward(input);
                    let dy = if transpose {
                        dy.clone().swap_dims(0, 1)
                    } else {
                        dy.clone()
                    };
                    let grads = (y.clone() * dy).sum().backward();
                    let db = layer.bias.as_ref().map(|b| b.val().grad(&grads).unwrap());
                    let dw = layer.weight.val().grad(&grads).unwrap();
                    (y, x.grad(&grads).unwrap(), dw, db)
                };
                let (y, dx, dw, db) = run(&|x| linear(&layer, x));
                let (y_ref, dx_ref, dw_ref, db_ref) = run(&|x| layer.forward(x));
                assert_eq!(y.dims(), y_ref.dims());
                let what = format!("bias {bias}, transposed {transpose}");
                assert!(max_diff(y, y_ref) < 1e-5, "{what}: forward");
                assert!(max_diff(dx, dx_ref) < 1e-5, "{what}: dx");
                assert!(max_diff(dw, dw_ref) < 1e-5, "{what}: dW");
                if let (Some(db), Some(db_ref)) = (db, db_ref) {
                    assert!(max_diff(db, db_ref) < 1e-5, "{what}: db");
                }
            }
        }
        // 2-D input
        let layer: Linear = LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::random([7, 3], Distribution::Normal(0.0, 1.0), &device);
        assert!(max_diff(linear(&layer, x.clone()), layer.forward(x)) < 1e-5);
    }

    /// Without autodiff (sampling) the same numbers come out.
    #[test]
    fn inference_path_matches_too() {
        let device = Device::flex();
        let layer: Linear = LinearConfig::new(4, 3).init(&device);
        let x = Tensor::<3>::random([2, 5, 4], Distribution::Normal(0.0, 1.0), &device);
        assert!(max_diff(linear(&layer, x.clone()), layer.forward(x)) < 1e-5);
    }
}
