//! The layers' hot operations on burn-tch through PyTorch's own kernels, forward and backward,
//! as a burn backend extension (the `tch` build only).
//!
//! Under autodiff, burn-tch runs burn's generic backward formulas, not PyTorch's: the weight
//! gradient of a convolution is a second convolution whose kernel is the whole output gradient
//! (slow in cuDNN and in oneDNN), attention is decomposed into matmul + masked softmax (no flash
//! or memory-efficient attention), and GroupNorm, LayerNorm, SiLU and GELU are chains of
//! elementwise operations, one kernel and one saved tensor each. [`TorchOps`] runs each of these
//! layers as one libtorch call, and its backward as the call PyTorch's autograd node for it
//! makes ([`Saved::backward`]): `convolution_backward` (cuDNN / oneDNN),
//! `native_group_norm_backward`, `native_layer_norm_backward`, `silu_backward`,
//! `gelu_backward`, and the CPU flash attention's backward (the ones tch does not bind come from
//! `csrc/torch_backward.cpp`, [`native`]). The forward calls the native operation that PyTorch's
//! composite one calls (`native_group_norm` for `group_norm`, ...) and keeps what that
//! backward reads (the input, the mean and rstd, ...): the numbers are PyTorch's, in every
//! dtype libtorch supports (bf16 included).
//!
//! Attention runs on the kernel libtorch's `scaled_dot_product_attention` picks. Two are called
//! directly with their backward: the CPU flash kernel, and on CUDA the memory-efficient one
//! (f32), whose forward (with SDPA's mask preparation) and backward come from the C++ file. The
//! CUDA one cannot run on a CPU, so the first time a process would call it, [`check_attention`]
//! compares it with torch's autograd on those inputs; if it fails, a warning says why and
//! attention stays recorded. The others (flash and cuDNN attention on CUDA, in bf16) are
//! recorded by torch's autograd from leaf copies of the inputs, and their backward is
//! `torch.autograd.grad` with the output gradient ([`Saved::Recorded`]). That was every
//! operation's backward before: about 30 us of host time per call on the CPU (torch's autograd
//! engine), and on CUDA a hand-off to the engine's device thread and back.
//!
//! Tensors the backward reads are also held as burn tensors in the backward state, so that
//! burn-tch never updates them in place (it does when it holds the only reference) before the
//! backward reads them.

// burn 0.22.1 marks burn-tch deprecated in favour of its CubeCL backends, whose CUDA build
// downloads LLVM and cannot be built on the project's machines: burn-tch is the GPU path here.
#![allow(deprecated)]

pub(crate) mod flat;
mod native;
#[cfg(test)]
mod tests;
pub mod upload;

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

    /// x W + b for x [rows, d_in], W [d_in, d_out], b [d_out]: one `addmm`, as PyTorch's
    /// `nn.Linear` (burn's linear is a product and then an addition).
    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
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
    /// inputs x, weight, bias
    Linear,
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
            (TorchOp::Linear, [x, weight, bias]) => bias.addmm(x, weight),
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

    fn torch_linear(x: TchTensor, weight: TchTensor, bias: TchTensor) -> TchTensor {
        TorchOp::Linear.run([x, weight, bias])
    }
}

/// What an operation's backward reads, saved by its forward. The inputs and the output are
/// kept as burn handles (clones of burn's own `TchTensor`s), so that burn-tch sees them shared
/// and never writes them in place before the backward has read them.
#[derive(Clone, Debug)]
enum Saved {
    Conv2d {
        x: TchTensor,
        weight: TchTensor,
    },
    /// `normalized` is the group norm's output before the SiLU, when there is one.
    GroupNorm {
        x: TchTensor,
        gamma: TchTensor,
        mean: TchTensor,
        rstd: TchTensor,
        normalized: Option<TchTensor>,
        sizes: [i64; 4],
    },
    LayerNorm {
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        mean: TchTensor,
        rstd: TchTensor,
    },
    /// libtorch's CPU flash attention (what `scaled_dot_product_attention` runs on the CPU).
    FlashCpu {
        q: TchTensor,
        k: TchTensor,
        v: TchTensor,
        bias: Option<TchTensor>,
        out: TchTensor,
        logsumexp: TchTensor,
    },
    /// libtorch's memory-efficient attention (what `scaled_dot_product_attention` runs on CUDA
    /// in f32), called directly once [`efficient_checked`] has compared it with autograd.
    Efficient(EfficientSaved),
    Activation {
        x: TchTensor,
    },
    Linear {
        x: TchTensor,
        weight: TchTensor,
    },
    /// Anything else: the operation recorded by torch's autograd from leaf copies of the inputs
    /// (those whose gradient burn wants), its backward `torch.autograd.grad`.
    Recorded {
        output: TchTensor,
        leaves: Vec<Option<TchTensor>>,
        _held: Vec<TchTensor>,
    },
}

