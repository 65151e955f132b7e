//! A faster 2-D convolution for burn-flex, forward and backward, as a burn backend extension.
//!
//! burn-flex convolves by converting each input to NHWC and reshuffling the weights on every
//! call, takes the input gradient as a transposed convolution with scalar scatter loops and the
//! weight gradient as a convolution whose kernel is the whole output gradient. At the channel
//! counts of this project's VAE and U-Net that makes a 3x3 convolution's training step 2-4x
//! slower than PyTorch's (docs/PERFORMANCE.md). [`kernels`] does the same work as im2col + gemm
//! in NCHW, and [`conv2d`] routes a [`Conv2d`] through it where it applies: a burn-flex tensor
//! (with or without autodiff) in f32, groups 1, dilation 1, symmetric padding. Everything else
//! (bf16, ...) takes burn's own `Conv2d::forward`; on burn-tch, libtorch's own convolution
//! ([`crate::torch_ops`]).
//!
//! The extension mechanism is burn 0.22's own (`#[backend_extension]`): the operation has a
//! burn-flex implementation and an autodiff one that records a backward step calling
//! [`kernels::backward`].

pub mod kernels;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Tensor};

use crate::flex::{contiguous, flex_tensor, on_flex_f32, values};
use kernels::{ConvGeometry, Wanted};

/// The convolution as a backend operation: burn-flex computes it with [`kernels`], autodiff
/// wraps it with its backward.
#[backend_extension(Flex, Autodiff)]
pub trait GemmConv: Backend {
    /// y = conv(x, weight) + bias with the given stride and (symmetric) padding.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// The geometry of x [n, c_in, h, w] convolved with weight [c_out, c_in, kh, kw].
fn geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
) -> ConvGeometry {
    let [batch, c_in, h, w]: [usize; 4] = x.shape().dims();
    let [c_out, _, kh, kw]: [usize; 4] = weight.shape().dims();
    ConvGeometry {
        batch,
        c_in,
        h,
        w,
        c_out,
        kernel: [kh, kw],
        stride,
        padding,
    }
}

impl GemmConv for Flex {
    fn gemm_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        let g = geometry(&x, &weight, stride, padding);
        let (x, weight, bias) = (contiguous(&x), contiguous(&weight), contiguous(&bias));
        let y = kernels::forward(values(&x), values(&weight), Some(values(&bias)), &g);
        let [oh, ow] = g.out_hw();
        flex_tensor(y, vec![g.batch, g.c_out, oh, ow])
    }
}

/// The backward step: x and weight (contiguous) and the convolution's parameters.
#[derive(Debug)]
struct GemmConvBackward;

impl Backward<Flex, 3> for GemmConvBackward {
    type State = (FlexTensor, FlexTensor, [usize; 2], [usize; 2]);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let out_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, weight, stride, padding) = ops.state;
        let g = geometry(&x, &weight, stride, padding);
        let wanted = Wanted {
            x: node_x.is_some(),
            weight: node_weight.is_some(),
            bias: node_bias.is_some(),
        };
        let (dx, dw, db) =
            kernels::backward(values(&x), values(&weight), values(&out_grad), &g, wanted);
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, flex_tensor(dx, vec![g.batch, g.c_in, g.h, g.w]));
        }
        if let (Some(node), Some(dw)) = (node_weight, dw) {
            let shape = vec![g.c_out, g.c_in, g.kernel[0], g.kernel[1]];
            grads.register::<Flex>(node.id, flex_tensor(dw, shape));
        }
        if let (Some(node), Some(db)) = (node_bias, db) {
            grads.register::<Flex>(node.id, flex_tensor(db, vec![g.c_out]));
        }
    }
}

impl<C: CheckpointStrategy> GemmConv for Autodiff<Flex, C> {
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, weight, bias) = (
            contiguous(x.primitive()),
            contiguous(weight.primitive()),
            bias.into_primitive(),
        );
        match GemmConvBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = Flex::gemm_conv2d(x.clone(), weight.clone(), bias, stride, padding);
                prep.finish((x, weight, stride, padding), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::gemm_conv2d(x, weight, bias, stride, padding))
            }
        }
    }
}

/// Symmetric padding [ph, pw] of a padding config, if it has one.
fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

