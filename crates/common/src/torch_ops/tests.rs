//! Each operation against burn's own on burn-tch's CPU, forward and every gradient: burn's
//! generic formulas are the reference for the backward kernels [`super::Saved::backward`] calls;
//! and each direct backward against torch's autograd on the same forward.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::activation::silu as burn_silu;
use burn::tensor::module::{attention as burn_attention, layer_norm as burn_layer_norm};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};

use super::on_libtorch;
use crate::activation::{gelu_tanh, silu};
use crate::gemm_conv::{conv2d, layer_kinds};
use crate::group_norm::group_norm;
use crate::layers::{attention, layer_norm};
use burn::backend::libtorch::TchTensor;

fn device() -> Device {
    Device::libtorch().autodiff()
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

type Grads = burn::tensor::Gradients;

/// Asserts `ours` and `reference` agree, and returns the gradients of both (in that order) for
/// the same random output gradient.
fn forward_agrees<const D: usize>(what: &str, ours: Tensor<D>, reference: Tensor<D>) -> [Grads; 2] {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let forward = max_diff(ours.clone(), reference.clone());
    assert!(forward < 1e-5, "{what}: forward differs by {forward}");
    let dy = random(ours.dims(), &ours.device());
    [
        (ours * dy.clone()).sum().backward(),
        (reference * dy).sum().backward(),
    ]
}

/// Asserts `x` has the same gradient in both.
fn gradient_agrees<const D: usize>(what: &str, x: &Tensor<D>, [ours, reference]: &[Grads; 2]) {
    let diff = max_diff(x.grad(ours).unwrap(), x.grad(reference).unwrap());
    assert!(diff < 1e-4, "{what}: gradient differs by {diff}");
}

/// [`forward_agrees`], then [`gradient_agrees`] for each of `inputs`.
fn assert_same<const D: usize, const I: usize>(
    what: &str,
    ours: Tensor<D>,
    reference: Tensor<D>,
    inputs: &[Tensor<I>],
) {
    let grads = forward_agrees(what, ours, reference);
    for x in inputs {
        gradient_agrees(what, x, &grads);
    }
}

#[test]
fn runs_on_libtorch_only() {
    assert!(on_libtorch(&Tensor::<1>::zeros([2], &device())));
    assert!(on_libtorch(&Tensor::<1>::zeros([2], &Device::libtorch())));
    assert!(!on_libtorch(&Tensor::<1>::zeros([2], &Device::flex())));
}

/// 3x3 stride 1 and 2, 1x1 without bias: output, dx, dW and db against burn's Conv2d.
#[test]
fn conv2d_matches_burn() {
    let device = device();
    for config in layer_kinds() {
        let conv: Conv2d = config.init(&device);
        let x = random([3, config.channels[0], 7, 6], &device).require_grad();
        let ours = conv2d(&conv, x.clone());
        let reference = conv.forward(x.clone());
        let what = format!("{config:?}");
        let grads = forward_agrees(&what, ours, reference);
        gradient_agrees(&what, &x, &grads);
        gradient_agrees(&what, &conv.weight.val(), &grads);
        if let Some(bias) = &conv.bias {
            gradient_agrees(&what, &bias.val(), &grads);
        }
    }
}

/// An input that needs no gradient (the image into the first layer) gets none asked for.
#[test]
fn conv2d_with_a_constant_input() {
    let device = device();
    let conv: Conv2d = Conv2dConfig::new([2, 3], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x = random([2, 2, 5, 5], &device);
    let ours = conv2d(&conv, x.clone());
    let reference = conv.forward(x);
    assert_same("constant x", ours, reference, &[conv.weight.val()]);
}

/// With and without SiLU, with trained-looking gamma and beta, against burn-nn's GroupNorm.
#[test]
fn group_norm_matches_burn() {
    let device = device();
    for (groups, channels, with_silu) in [(2, 4, true), (3, 6, false)] {
        let mut norm: GroupNorm = GroupNormConfig::new(groups, channels).init(&device);
        norm.gamma = Some(Param::from_tensor(
            random([channels], &device).add_scalar(1.0),
        ));
        norm.beta = Some(Param::from_tensor(random([channels], &device)));
        let x = random([3, channels, 5, 4], &device)
            .mul_scalar(2.0)
            .require_grad();
        let ours = group_norm(&norm, x.clone(), with_silu);
        let reference = norm.forward(x.clone());
        let reference = if with_silu {
            burn_silu(reference)
        } else {
            reference
        };
        let (gamma, beta) = (norm.gamma.as_ref().unwrap(), norm.beta.as_ref().unwrap());
        let what = format!("groups {groups} silu {with_silu}");
        let grads = forward_agrees(&what, ours, reference);
        gradient_agrees(&what, &x, &grads);
        gradient_agrees(&what, &gamma.val(), &grads);
        gradient_agrees(&what, &beta.val(), &grads);
    }
}

#[test]
fn layer_norm_matches_burn() {
    let device = device();
    let x = random([2, 5, 8], &device).add_scalar(0.5).require_grad();
    let gamma = random([8], &device).add_scalar(1.0).require_grad();
    let beta = random([8], &device).require_grad();
    let ours = layer_norm(x.clone(), gamma.clone(), Some(beta.clone()), 1e-6);
    let reference = burn_layer_norm(x.clone(), gamma.clone(), Some(beta.clone()), 1e-6);
    let grads = forward_agrees("layer norm", ours, reference);
    gradient_agrees("layer norm", &x, &grads);
    gradient_agrees("layer norm", &gamma, &grads);
    gradient_agrees("layer norm", &beta, &grads);
    // without beta (the DiT's plain LayerNorm)
    let ours = layer_norm(x.clone(), gamma.clone(), None, 1e-6);
    let reference = burn_layer_norm(x.clone(), gamma, None, 1e-6);
    assert_same("layer norm without beta", ours, reference, &[x]);
}

/// Self-attention without a mask and cross-attention with padded keys, against burn's
/// decomposition (whose mask means true = masked out, as ours does).
#[test]
fn attention_matches_burn() {
    let device = device();
    let q = random([2, 3, 5, 4], &device).require_grad();
    let k = random([2, 3, 6, 4], &device).require_grad();
    let v = random([2, 3, 6, 4], &device).require_grad();
    let options = AttentionModuleOptions::default();
    let ours = attention(q.clone(), k.clone(), v.clone(), None);
    let reference = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
    assert_same(
        "unmasked",
        ours,
        reference,
        &[q.clone(), k.clone(), v.clone()],
    );

    // the second sequence has its last two keys padded
    let padding = Tensor::<2, Bool>::from_data(
        TensorData::new(
            vec![
                false, false, false, false, false, false, false, false, false, false, true, true,
            ],
            [2, 6],
        ),
        &device,
    );
    let ours = attention(q.clone(), k.clone(), v.clone(), Some(padding.clone()));
    let mask = padding.reshape([2, 1, 1, 6]).expand([2, 3, 5, 6]);
    let reference = burn_attention(q.clone(), k.clone(), v.clone(), Some(mask), None, options);
    assert_same("padding mask", ours, reference, &[q, k, v]);
}

/// The same numbers without autodiff (sampling), the padding mask included: burn-tch's own
/// inference `attention` hands burn's mask (true = masked out) to torch, which reads true as
/// "attend", so this path must not go through it.
#[test]
fn inference_matches_too() {
    let device = Device::libtorch();
    let q = random([1, 2, 3, 4], &device);
    let kv = random([1, 2, 4, 4], &device);
    let padding = Tensor::<2, Bool>::from_data(
        TensorData::new(vec![false, false, true, true], [1, 4]),
        &device,
    );
    let ours = attention(q.clone(), kv.clone(), kv.clone(), Some(padding));
    // only the first two keys take part
    let kept = kv.clone().slice([0..1, 0..2, 0..2, 0..4]);
    let reference = burn_attention(q, kept.clone(), kept, None, None, Default::default());
    assert!(max_diff(ours, reference) < 1e-5);

    let x = random([2, 3, 4, 4], &device);
    assert!(max_diff(silu(x.clone()), burn_silu(x.clone())) < 1e-6);
    let conv: Conv2d = Conv2dConfig::new([3, 2], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    assert!(max_diff(conv2d(&conv, x.clone()), conv.forward(x)) < 1e-5);
}

/// A linear layer with a bias on a 3-D input (one `addmm` on its rows) and one without
/// (burn's own), output and every gradient against burn's `Linear`.
#[test]
fn linear_matches_burn() {
    let device = device();
    for bias in [true, false] {
        let layer: burn::nn::Linear = burn::nn::LinearConfig::new(6, 5)
            .with_bias(bias)
            .init(&device);
        let x = random([3, 4, 6], &device).require_grad();
        let ours = crate::linear::linear(&layer, x.clone());
        let reference = layer.forward(x.clone());
        let what = format!("linear, bias {bias}");
        let grads = forward_agrees(&what, ours, reference);
        gradient_agrees(&what, &x, &grads);
        gradient_agrees(&what, &layer.weight.val(), &grads);
        if let Some(b) = &layer.bias {
            gradient_agrees(&what, &b.val(), &grads);
        }
    }
}

#[test]
fn activations_match_burn() {
    let device = device();
    let x = random([3, 7], &device).mul_scalar(3.0).require_grad();
    assert_same(
        "silu",
        silu(x.clone()),
        burn_silu(x.clone()),
        std::slice::from_ref(&x),
    );
    let cubic = (x.clone() * x.clone() * 0.044715 + 1.0)
        * x.clone()
        * crate::activation::kernels::GELU_C as f64;
    let reference = x.clone() * burn::tensor::activation::sigmoid(cubic);
    assert_same("gelu tanh", gelu_tanh(x.clone()), reference, &[x]);
}

/// Residual connections and an attention output updated afterwards: burn-tch adds in place
/// into a tensor it holds the only handle on, and torch saved the input of the GroupNorm and
/// the output of the attention for their backward. Unless [`super::Saved`] holds them, the
/// backward reads the updated values.
#[test]
fn residual_updates_keep_torchs_saved_tensors() {
    let device = device();
    let norm: GroupNorm = GroupNormConfig::new(2, 4).init(&device);
    let x = random([2, 4, 3, 3], &device).require_grad();
    let chain = |x: Tensor<4>, ours: bool| {
        let h = if ours {
            group_norm(&norm, x.clone(), true)
        } else {
            burn_silu(norm.forward(x.clone()))
        };
        // x + h: x is the only handle left on the GroupNorm's input
        let x = x + h;
        let q = x.clone().reshape([2, 1, 4, 9]);
        let a = if ours {
            attention(q.clone(), q.clone(), q.clone(), None)
        } else {
            burn_attention(q.clone(), q.clone(), q, None, None, Default::default())
        };
        // a + 1: a is the only handle on the attention's output
        (a + 1.0).reshape([2, 4, 3, 3]) + x
    };
    assert_same(
        "residual",
        chain(x.clone(), true),
        chain(x.clone(), false),
        &[x],
    );
}

/// torch's grad mode is per thread and burn never sets it: the operations must record their
/// graph and take their backward even where the calling thread has turned it off.
#[test]
fn works_with_torchs_grad_mode_off() {
    let device = device();
    let conv: Conv2d = Conv2dConfig::new([2, 3], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x = random([2, 2, 5, 5], &device).require_grad();
    let reference = conv.forward(x.clone());
    let ours = tch::no_grad(|| conv2d(&conv, x.clone()));
    let [grads, grads_ref] = tch::no_grad(|| forward_agrees("no grad", ours, reference));
    gradient_agrees("no grad", &x, &[grads, grads_ref]);
}

fn tch_random(shape: &[i64]) -> TchTensor {
    TchTensor::new(tch::Tensor::randn(
        shape,
        (tch::Kind::Float, tch::Device::Cpu),
    ))
}

fn tch_max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Every operation's direct backward (PyTorch's backward kernels called as its autograd nodes
/// call them) against torch's autograd recording the composite forward
/// ([`super::TorchOp::record`], the path for anything without a direct backward): the same
/// output, and the same gradient for each input whose gradient is wanted, none for the others.
#[test]
fn direct_backward_matches_torchs_autograd() {
    use super::TorchOp;
    let conv = TorchOp::Conv2d {
        stride: [2, 1],
        padding: [1, 0],
        dilation: [1, 1],
        groups: 1,
    };
    // a transposed (non-contiguous) input for the GroupNorm, which works on a contiguous copy
    let transposed = TchTensor::new(tch_random(&[3, 6, 4, 5]).tensor.transpose(2, 3));
    let mask = tch::Tensor::zeros([2, 1, 1, 6], (tch::Kind::Float, tch::Device::Cpu));
    let _ = mask.narrow(3, 4, 2).fill_(f64::NEG_INFINITY);
    let cases: Vec<(&str, TorchOp, Vec<TchTensor>, Vec<bool>)> = vec![
        (
            "conv",
            conv,
            vec![
                tch_random(&[2, 3, 7, 6]),
                tch_random(&[4, 3, 3, 3]),
                tch_random(&[4]),
            ],
            vec![true, true, true],
        ),
        (
            "conv, constant x",
            conv,
            vec![
                tch_random(&[2, 3, 7, 6]),
                tch_random(&[4, 3, 3, 3]),
                tch_random(&[4]),
            ],
            vec![false, true, true],
        ),
        (
            "group norm + silu",
            TorchOp::GroupNorm {
                groups: 3,
                epsilon: 1e-6,
                silu: true,
            },
            vec![transposed, tch_random(&[6]), tch_random(&[6])],
            vec![true, true, true],
        ),
        (
            "group norm",
            TorchOp::GroupNorm {
                groups: 2,
                epsilon: 1e-5,
                silu: false,
            },
            vec![
                tch_random(&[2, 4, 3, 3]),
                tch_random(&[4]),
                tch_random(&[4]),
            ],
            vec![true, false, true],
        ),
        (
            "layer norm",
            TorchOp::LayerNorm { epsilon: 1e-6 },
            vec![tch_random(&[2, 5, 8]), tch_random(&[8]), tch_random(&[8])],
            vec![true, true, true],
        ),
        (
            "attention",
            TorchOp::Attention,
            vec![
                tch_random(&[2, 3, 5, 4]),
                tch_random(&[2, 3, 6, 4]),
                tch_random(&[2, 3, 6, 4]),
            ],
            vec![true, true, true],
        ),
        (
            "attention, padded keys",
            TorchOp::Attention,
            vec![
                tch_random(&[2, 3, 5, 4]),
                tch_random(&[2, 3, 6, 4]),
                tch_random(&[2, 3, 6, 4]),
                TchTensor::new(mask),
            ],
            vec![true, true, true, false],
        ),
        (
            "linear",
            TorchOp::Linear,
            vec![tch_random(&[5, 3]), tch_random(&[3, 4]), tch_random(&[4])],
            vec![true, true, true],
        ),
        (
            "linear, constant x",
            TorchOp::Linear,
            vec![tch_random(&[5, 3]), tch_random(&[3, 4]), tch_random(&[4])],
            vec![false, true, true],
        ),
        (
            "silu",
            TorchOp::Activation { gelu_tanh: false },
            vec![tch_random(&[3, 7])],
            vec![true],
        ),
        (
            "gelu",
            TorchOp::Activation { gelu_tanh: true },
            vec![tch_random(&[3, 7])],
            vec![true],
        ),
    ];
    for (what, op, inputs, wants) in cases {
        let (y, saved) = op.forward_saving(&inputs, &wants);
        assert!(
            !matches!(saved, super::Saved::Recorded { .. }),
            "{what}: no direct backward on the CPU"
        );
        let (y_ref, recorded) = op.record(&inputs, &wants);
        assert_eq!(y.tensor.size(), y_ref.tensor.size(), "{what}: shape");
        let forward = tch_max_diff(&y.tensor, &y_ref.tensor);
        assert!(forward < 1e-5, "{what}: forward differs by {forward}");
        let dy = tch::Tensor::randn(y.tensor.size(), (tch::Kind::Float, tch::Device::Cpu));
        let ours = saved.backward(op, &dy, &wants);
        let reference = recorded.backward(op, &dy, &wants);
        for (i, wanted) in wants.iter().enumerate() {
            let (a, b) = (ours.get(i).and_then(Option::as_ref), reference[i].as_ref());
            if !wanted {
                assert!(
                    b.is_none(),
                    "{what}: input {i} has a gradient in torch's autograd"
                );
                continue;
            }
            let (a, b) = (a.expect("a gradient"), b.expect("a reference gradient"));
            assert_eq!(a.size(), b.size(), "{what}: input {i}'s gradient shape");
            let diff = tch_max_diff(a, b);
            assert!(
                diff < 1e-4,
                "{what}: input {i}'s gradient differs by {diff}"
            );
        }
    }
}

/// libtorch's error in a backward kernel reaches Rust as a panic naming the kernel (the C
/// side's exception, its message freed after reading), not an abort.
#[test]
#[should_panic(expected = "libtorch convolution_backward")]
fn a_failing_backward_kernel_names_itself() {
    let x = tch_random(&[1, 3, 5, 5]).tensor;
    // a weight with 2 input channels for an input with 3
    let weight = tch_random(&[4, 2, 3, 3]).tensor;
    let dy = tch_random(&[1, 4, 3, 3]).tensor;
    let _ = super::native::convolution_backward(
        &dy,
        &x,
        &weight,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
        [true, true, true],
    );
}

/// q, k, v of a cross-attention with 6 keys, and a mask that leaves out the last two.
fn padded_attention_inputs() -> Vec<TchTensor> {
    let mask = tch::Tensor::zeros([2, 1, 1, 6], (tch::Kind::Float, tch::Device::Cpu));
    let _ = mask.narrow(3, 4, 2).fill_(f64::NEG_INFINITY);
    vec![
        tch_random(&[2, 3, 5, 4]),
        tch_random(&[2, 3, 6, 4]),
        tch_random(&[2, 3, 6, 4]),
        TchTensor::new(mask),
    ]
}

/// A [`super::DirectAttention`] on libtorch's CPU flash kernel, the mask passed on or not, with
/// d(key) scaled by `dk_scale`: the right one and two wrong ones for [`super::check_attention`].
fn flash_cpu(
    inputs: &[TchTensor],
    dy: &tch::Tensor,
    with_mask: bool,
    dk_scale: f64,
) -> Result<(tch::Tensor, [tch::Tensor; 3]), String> {
    let [q, k, v] = [0, 1, 2].map(|i| &inputs[i].tensor);
    let mask = inputs.get(3).filter(|_| with_mask).map(|m| &m.tensor);
    let (out, lse) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, false, mask, None,
    );
    let (dq, dk, dv) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
        dy, q, k, v, &out, &lse, 0.0, false, mask, None,
    );
    Ok((out, [dq, dk * dk_scale, dv]))
}

/// The check that admits a direct attention kernel (on CUDA, the memory-efficient one) passes
/// a right one (the CPU flash kernel, with and without a mask) and names what differs in a
/// wrong one: a mask left out changes the output, a scaled d(key) only that gradient, and NaN
/// fails too.
#[test]
fn the_attention_check_passes_a_right_kernel_and_names_a_wrong_one() {
    use super::check_attention;
    let padded = padded_attention_inputs();
    let worst = check_attention(&|i, dy| flash_cpu(i, dy, true, 1.0), &padded).unwrap();
    assert!(worst < 1e-5, "{worst}");
    check_attention(&|i, dy| flash_cpu(i, dy, true, 1.0), &padded[..3]).unwrap();
    let no_mask = check_attention(&|i, dy| flash_cpu(i, dy, false, 1.0), &padded).unwrap_err();
    assert!(no_mask.starts_with("output differs"), "{no_mask}");
    let scaled = check_attention(&|i, dy| flash_cpu(i, dy, true, 1.01), &padded).unwrap_err();
    assert!(scaled.starts_with("d(key) differs"), "{scaled}");
    let nan = check_attention(&|i, dy| flash_cpu(i, dy, true, f64::NAN), &padded).unwrap_err();
    assert!(nan.starts_with("d(key) differs"), "{nan}");
}

/// The memory-efficient kernel has no CPU implementation: called directly on the CPU, its
/// error comes back as the check's message (one line, naming the operator), not a panic, which
/// is what turns a kernel that fails on a device into a warning and torch's autograd.
#[test]
fn the_efficient_kernels_error_fails_the_check() {
    let why =
        super::check_attention(&super::efficient_direct, &padded_attention_inputs()).unwrap_err();
    assert!(
        why.contains("_scaled_dot_product_efficient_attention"),
        "{why}"
    );
    assert!(!why.contains('\n'), "{why}");
    // and on the CPU the direct path never picks it
    let inputs = padded_attention_inputs();
    assert!(!super::efficient_on_cuda(
        &inputs[0],
        &inputs[1],
        &inputs[2],
        inputs.get(3)
    ));
    assert!(super::efficient_attention_check().is_none());
}