/// A burn handle on `t` that is contiguous: `t` itself if it is, else a contiguous copy.
fn contiguous(t: &TchTensor) -> TchTensor {
    if t.tensor.is_contiguous() {
        t.clone()
    } else {
        TchTensor::new(t.tensor.contiguous())
    }
}

impl TorchOp {
    /// The forward under autodiff: the output and what the backward reads. Each is the native
    /// operation PyTorch's composite one calls (`group_norm` -> `native_group_norm`, ...), so
    /// the output is the same, and the backward is the call PyTorch's autograd node makes.
    fn forward_saving(self, inputs: &[TchTensor], wants: &[bool]) -> (TchTensor, Saved) {
        if backward_through_autograd() {
            return self.record(inputs, wants);
        }
        match (self, inputs) {
            (TorchOp::Conv2d { .. }, [x, weight, bias]) => {
                let y = self.run([x.clone(), weight.clone(), bias.clone()]);
                let saved = Saved::Conv2d {
                    x: x.clone(),
                    weight: weight.clone(),
                };
                (y, saved)
            }
            (
                TorchOp::GroupNorm {
                    groups,
                    epsilon,
                    silu,
                },
                [x, gamma, beta],
            ) => {
                let x = contiguous(x);
                let size = x.tensor.size();
                let (n, c) = (size[0], size[1]);
                let hxw = size[2..].iter().product::<i64>();
                let sizes = [n, c, hxw, groups as i64];
                let gamma = contiguous(gamma);
                let (out, mean, rstd) = x.tensor.native_group_norm(
                    Some(&gamma.tensor),
                    Some(&beta.tensor.contiguous()),
                    n,
                    c,
                    hxw,
                    groups as i64,
                    epsilon,
                );
                let (y, normalized) = if silu {
                    (out.silu(), Some(TchTensor::new(out)))
                } else {
                    (out, None)
                };
                let saved = Saved::GroupNorm {
                    x,
                    gamma,
                    mean: TchTensor::new(mean),
                    rstd: TchTensor::new(rstd),
                    normalized,
                    sizes,
                };
                (TchTensor::new(y), saved)
            }
            (TorchOp::LayerNorm { epsilon }, [x, gamma, beta]) => {
                let last = *x
                    .tensor
                    .size()
                    .last()
                    .expect("a tensor with at least one axis");
                let (y, mean, rstd) = x.tensor.native_layer_norm(
                    [last],
                    Some(&gamma.tensor),
                    Some(&beta.tensor),
                    epsilon,
                );
                let saved = Saved::LayerNorm {
                    x: x.clone(),
                    gamma: gamma.clone(),
                    beta: beta.clone(),
                    mean: TchTensor::new(mean),
                    rstd: TchTensor::new(rstd),
                };
                (TchTensor::new(y), saved)
            }
            // (a mask that wants a gradient goes through torch's autograd)
            (TorchOp::Attention, [q, k, v, rest @ ..])
                if !wants.get(3).copied().unwrap_or(false)
                    && efficient_on_cuda(q, k, v, rest.first()) =>
            {
                let (y, saved) =
                    EfficientSaved::forward([q, k, v], rest.first()).unwrap_or_else(|e| {
                        panic!("libtorch _scaled_dot_product_efficient_attention: {e}")
                    });
                (y, Saved::Efficient(saved))
            }
            (TorchOp::Attention, [q, k, v, rest @ ..])
                if !wants.get(3).copied().unwrap_or(false)
                    && flash_on_cpu(q, k, v, rest.first()) =>
            {
                let bias = rest.first();
                let (out, logsumexp) =
                    tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
                        &q.tensor,
                        &k.tensor,
                        &v.tensor,
                        0.0,
                        false,
                        bias.map(|b| &b.tensor),
                        None,
                    );
                let y = TchTensor::new(out);
                let saved = Saved::FlashCpu {
                    q: q.clone(),
                    k: k.clone(),
                    v: v.clone(),
                    bias: bias.cloned(),
                    out: y.clone(),
                    logsumexp: TchTensor::new(logsumexp),
                };
                (y, saved)
            }
            (TorchOp::Activation { .. }, [x]) => {
                let y = self.run([x.clone()]);
                (y, Saved::Activation { x: x.clone() })
            }
            (TorchOp::Linear, [x, weight, bias]) => {
                let y = self.run([x.clone(), weight.clone(), bias.clone()]);
                let saved = Saved::Linear {
                    x: x.clone(),
                    weight: weight.clone(),
                };
                (y, saved)
            }
            _ => self.record(inputs, wants),
        }
    }

    /// The forward recorded by torch's autograd, from leaf copies of the inputs whose gradient
    /// is wanted (the backward of [`Saved::Recorded`]).
    fn record(self, inputs: &[TchTensor], wants: &[bool]) -> (TchTensor, Saved) {
        let leaves: Vec<Option<TchTensor>> = inputs
            .iter()
            .zip(wants)
            .map(|(t, &wants)| {
                wants.then(|| TchTensor::new(t.tensor.detach().set_requires_grad(true)))
            })
            .collect();
        let operands: Vec<tch::Tensor> = inputs
            .iter()
            .zip(&leaves)
            .map(|(t, leaf)| leaf.as_ref().unwrap_or(t).tensor.shallow_clone())
            .collect();
        let output = tch::with_grad(|| self.apply(&operands));
        let y = TchTensor::new(output.detach());
        let mut held = inputs.to_vec();
        held.push(y.clone());
        let saved = Saved::Recorded {
            output: TchTensor::new(output),
            leaves,
            _held: held,
        };
        (y, saved)
    }
}