/// `conv.forward(x)`, through [`GemmConv`] where it applies (module docs), else burn's own.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]` -> `[batch, c_out, h_out, w_out]`
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val();
    let padding = symmetric_padding(&conv.padding);
    #[cfg(feature = "tch")]
    if let (true, Some(padding)) = (crate::torch_ops::on_libtorch(&x), padding) {
        return torch_conv2d(conv, x, weight, padding);
    }
    let applies = on_flex_f32(&x)
        && weight.dtype() == DType::F32
        && conv.groups == 1
        && conv.dilation == [1, 1]
        && padding.is_some();
    let Some(padding) = padding.filter(|_| applies) else {
        return conv.forward(x);
    };
    let [c_out, ..] = weight.dims();
    let bias = match &conv.bias {
        Some(bias) => bias.val(),
        None => Tensor::zeros([c_out], &x.device()),
    };
    Tensor::from_dispatch(<Dispatch as GemmConv>::gemm_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        conv.stride,
        padding,
    ))
}

/// [`conv2d`] on burn-tch: libtorch's convolution and its backward ([`crate::torch_ops`]).
#[cfg(feature = "tch")]
fn torch_conv2d(conv: &Conv2d, x: Tensor<4>, weight: Tensor<4>, padding: [usize; 2]) -> Tensor<4> {
    use crate::torch_ops::TorchOps;
    let bias = match &conv.bias {
        Some(bias) => bias.val(),
        None => crate::precision::to_dtype(
            Tensor::zeros([weight.dims()[0]], &x.device()),
            weight.dtype(),
        ),
    };
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        conv.stride,
        padding,
        conv.dilation,
        conv.groups,
    ))
}

/// The convolution kinds the models use, on small shapes: 3x3 stride 1 and 2, 1x1 without bias
/// (what the tests of every backend's convolution run).
#[cfg(test)]
pub(crate) fn layer_kinds() -> [burn::nn::conv::Conv2dConfig; 3] {
    use burn::nn::conv::Conv2dConfig;
    let same = PaddingConfig2d::Explicit(1, 1, 1, 1);
    [
        Conv2dConfig::new([3, 5], [3, 3]).with_padding(same.clone()),
        Conv2dConfig::new([4, 2], [3, 3])
            .with_stride([2, 2])
            .with_padding(same),
        Conv2dConfig::new([4, 6], [1, 1]).with_bias(false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Output and all three gradients against burn's own conv2d, through burn-flex's autodiff,
    /// for the layer kinds the models use (3x3 stride 1 and 2, 1x1 without bias).
    #[test]
    fn matches_burns_conv2d_forward_and_backward() {
        let device = Device::flex().autodiff();
        for config in layer_kinds() {
            let conv: Conv2d = config.init(&device);
            let x = Tensor::<4>::random(
                [3, config.channels[0], 7, 6],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .require_grad();
            let reference = conv.forward(x.clone());
            let ours = conv2d(&conv, x.clone());
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_diff(ours.clone(), reference.clone()) < 1e-5,
                "{config:?}: forward"
            );
            let dy = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &device);
            let grads_ref = (reference * dy.clone()).sum().backward();
            let grads = (ours * dy).sum().backward();
            let gx = |g| x.grad(g).unwrap();
            assert!(
                max_diff(gx(&grads), gx(&grads_ref)) < 1e-4,
                "{config:?}: dx"
            );
            let gw = |g| conv.weight.val().grad(g).unwrap();
            assert!(
                max_diff(gw(&grads), gw(&grads_ref)) < 1e-4,
                "{config:?}: dW"
            );
            if let Some(bias) = &conv.bias {
                let gb = |g| {
                    bias.val()
                        .grad(g)
                        .unwrap()
                        .reshape([1, 1, 1, config.channels[1]])
                };
                assert!(
                    max_diff(gb(&grads), gb(&grads_ref)) < 1e-4,
                    "{config:?}: db"
                );
            }
        }
    }

    /// Without autodiff (sampling) the same numbers come out.
    #[test]
    fn inference_path_matches_too() {
        let device = Device::flex();
        let conv: Conv2d = Conv2dConfig::new([2, 3], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<4>::random([2, 2, 5, 5], Distribution::Normal(0.0, 1.0), &device);
        assert!(max_diff(conv2d(&conv, x.clone()), conv.forward(x)) < 1e-5);
    }

    #[test]
    fn padding_kinds() {
        assert_eq!(symmetric_padding(&PaddingConfig2d::Valid), Some([0, 0]));
        assert_eq!(
            symmetric_padding(&PaddingConfig2d::Explicit(1, 2, 1, 2)),
            Some([1, 2])
        );
        assert_eq!(
            symmetric_padding(&PaddingConfig2d::Explicit(0, 0, 1, 1)),
            None
        );
        assert_eq!(symmetric_padding(&PaddingConfig2d::Same), None);
    }
}
