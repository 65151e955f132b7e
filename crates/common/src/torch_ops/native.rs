//! PyTorch's backward kernels that tch does not bind (its generator skips operators with a
//! `bool[N]` output mask), from `csrc/torch_backward.cpp`: the calls PyTorch's own autograd
//! nodes make, so a [`super::TorchOps`] backward is PyTorch's without going through torch's
//! autograd engine (about 30 us of host time per call on the CPU, and on CUDA a hand-off to the
//! engine's device thread and back).

use std::ffi::{CStr, c_char};
use std::ptr;

use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn ldm_convolution_backward(
        grad: *const C_tensor,
        input: *const C_tensor,
        weight: *const C_tensor,
        bias_size: i64,
        stride: *const i64,
        padding: *const i64,
        dilation: *const i64,
        groups: i64,
        mask: *const bool,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;

    fn ldm_group_norm_backward(
        grad: *const C_tensor,
        input: *const C_tensor,
        mean: *const C_tensor,
        rstd: *const C_tensor,
        gamma: *const C_tensor,
        n: i64,
        c: i64,
        hxw: i64,
        groups: i64,
        mask: *const bool,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;

    fn ldm_layer_norm_backward(
        grad: *const C_tensor,
        input: *const C_tensor,
        shape: *const i64,
        ndims: i64,
        mean: *const C_tensor,
        rstd: *const C_tensor,
        gamma: *const C_tensor,
        beta: *const C_tensor,
        mask: *const bool,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;

    fn ldm_pinned_upload(
        bytes: *const std::ffi::c_void,
        sizes: *const i64,
        ndim: i64,
        dtype: std::ffi::c_int,
        device_index: std::ffi::c_int,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;

    fn ldm_efficient_attention(
        query: *const C_tensor,
        key: *const C_tensor,
        value: *const C_tensor,
        bias: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;

    #[allow(clippy::too_many_arguments)]
    fn ldm_efficient_attention_backward(
        grad: *const C_tensor,
        query: *const C_tensor,
        key: *const C_tensor,
        value: *const C_tensor,
        bias: *const C_tensor,
        output: *const C_tensor,
        logsumexp: *const C_tensor,
        philox_seed: *const C_tensor,
        philox_offset: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;

    fn ldm_autograd_grad(
        outputs: *const *const C_tensor,
        grad_outputs: *const *const C_tensor,
        n_outputs: i64,
        inputs: *const *const C_tensor,
        n_inputs: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Takes ownership of the C side's results: one tensor per result handle that is not null;
/// then panics with libtorch's message if there was an error (as tch's own non-`f_` calls do).
fn finish<const N: usize>(
    what: &str,
    error: *mut c_char,
    out: [*mut C_tensor; N],
) -> [Option<Tensor>; N] {
    try_finish(error, out).unwrap_or_else(|message| panic!("libtorch {what}: {message}"))
}

/// Takes ownership of the C side's results as [`finish`] does, with libtorch's message as the
/// error instead of a panic.
fn try_finish<const N: usize>(
    error: *mut c_char,
    out: [*mut C_tensor; N],
) -> Result<[Option<Tensor>; N], String> {
    let tensors = out.map(owned);
    match message(error) {
        None => Ok(tensors),
        Some(message) => Err(message),
    }
}

/// Every tensor of `tensors`, or `missing` as the error if one is undefined.
fn defined<const N: usize>(
    tensors: [Option<Tensor>; N],
    missing: &str,
) -> Result<[Tensor; N], String> {
    if tensors.iter().any(Option::is_none) {
        return Err(missing.to_owned());
    }
    Ok(tensors.map(Option::unwrap))
}

/// A result handle of the C side as a tensor (`None` for null).
fn owned(handle: *mut C_tensor) -> Option<Tensor> {
    // SAFETY: the C side returns null or a handle it allocated with `new at::Tensor`, which
    // tch's `Tensor` owns and frees on drop.
    (!handle.is_null()).then(|| unsafe { Tensor::from_ptr(handle) })
}

/// Panics with the C side's error message, if any.
fn check(what: &str, error: *mut c_char) {
    if let Some(message) = message(error) {
        panic!("libtorch {what}: {message}");
    }
}

/// The first sentence of a libtorch message: they run to several sentences and lines (a C++
/// backtrace among them), and the first says what failed.
pub(crate) fn first_sentence(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    line.split(". ")
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The C side's error message, if any (a strdup'ed string, freed here).
fn message(error: *mut c_char) -> Option<String> {
    if error.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string from strdup, read once and freed once.
    let message = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    unsafe { libc::free(error.cast()) };
    Some(message)
}

/// d(x), d(weight), d(bias) of `conv2d(x, weight) + bias` for output gradient `grad`, those
/// with `mask` set (PyTorch's `convolution_backward`: cuDNN / oneDNN).
#[allow(clippy::too_many_arguments)]
pub(crate) fn convolution_backward(
    grad: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
    dilation: [i64; 2],
    groups: i64,
    mask: [bool; 3],
) -> [Option<Tensor>; 3] {
    let mut out = [ptr::null_mut(); 3];
    let bias_size = weight.size()[0];
    // SAFETY: every pointer is valid for the call; the arrays have the lengths the C side reads.
    let error = unsafe {
        ldm_convolution_backward(
            grad.as_ptr(),
            x.as_ptr(),
            weight.as_ptr(),
            bias_size,
            stride.as_ptr(),
            padding.as_ptr(),
            dilation.as_ptr(),
            groups,
            mask.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    finish("convolution_backward", error, out)
}

/// d(x), d(gamma), d(beta) of `native_group_norm(x, gamma, beta, n, c, hxw, groups)` for
/// output gradient `grad`, from the forward's `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_backward(
    grad: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
    [n, c, hxw, groups]: [i64; 4],
    mask: [bool; 3],
) -> [Option<Tensor>; 3] {
    let mut out = [ptr::null_mut(); 3];
    // SAFETY: as in `convolution_backward`.
    let error = unsafe {
        ldm_group_norm_backward(
            grad.as_ptr(),
            x.as_ptr(),
            mean.as_ptr(),
            rstd.as_ptr(),
            gamma.as_ptr(),
            n,
            c,
            hxw,
            groups,
            mask.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    finish("native_group_norm_backward", error, out)
}

/// d(x), d(gamma), d(beta) of `native_layer_norm(x, shape, gamma, beta)` for output gradient
/// `grad`, from the forward's `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward(
    grad: &Tensor,
    x: &Tensor,
    shape: &[i64],
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mask: [bool; 3],
) -> [Option<Tensor>; 3] {
    let mut out = [ptr::null_mut(); 3];
    // SAFETY: as in `convolution_backward`.
    let error = unsafe {
        ldm_layer_norm_backward(
            grad.as_ptr(),
            x.as_ptr(),
            shape.as_ptr(),
            shape.len() as i64,
            mean.as_ptr(),
            rstd.as_ptr(),
            gamma.as_ptr(),
            beta.as_ptr(),
            mask.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    finish("native_layer_norm_backward", error, out)
}

/// What [`efficient_attention`] returns and [`efficient_attention_backward`] reads:
/// [output, logsumexp, philox seed, philox offset], and the mask as the kernel read it
/// (aligned and expanded to [batch, heads, queries, keys]).
pub(crate) type Efficient = ([Tensor; 4], Option<Tensor>);

/// ATen's `ScalarType` number of `kind` (c10/core/ScalarType.h), for the kinds uploaded.
fn scalar_type(kind: tch::Kind) -> std::ffi::c_int {
    match kind {
        tch::Kind::Int64 => 4,
        tch::Kind::Float => 6,
        _ => unreachable!("pinned_upload of {kind:?}: only f32 and i64 are uploaded"),
    }
}

/// `bytes` (elements of `kind`, row-major with `sizes`) on CUDA device `device_index`, copied
/// through page-locked memory without waiting for the device (`ldm_pinned_upload`), or
/// libtorch's one-line error.
pub(crate) fn pinned_upload(
    bytes: &[u8],
    sizes: &[i64],
    kind: tch::Kind,
    device_index: usize,
) -> Result<Tensor, String> {
    let elements: i64 = sizes.iter().product();
    assert_eq!(
        bytes.len() as i64,
        elements * kind.elt_size_in_bytes() as i64,
        "pinned_upload: {} bytes for {sizes:?} of {kind:?}",
        bytes.len()
    );
    let mut out = [ptr::null_mut(); 1];
    // SAFETY: `bytes` holds exactly the tensor's bytes (checked above); `sizes` has `ndim`
    // entries; `out` has the one slot the C side writes.
    let error = unsafe {
        ldm_pinned_upload(
            bytes.as_ptr().cast(),
            sizes.as_ptr(),
            sizes.len() as i64,
            scalar_type(kind),
            device_index as std::ffi::c_int,
            out.as_mut_ptr(),
        )
    };
    let [t] = defined(try_finish(error, out)?, "pinned_upload returned no tensor")?;
    Ok(t)
}

/// softmax(q k^T / sqrt(d) + bias) v on libtorch's memory-efficient attention kernel (CUDA),
/// with the mask prepared as `scaled_dot_product_attention` prepares it; libtorch's message
/// where the kernel cannot run (on the CPU it has no implementation).
pub(crate) fn efficient_attention(
    [q, k, v]: [&Tensor; 3],
    bias: Option<&Tensor>,
) -> Result<Efficient, String> {
    let mut out = [ptr::null_mut(); 5];
    let bias = bias.map_or(ptr::null(), |b| b.as_ptr());
    // SAFETY: as in `convolution_backward`; a null `bias` is read as no mask.
    let error = unsafe {
        ldm_efficient_attention(q.as_ptr(), k.as_ptr(), v.as_ptr(), bias, out.as_mut_ptr())
    };
    let [output, logsumexp, seed, offset, bias] = try_finish(error, out)?;
    let saved = defined(
        [output, logsumexp, seed, offset],
        "the memory-efficient attention returned an undefined tensor",
    )?;
    Ok((saved, bias))
}

/// d(q), d(k), d(v) of [`efficient_attention`] for output gradient `grad`
/// (`_scaled_dot_product_efficient_attention_backward`, as PyTorch's autograd node calls it).
pub(crate) fn efficient_attention_backward(
    grad: &Tensor,
    [q, k, v]: [&Tensor; 3],
    bias: Option<&Tensor>,
    [output, logsumexp, seed, offset]: [&Tensor; 4],
) -> Result<[Tensor; 3], String> {
    let mut out = [ptr::null_mut(); 3];
    let bias = bias.map_or(ptr::null(), |b| b.as_ptr());
    // SAFETY: as in `efficient_attention`.
    let error = unsafe {
        ldm_efficient_attention_backward(
            grad.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            bias,
            output.as_ptr(),
            logsumexp.as_ptr(),
            seed.as_ptr(),
            offset.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    defined(
        try_finish(error, out)?,
        "the memory-efficient attention's backward returned no gradient",
    )
}

/// `torch.autograd.grad([output], inputs, [grad])`: the gradient the recorded graph from the
/// leaves `inputs` to `output` sends to each input when `output`'s gradient is `grad` (`None`
/// for an input the output does not depend on).
pub(crate) fn autograd_grad(
    output: &Tensor,
    grad: &Tensor,
    inputs: &[&Tensor],
) -> Vec<Option<Tensor>> {
    let mut out = vec![ptr::null_mut(); inputs.len()];
    let input_ptrs: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    // SAFETY: as in `convolution_backward`; `out` has one slot per input.
    let error = unsafe {
        ldm_autograd_grad(
            &output.as_ptr(),
            &grad.as_ptr(),
            1,
            input_ptrs.as_ptr(),
            inputs.len() as i64,
            out.as_mut_ptr(),
        )
    };
    let tensors: Vec<Option<Tensor>> = out.into_iter().map(owned).collect();
    check("autograd.grad", error);
    tensors
}