/// `LDM_TORCH_BACKWARD=autograd`: every operation's backward through torch's autograd
/// ([`Saved::Recorded`]) instead of the direct kernels, to measure the difference on a device
/// (`scripts/gpu_session.sh phases`) or to step around a backward kernel that fails there.
/// Read once; `direct` (the default) or unset keeps the direct kernels.
fn backward_through_autograd() -> bool {
    static AUTOGRAD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AUTOGRAD.get_or_init(|| match std::env::var("LDM_TORCH_BACKWARD").as_deref() {
        Ok("autograd") => true,
        Ok("direct") | Err(_) => false,
        Ok(other) => {
            eprintln!(
                "warning: LDM_TORCH_BACKWARD={other}: expected direct or autograd; using direct"
            );
            false
        }
    })
}

/// The kernel libtorch's `scaled_dot_product_attention` picks for these inputs
/// (`_fused_sdp_choice`: ATen's `SDPBackend`, 0 math, 1 flash, 2 memory-efficient, 3 cuDNN).
fn sdp_choice(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: Option<&TchTensor>) -> i64 {
    tch::Tensor::internal_fused_sdp_choice(
        &q.tensor,
        &k.tensor,
        &v.tensor,
        bias.map(|b| &b.tensor),
        0.0,
        false,
        None,
        false,
    )
}

/// Whether libtorch's `scaled_dot_product_attention` would run these on its CPU flash kernel,
/// which [`Saved::FlashCpu`] then calls directly.
fn flash_on_cpu(q: &TchTensor, k: &TchTensor, v: &TchTensor, bias: Option<&TchTensor>) -> bool {
    const FLASH: i64 = 1;
    q.tensor.device() == tch::Device::Cpu && sdp_choice(q, k, v, bias) == FLASH
}

/// Whether libtorch's `scaled_dot_product_attention` would run these on its memory-efficient
/// kernel (CUDA), and calling that kernel directly passed [`efficient_checked`]: then
/// [`Saved::Efficient`] calls it and its backward directly.
fn efficient_on_cuda(
    q: &TchTensor,
    k: &TchTensor,
    v: &TchTensor,
    bias: Option<&TchTensor>,
) -> bool {
    const EFFICIENT: i64 = 2;
    q.tensor.device().is_cuda()
        && sdp_choice(q, k, v, bias) == EFFICIENT
        && efficient_checked(q, k, v, bias)
}

