//! The layers' hot operations on burn-tch through PyTorch's own kernels, forward and backward,
//! as a burn backend extension (the `tch` build only).
//!
//! Under autodiff, burn-tch runs burn's generic backward formulas, not PyTorch's: the weight
//! gradient of a convolution is a second convolution whose kernel is the whole output gradient
//! (slow in cuDNN and in oneDNN), attention is decomposed into matmul + masked softmax (no flash
//! or memory-efficient attention), and GroupNorm, LayerNorm, SiLU and GELU are chains of
//! elementwise operations, one kernel and one saved tensor each. [`TorchOps`] runs each of these
//! layers as one libtorch call and takes its backward from torch's autograd: the forward records
//! a torch graph from leaf copies of the inputs, and the backward asks torch for the
//! vector-Jacobian product, `grad_i = d(sum(y * dy)) / d input_i` ([`vjp`]). That is the same
//! backward PyTorch eager runs (cuDNN / oneDNN convolution backward, fused attention backward,
//! native norm backward), on the CPU and on CUDA, in every dtype libtorch supports (bf16
//! included).
//!
//! Only the operation's own torch graph lives between forward and backward; burn owns everything
//! else. Tensors torch saved for the backward are also held as burn tensors in the backward
//! state, so that burn-tch never updates them in place (it does when it holds the only
//! reference) before torch reads them.

// burn 0.22.1 marks burn-tch deprecated in favour of its CubeCL backends, whose CUDA build
// downloads LLVM and cannot be built on the project's machines: burn-tch is the GPU path here.
#![allow(deprecated)]

pub(crate) mod flat;
#[cfg(test)]
mod tests;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchDevice, LibTorch, backend_extension};
use burn::tensor::Tensor;

/// The operations, each one libtorch call with torch's own backward under autodiff.
#[backend_extension(LibTorch, Autodiff)]
pub trait TorchOps: Backend {
    /// conv2d(x, weight) + bias.
    fn torch_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    ) -> FloatTensor<Self>;

    /// silu?(groupnorm(x) * gamma + beta) over `groups` groups of x [n, c, ...].
    fn torch_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last axis: (x - mean) / sqrt(var + epsilon) * gamma + beta.
    fn torch_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// softmax(q k^T / sqrt(d) + bias) v; `bias` broadcasts to [b, h, queries, keys] (0 where a
    /// key takes part, -inf where it is masked out).
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// softmax(q k^T / sqrt(d)) v without a mask.
    fn torch_attention_unmasked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// x sigmoid(x), or with `gelu_tanh` PyTorch's `gelu(x, approximate="tanh")`.
    fn torch_activation(x: FloatTensor<Self>, gelu_tanh: bool) -> FloatTensor<Self>;
}

/// One of [`TorchOps`] with its parameters: what [`TorchOp::apply`] computes from its inputs.
#[derive(Clone, Copy, Debug)]
enum TorchOp {
    /// inputs x, weight, bias
    Conv2d {
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    },
    /// inputs x, gamma, beta
    GroupNorm {
        groups: usize,
        epsilon: f64,
        silu: bool,
    },
    /// inputs x, gamma, beta
    LayerNorm { epsilon: f64 },
    /// inputs q, k, v and optionally an additive bias
    Attention,
    /// input x
    Activation { gelu_tanh: bool },
}

fn ints<const N: usize>(v: [usize; N]) -> [i64; N] {
    v.map(|d| d as i64)
}

impl TorchOp {
    /// The libtorch call on these inputs (in the order of the variant's doc).
    fn apply(self, inputs: &[tch::Tensor]) -> tch::Tensor {
        match (self, inputs) {
            (
                TorchOp::Conv2d {
                    stride,
                    padding,
                    dilation,
                    groups,
                },
                [x, weight, bias],
            ) => x.conv2d(
                weight,
                Some(bias),
                ints(stride),
                ints(padding),
                ints(dilation),
                groups as i64,
            ),
            (
                TorchOp::GroupNorm {
                    groups,
                    epsilon,
                    silu,
                },
                [x, gamma, beta],
            ) => {
                let y = x.group_norm(groups as i64, Some(gamma), Some(beta), epsilon, true);
                if silu { y.silu() } else { y }
            }
            (TorchOp::LayerNorm { epsilon }, [x, gamma, beta]) => {
                let last = *x.size().last().expect("a tensor with at least one axis");
                x.layer_norm([last], Some(gamma), Some(beta), epsilon, true)
            }
            (TorchOp::Attention, [q, k, v, rest @ ..]) => {
                tch::Tensor::scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    rest.first(),
                    0.0,
                    false,
                    None,
                    false,
                )
            }
            (TorchOp::Activation { gelu_tanh }, [x]) => {
                if gelu_tanh {
                    x.gelu("tanh")
                } else {
                    x.silu()
                }
            }
            (op, inputs) => unreachable!("{op:?} called with {} inputs", inputs.len()),
        }
    }

    /// The forward on burn-tch tensors, without autodiff.
    fn run<const N: usize>(self, inputs: [TchTensor; N]) -> TchTensor {
        let tensors = inputs.map(|t| t.tensor);
        TchTensor::new(self.apply(&tensors))
    }
}

