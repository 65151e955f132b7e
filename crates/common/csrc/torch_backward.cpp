// The backward kernels of `ldm_common::torch_ops` that tch does not bind (its generator skips
// operators with a `bool[N]` output mask): PyTorch's own `convolution_backward`,
// `native_group_norm_backward`, `native_layer_norm_backward` and
// `_scaled_dot_product_efficient_attention_backward`, the same calls PyTorch's autograd nodes
// make, and `torch::autograd::grad` with explicit output gradients. The memory-efficient
// attention's forward is here too, with the mask preparation `scaled_dot_product_attention`
// does before it, so that the backward sees the same bias tensor.
//
// One more call is not a backward: `ldm_pinned_upload`, a host buffer copied to a CUDA device
// from page-locked memory without waiting for the device (tch binds `pin_memory` only with its
// deprecated device argument).
//
// Tensors cross as tch's handles (`at::Tensor*`, owned by the caller). Each function returns
// nullptr on success, else a malloc'ed message the caller frees; results are new handles
// (nullptr where a gradient was not asked for), freed by tch's `Tensor` on drop.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

using at::Tensor;

Tensor* handle(Tensor t) { return t.defined() ? new Tensor(std::move(t)) : nullptr; }

std::optional<Tensor> optional(const Tensor* t) {
    return t != nullptr ? std::optional<Tensor>(*t) : std::nullopt;
}

template <typename F>
char* guarded(F&& body) {
    try {
        body();
        return nullptr;
    } catch (const std::exception& e) {
        return strdup(e.what());
    }
}

// The additive mask as `scaled_dot_product_attention` hands it to the memory-efficient kernel
// (ATen's attention.cpp, `preprocess_mask`): the kernel wants every stride but the last a
// multiple of 8 and the last 1, else the mask is padded to a multiple of 8 keys and sliced back;
// then it is expanded to [batch, heads, queries, keys].
Tensor efficient_mask(const Tensor& mask, const Tensor& query, const Tensor& key) {
    constexpr int64_t alignment = 8;
    bool aligned = mask.stride(-1) == 1;
    for (int64_t i = 0; i + 1 < mask.dim(); ++i) aligned = aligned && mask.stride(i) % alignment == 0;
    Tensor result = mask;
    if (!aligned) {
        const int64_t keys = mask.size(-1);
        result = at::pad(mask, {0, alignment - keys % alignment}).slice(-1, 0, keys);
    }
    return result.expand({query.size(0), query.size(1), query.size(2), key.size(2)});
}

}  // namespace