/// The first time the memory-efficient kernel would be called directly in this process:
/// whether [`check_attention`] passes on those inputs. Its forward and backward run no kernel
/// on a CPU, so this is where the direct path first meets the kernel; if it fails (an error
/// or a mismatch), a warning names why and attention stays on torch's autograd
/// ([`Saved::Recorded`]). [`efficient_attention_check`] reports the outcome.
fn efficient_checked(
    q: &TchTensor,
    k: &TchTensor,
    v: &TchTensor,
    bias: Option<&TchTensor>,
) -> bool {
    EFFICIENT_CHECK
        .get_or_init(|| {
            let inputs: Vec<TchTensor> = [q, k, v].into_iter().chain(bias).cloned().collect();
            let outcome = check_attention(&efficient_direct, &inputs);
            if let Err(why) = &outcome {
                eprintln!(
                    "warning: libtorch's memory-efficient attention called directly: {why}; \
                     attention's backward goes through torch's autograd instead"
                );
            }
            outcome
        })
        .is_ok()
}

static EFFICIENT_CHECK: std::sync::OnceLock<Result<f64, String>> = std::sync::OnceLock::new();

/// The outcome of the check of the direct memory-efficient attention path in this process, if
/// it ran (on CUDA, at the first attention libtorch runs on that kernel): the largest relative
/// difference to torch's autograd, or why the path is not used.
pub fn efficient_attention_check() -> Option<Result<f64, String>> {
    EFFICIENT_CHECK.get().cloned()
}

/// A direct attention path on q, k, v and an optional mask (`inputs`): the output, and d(q),
/// d(k), d(v) for the output gradient `dy`.
type DirectAttention<'a> =
    &'a dyn Fn(&[TchTensor], &tch::Tensor) -> Result<(tch::Tensor, [tch::Tensor; 3]), String>;

/// [`DirectAttention`] on the memory-efficient kernel: [`Saved::Efficient`]'s own forward
/// and backward.
fn efficient_direct(
    inputs: &[TchTensor],
    dy: &tch::Tensor,
) -> Result<(tch::Tensor, [tch::Tensor; 3]), String> {
    let [q, k, v] = [0, 1, 2].map(|i| &inputs[i]);
    let (output, saved) = EfficientSaved::forward([q, k, v], inputs.get(3))?;
    Ok((output.tensor, saved.backward(dy)?))
}

/// What the memory-efficient attention's backward reads (and holds, so that burn-tch never
/// updates it in place).
#[derive(Clone, Debug)]
struct EfficientSaved {
    q: TchTensor,
    k: TchTensor,
    v: TchTensor,
    /// the mask as burn holds it (held only), and as the kernel read it (aligned, expanded)
    _bias: Option<TchTensor>,
    prepared: Option<TchTensor>,
    /// output (burn's handle on it), logsumexp, philox seed and offset
    saved: [TchTensor; 4],
}

impl EfficientSaved {
    /// The output of the memory-efficient kernel on q, k, v and an optional mask, and what its
    /// backward reads; libtorch's message if the kernel cannot run.
    fn forward(
        [q, k, v]: [&TchTensor; 3],
        bias: Option<&TchTensor>,
    ) -> Result<(TchTensor, Self), String> {
        let (saved, prepared) = native::efficient_attention(
            [&q.tensor, &k.tensor, &v.tensor],
            bias.map(|b| &b.tensor),
        )?;
        let saved = saved.map(TchTensor::new);
        let y = saved[0].clone();
        let state = Self {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            _bias: bias.cloned(),
            prepared: prepared.map(TchTensor::new),
            saved,
        };
        Ok((y, state))
    }

    /// d(q), d(k), d(v) for the output gradient `dy` (made contiguous first).
    fn backward(&self, dy: &tch::Tensor) -> Result<[tch::Tensor; 3], String> {
        native::efficient_attention_backward(
            &dy.contiguous(),
            [&self.q.tensor, &self.k.tensor, &self.v.tensor],
            self.prepared.as_ref().map(|b| &b.tensor),
            self.saved.each_ref().map(|t| &t.tensor),
        )
    }
}