impl TorchOps for LibTorch {
    fn torch_conv2d(
        x: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    ) -> TchTensor {
        let op = TorchOp::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        };
        op.run([x, weight, bias])
    }

    fn torch_group_norm(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> TchTensor {
        let op = TorchOp::GroupNorm {
            groups,
            epsilon,
            silu,
        };
        op.run([x, gamma, beta])
    }

    fn torch_layer_norm(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        epsilon: f64,
    ) -> TchTensor {
        TorchOp::LayerNorm { epsilon }.run([x, gamma, beta])
    }

    fn torch_attention(q: TchTensor, k: TchTensor, v: TchTensor, bias: TchTensor) -> TchTensor {
        TorchOp::Attention.run([q, k, v, bias])
    }

    fn torch_attention_unmasked(q: TchTensor, k: TchTensor, v: TchTensor) -> TchTensor {
        TorchOp::Attention.run([q, k, v])
    }

    fn torch_activation(x: TchTensor, gelu_tanh: bool) -> TchTensor {
        TorchOp::Activation { gelu_tanh }.run([x])
    }
}

/// What the backward needs: torch's output (still attached to its graph), the leaf copy of each
/// input whose gradient is wanted, and burn's own handles on the inputs and the output (held so
/// that burn-tch sees them shared and never writes them in place while torch may read them).
#[derive(Clone, Debug)]
struct VjpState {
    output: TchTensor,
    leaves: Vec<Option<TchTensor>>,
    _held: Vec<TchTensor>,
}

/// The backward step of every [`TorchOps`] operation: torch's vector-Jacobian product.
#[derive(Debug)]
struct TorchVjp;

impl<const N: usize> Backward<LibTorch, N> for TorchVjp {
    type State = VjpState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node);
        let VjpState { output, leaves, .. } = ops.state;
        let wanted: Vec<(usize, &tch::Tensor)> = leaves
            .iter()
            .enumerate()
            .filter_map(|(i, leaf)| Some((i, &leaf.as_ref()?.tensor)))
            .collect();
        // d(sum(y * dy)) / d input = dy^T dy/d input: the gradient torch's backward of y sends
        // to each input when y's gradient is dy. Grad mode is torch's per thread: the product
        // must be recorded whichever thread burn runs its backward on.
        let inputs: Vec<&tch::Tensor> = wanted.iter().map(|(_, t)| *t).collect();
        let input_grads = tch::with_grad(|| {
            let root = (&output.tensor * &dy.tensor).sum(None::<tch::Kind>);
            tch::Tensor::run_backward(&[root], &inputs, false, false)
        });
        for ((i, _), grad) in wanted.into_iter().zip(input_grads) {
            if let Some(node) = &ops.parents[i] {
                grads.register::<LibTorch>(node.id, TchTensor::new(grad));
            }
        }
    }
}

/// `op` on autodiff tensors: untracked, the plain libtorch call; tracked, the call on leaf
/// copies of the inputs (requiring grad where burn wants the input's gradient) inside torch's
/// autograd, with [`TorchVjp`] as the backward.
fn vjp<C: CheckpointStrategy, const N: usize>(
    op: TorchOp,
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let nodes = inputs.each_ref().map(|t| t.node());
    let wants_grad = inputs.each_ref().map(|t| t.is_tracked());
    let primitives = inputs.map(|t| t.into_primitive());
    match TorchVjp.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::UnTracked(prep) => prep.finish(op.run(primitives)),
        OpsKind::Tracked(prep) => {
            let leaves: Vec<Option<TchTensor>> = primitives
                .iter()
                .zip(wants_grad)
                .map(|(t, wants)| {
                    wants.then(|| TchTensor::new(t.tensor.detach().set_requires_grad(true)))
                })
                .collect();
            let operands: Vec<tch::Tensor> = primitives
                .iter()
                .zip(&leaves)
                .map(|(t, leaf)| leaf.as_ref().unwrap_or(t).tensor.shallow_clone())
                .collect();
            let output = tch::with_grad(|| op.apply(&operands));
            let y = TchTensor::new(output.detach());
            let mut held = primitives.to_vec();
            held.push(y.clone());
            let state = VjpState {
                output: TchTensor::new(output),
                leaves,
                _held: held,
            };
            prep.finish(state, y)
        }
    }
}

impl<C: CheckpointStrategy> TorchOps for Autodiff<LibTorch, C> {
    fn torch_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    ) -> FloatTensor<Self> {
        let op = TorchOp::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        };
        vjp::<C, _>(op, [x, weight, bias])
    }

    fn torch_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let op = TorchOp::GroupNorm {
            groups,
            epsilon,
            silu,
        };
        vjp::<C, _>(op, [x, gamma, beta])
    }

    fn torch_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        vjp::<C, _>(TorchOp::LayerNorm { epsilon }, [x, gamma, beta])
    }

    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        vjp::<C, _>(TorchOp::Attention, [q, k, v, bias])
    }

    fn torch_attention_unmasked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        vjp::<C, _>(TorchOp::Attention, [q, k, v])
    }

    fn torch_activation(x: FloatTensor<Self>, gelu_tanh: bool) -> FloatTensor<Self> {
        vjp::<C, _>(TorchOp::Activation { gelu_tanh }, [x])
    }
}

/// Whether `x` lives on burn-tch (libtorch, CPU or CUDA; with or without autodiff): where
/// [`TorchOps`] runs.
pub fn on_libtorch<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(
        x.device().as_dispatch().clone().inner(),
        DispatchDevice::LibTorch(_)
    )
}
