// The backward kernels of `ldm_common::torch_ops` that tch does not bind (its generator skips
// operators with a `bool[N]` output mask): PyTorch's own `convolution_backward`,
// `native_group_norm_backward` and `native_layer_norm_backward`, the same calls PyTorch's
// autograd nodes make, and `torch::autograd::grad` with explicit output gradients.
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

}  // extern "C"