/// `direct` against torch's autograd ([`TorchOp::record`]) on `inputs` (q, k, v and an
/// optional mask), with a fixed output gradient (sin 0, sin 1, ...): the output and the three
/// gradients must each lie within a tolerance (2e-3 in f32 and f64, 5e-2 in 16-bit types) of
/// autograd's, relative to the largest magnitude of autograd's. Ok with the largest relative
/// difference; else the first quantity that differs, or the kernel's error.
fn check_attention(direct: DirectAttention, inputs: &[TchTensor]) -> Result<f64, String> {
    let wants = &[true, true, true, false][..inputs.len()];
    let (reference, saved) = TorchOp::Attention.record(inputs, wants);
    let reference = reference.tensor;
    let numel = reference.numel() as i64;
    let dy = tch::Tensor::arange(numel, (tch::Kind::Float, reference.device()))
        .sin()
        .to_kind(reference.kind())
        .view(reference.size().as_slice());
    let expected = saved.backward(TorchOp::Attention, &dy, wants);
    let (output, grads) = direct(inputs, &dy).map_err(|e| native::first_sentence(&e))?;
    let tolerance = match reference.kind() {
        tch::Kind::Float | tch::Kind::Double => 2e-3,
        _ => 5e-2,
    };
    let mut worst = 0.0f64;
    let pairs = [(&output, Some(&reference))]
        .into_iter()
        .chain(grads.iter().zip(expected.iter().map(Option::as_ref)));
    for ((ours, theirs), name) in pairs.zip(["output", "d(query)", "d(key)", "d(value)"]) {
        let theirs = theirs.ok_or_else(|| format!("torch's autograd gave no {name}"))?;
        if ours.size() != theirs.size() {
            return Err(format!(
                "{name} of shape {:?}, expected {:?}",
                ours.size(),
                theirs.size()
            ));
        }
        let (ours, theirs) = (
            ours.to_kind(tch::Kind::Double),
            theirs.to_kind(tch::Kind::Double),
        );
        let scale = theirs.abs().max().double_value(&[]).max(1e-12);
        let relative = (ours - theirs).abs().max().double_value(&[]) / scale;
        if relative.is_nan() || relative > tolerance {
            return Err(format!(
                "{name} differs from torch's autograd by {relative:.2e} of its largest magnitude \
                 (tolerance {tolerance:.0e})"
            ));
        }
        worst = worst.max(relative);
    }
    Ok(worst)
}

impl Saved {
    /// The gradient of each input whose gradient is `wanted`, for the output gradient `dy`.
    fn backward(self, op: TorchOp, dy: &tch::Tensor, wanted: &[bool]) -> Vec<Option<tch::Tensor>> {
        let mask = |i: usize| wanted.get(i).copied().unwrap_or(false);
        match (self, op) {
            (
                Saved::Conv2d { x, weight },
                TorchOp::Conv2d {
                    stride,
                    padding,
                    dilation,
                    groups,
                },
            ) => native::convolution_backward(
                dy,
                &x.tensor,
                &weight.tensor,
                ints(stride),
                ints(padding),
                ints(dilation),
                groups as i64,
                [mask(0), mask(1), mask(2)],
            )
            .into(),
            (
                Saved::GroupNorm {
                    x,
                    gamma,
                    mean,
                    rstd,
                    normalized,
                    sizes,
                },
                _,
            ) => {
                let dy = match &normalized {
                    Some(out) => out.tensor.silu_backward(dy),
                    None => dy.shallow_clone(),
                };
                native::group_norm_backward(
                    &dy,
                    &x.tensor,
                    &mean.tensor,
                    &rstd.tensor,
                    &gamma.tensor,
                    sizes,
                    [mask(0), mask(1), mask(2)],
                )
                .into()
            }
            (
                Saved::LayerNorm {
                    x,
                    gamma,
                    beta,
                    mean,
                    rstd,
                },
                _,
            ) => {
                let last = *x
                    .tensor
                    .size()
                    .last()
                    .expect("a tensor with at least one axis");
                native::layer_norm_backward(
                    dy,
                    &x.tensor,
                    &[last],
                    &mean.tensor,
                    &rstd.tensor,
                    &gamma.tensor,
                    &beta.tensor,
                    [mask(0), mask(1), mask(2)],
                )
                .into()
            }
            (
                Saved::FlashCpu {
                    q,
                    k,
                    v,
                    bias,
                    out,
                    logsumexp,
                },
                _,
            ) => {
                let (dq, dk, dv) =
                    tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                        dy,
                        &q.tensor,
                        &k.tensor,
                        &v.tensor,
                        &out.tensor,
                        &logsumexp.tensor,
                        0.0,
                        false,
                        bias.as_ref().map(|b| &b.tensor),
                        None,
                    );
                vec![Some(dq), Some(dk), Some(dv)]
            }
            (Saved::Efficient(saved), _) => saved
                .backward(dy)
                .unwrap_or_else(|e| {
                    panic!("libtorch _scaled_dot_product_efficient_attention_backward: {e}")
                })
                .map(Some)
                .into(),
            (Saved::Activation { x }, TorchOp::Activation { gelu_tanh }) => {
                let dx = if gelu_tanh {
                    x.tensor.gelu_backward(dy, "tanh")
                } else {
                    x.tensor.silu_backward(dy)
                };
                vec![Some(dx)]
            }
            // as PyTorch's AddmmBackward0: dx = dy W^T, dW = x^T dy, db = the sum of dy's rows
            (Saved::Linear { x, weight }, _) => vec![
                mask(0).then(|| dy.mm(&weight.tensor.tr())),
                mask(1).then(|| x.tensor.tr().mm(dy)),
                mask(2).then(|| dy.sum_dim_intlist([0i64].as_slice(), false, None::<tch::Kind>)),
            ],
            (Saved::Recorded { output, leaves, .. }, _) => {
                let inputs: Vec<&tch::Tensor> =
                    leaves.iter().flatten().map(|l| &l.tensor).collect();
                let mut grads = native::autograd_grad(&output.tensor, dy, &inputs).into_iter();
                leaves
                    .iter()
                    .map(|leaf| leaf.as_ref().and_then(|_| grads.next().flatten()))
                    .collect()
            }
            (saved, op) => {
                unreachable!("{op:?} with the saved state of another operation: {saved:?}")
            }
        }
    }
}