extern "C" {

// d(input), d(weight), d(bias) of conv2d(input, weight) + bias, as ConvolutionBackward0.
char* ldm_convolution_backward(const Tensor* grad, const Tensor* input, const Tensor* weight,
                               int64_t bias_size, const int64_t* stride, const int64_t* padding,
                               const int64_t* dilation, int64_t groups, const bool* mask,
                               Tensor** out) {
    return guarded([&] {
        std::optional<at::IntArrayRef> bias_sizes;
        if (mask[2]) bias_sizes = at::IntArrayRef(&bias_size, 1);
        const int64_t zeros[2] = {0, 0};
        auto r = at::convolution_backward(
            *grad, *input, *weight, bias_sizes, at::IntArrayRef(stride, 2),
            at::IntArrayRef(padding, 2), at::IntArrayRef(dilation, 2), false,
            at::IntArrayRef(zeros, 2), groups, {mask[0], mask[1], mask[2]});
        out[0] = handle(std::get<0>(r));
        out[1] = handle(std::get<1>(r));
        out[2] = handle(std::get<2>(r));
    });
}

// d(input), d(gamma), d(beta) of native_group_norm, as NativeGroupNormBackward0.
char* ldm_group_norm_backward(const Tensor* grad, const Tensor* input, const Tensor* mean,
                              const Tensor* rstd, const Tensor* gamma, int64_t n, int64_t c,
                              int64_t hxw, int64_t groups, const bool* mask, Tensor** out) {
    return guarded([&] {
        auto r = at::native_group_norm_backward(*grad, *input, *mean, *rstd, optional(gamma), n,
                                                c, hxw, groups, {mask[0], mask[1], mask[2]});
        out[0] = handle(std::get<0>(r));
        out[1] = handle(std::get<1>(r));
        out[2] = handle(std::get<2>(r));
    });
}

// d(input), d(gamma), d(beta) of native_layer_norm over the last `ndims` axes, as
// NativeLayerNormBackward0.
char* ldm_layer_norm_backward(const Tensor* grad, const Tensor* input, const int64_t* shape,
                              int64_t ndims, const Tensor* mean, const Tensor* rstd,
                              const Tensor* gamma, const Tensor* beta, const bool* mask,
                              Tensor** out) {
    return guarded([&] {
        auto r = at::native_layer_norm_backward(
            *grad, *input, at::IntArrayRef(shape, ndims), *mean, *rstd, optional(gamma),
            optional(beta), {mask[0], mask[1], mask[2]});
        out[0] = handle(std::get<0>(r));
        out[1] = handle(std::get<1>(r));
        out[2] = handle(std::get<2>(r));
    });
}

// softmax(q k^T / sqrt(d) + bias) v on the memory-efficient kernel, as
// scaled_dot_product_attention runs it when `_fused_sdp_choice` picks it: out = [output,
// logsumexp, philox seed, philox offset, the prepared bias (nullptr without a mask)], what
// ldm_efficient_attention_backward reads.
char* ldm_efficient_attention(const Tensor* query, const Tensor* key, const Tensor* value,
                              const Tensor* bias, Tensor** out) {
    return guarded([&] {
        std::optional<Tensor> mask;
        if (bias != nullptr) mask = efficient_mask(*bias, *query, *key);
        auto r = at::_scaled_dot_product_efficient_attention(*query, *key, *value, mask,
                                                             /*compute_log_sumexp=*/true);
        out[0] = handle(std::get<0>(r));
        out[1] = handle(std::get<1>(r));
        out[2] = handle(std::get<2>(r));
        out[3] = handle(std::get<3>(r));
        out[4] = mask ? handle(*mask) : nullptr;
    });
}

// d(query), d(key), d(value) of ldm_efficient_attention, as
// ScaledDotProductEfficientAttentionBackward0 (the mask takes no gradient).
char* ldm_efficient_attention_backward(const Tensor* grad, const Tensor* query, const Tensor* key,
                                       const Tensor* value, const Tensor* bias,
                                       const Tensor* output, const Tensor* logsumexp,
                                       const Tensor* philox_seed, const Tensor* philox_offset,
                                       Tensor** out) {
    return guarded([&] {
        auto r = at::_scaled_dot_product_efficient_attention_backward(
            *grad, *query, *key, *value, bias != nullptr ? *bias : Tensor(), *output, *logsumexp,
            *philox_seed, *philox_offset, /*dropout_p=*/0.0, {true, true, true, false});
        out[0] = handle(std::get<0>(r));
        out[1] = handle(std::get<1>(r));
        out[2] = handle(std::get<2>(r));
    });
}

// torch.autograd.grad(outputs, inputs, grad_outputs): the vector-Jacobian product of a recorded
// graph with the given output gradients; out[i] is nullptr where inputs[i] is unused.
char* ldm_autograd_grad(const Tensor* const* outputs, const Tensor* const* grad_outputs,
                        int64_t n_outputs, const Tensor* const* inputs, int64_t n_inputs,
                        Tensor** out) {
    return guarded([&] {
        std::vector<Tensor> outs, grads, ins;
        for (int64_t i = 0; i < n_outputs; ++i) {
            outs.push_back(*outputs[i]);
            grads.push_back(*grad_outputs[i]);
        }
        for (int64_t i = 0; i < n_inputs; ++i) ins.push_back(*inputs[i]);
        auto r = torch::autograd::grad(outs, ins, grads, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
        for (int64_t i = 0; i < n_inputs; ++i) out[i] = handle(r[i]);
    });
}

// `bytes` (row-major, `ndim` sizes, ATen scalar type `dtype`) on CUDA device `device_index`:
// copied into page-locked memory from PyTorch's caching host allocator, then copied to the
// device asynchronously on the current stream, as `tensor.pin_memory().to(device,
// non_blocking=True)`. The host returns without waiting for the device's queue. The
// allocator records the copy on the page-locked block, so the block is not reused before the
// copy has run (ATen's copy_kernel_cuda, `CachingHostAllocator_recordEvent`).
char* ldm_pinned_upload(const void* bytes, const int64_t* sizes, int64_t ndim, int dtype,
                        int device_index, Tensor** out) {
    return guarded([&] {
        auto options = at::TensorOptions()
                           .dtype(static_cast<at::ScalarType>(dtype))
                           .pinned_memory(true);
        Tensor host = at::empty(at::IntArrayRef(sizes, ndim), options);
        std::memcpy(host.data_ptr(), bytes, host.nbytes());
        out[0] = handle(host.to(at::Device(at::kCUDA, device_index), /*non_blocking=*/true));
    });
}

}  // extern "C"