/// The backward state of every [`TorchOps`] operation.
#[derive(Clone, Debug)]
struct TorchState {
    op: TorchOp,
    saved: Saved,
}

/// The backward step of every [`TorchOps`] operation: PyTorch's backward kernels
/// ([`Saved::backward`]).
#[derive(Debug)]
struct TorchBackward;

impl<const N: usize> Backward<LibTorch, N> for TorchBackward {
    type State = TorchState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node);
        let TorchState { op, saved } = ops.state;
        // burn wants the gradient of exactly the inputs that have a parent node (tracked ones)
        let wanted = ops.parents.each_ref().map(|parent| parent.is_some());
        let input_grads = saved.backward(op, &dy.tensor, &wanted);
        for (parent, grad) in ops.parents.iter().zip(input_grads) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<LibTorch>(node.id, TchTensor::new(grad));
            }
        }
    }
}

/// `op` on autodiff tensors: untracked, the plain libtorch call; tracked, the call that saves
/// what [`TorchBackward`] reads.
fn tracked<C: CheckpointStrategy, const N: usize>(
    op: TorchOp,
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let nodes = inputs.each_ref().map(|t| t.node());
    let wants_grad = inputs.each_ref().map(|t| t.is_tracked());
    let primitives = inputs.map(|t| t.into_primitive());
    match TorchBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::UnTracked(prep) => prep.finish(op.run(primitives)),
        OpsKind::Tracked(prep) => {
            let (y, saved) = op.forward_saving(&primitives, &wants_grad);
            prep.finish(TorchState { op, saved }, y)
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
        tracked::<C, _>(op, [x, weight, bias])
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
        tracked::<C, _>(op, [x, gamma, beta])
    }

    fn torch_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        tracked::<C, _>(TorchOp::LayerNorm { epsilon }, [x, gamma, beta])
    }

    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tracked::<C, _>(TorchOp::Attention, [q, k, v, bias])
    }

    fn torch_attention_unmasked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tracked::<C, _>(TorchOp::Attention, [q, k, v])
    }

    fn torch_activation(x: FloatTensor<Self>, gelu_tanh: bool) -> FloatTensor<Self> {
        tracked::<C, _>(TorchOp::Activation { gelu_tanh }, [x])
    }

    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tracked::<C, _>(TorchOp::Linear, [x, weight, bias])
    }
}

/// Where the elements of `x` start in memory, if it is a libtorch tensor without autodiff:
/// two tensors with the same address share their storage (an update in place shows).
pub fn data_address<const D: usize>(x: &Tensor<D>) -> Option<usize> {
    let t = x.clone().into_dispatch();
    flat::as_tch(&t).map(|t| t.data_ptr() as usize)
}

/// Whether `x` lives on burn-tch (libtorch, CPU or CUDA; with or without autodiff): where
/// [`TorchOps`] runs.
pub fn on_libtorch<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(
        x.device().as_dispatch().clone().inner(),
        DispatchDevice::LibTorch(_)
    )
}
