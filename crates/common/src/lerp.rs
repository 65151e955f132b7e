//! Linear interpolation a + w (b - a) as one operation: the EMA's update of each weight,
//! ema <- decay ema + (1 - decay) theta = lerp(ema, theta, 1 - decay).
//!
//! burn composes it from three tensor operations (two scalings and an addition), each a pass
//! over memory, a buffer and on an accelerator a kernel launch, for every parameter at every
//! step; PyTorch's EMA is one `torch._foreach_lerp_`. [`lerp`] is one pass on burn-flex (f32),
//! one `torch.lerp` on burn-tch, and burn's composition elsewhere.

// burn 0.22.1 marks burn-tch deprecated in favour of its CubeCL backends, whose CUDA build
// cannot be made on the project's machines: burn-tch is the GPU path here (as in `torch_ops`).
#![allow(deprecated)]

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::flex::{contiguous, flex_tensor, has_own_kernel, values};

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// lerp as a backend operation.
#[backend_extension(Flex, LibTorch: cfg(feature = "tch"))]
pub trait Lerp: Backend {
    /// a (1 - weight) + b weight, elementwise (a and b of one shape).
    fn lerp(a: FloatTensor<Self>, b: FloatTensor<Self>, weight: f64) -> FloatTensor<Self>;
}

impl Lerp for Flex {
    fn lerp(a: FlexTensor, b: FlexTensor, weight: f64) -> FlexTensor {
        let (a, b) = (contiguous(&a), contiguous(&b));
        let (keep, take) = ((1.0 - weight) as f32, weight as f32);
        let (av, bv) = (values(&a), values(&b));
        let mut out = vec![0.0f32; av.len()];
        out.par_chunks_mut(CHUNK)
            .zip(av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for j in 0..o.len() {
                    o[j] = a[j] * keep + b[j] * take;
                }
            });
        flex_tensor(out, a.shape().to_vec())
    }
}

#[cfg(feature = "tch")]
impl Lerp for burn::backend::LibTorch {
    fn lerp(
        a: burn::backend::libtorch::TchTensor,
        b: burn::backend::libtorch::TchTensor,
        weight: f64,
    ) -> burn::backend::libtorch::TchTensor {
        burn::backend::libtorch::TchTensor::new(a.tensor.lerp(&b.tensor, weight))
    }
}

/// a + weight (b - a), i.e. a (1 - weight) + b weight; `a` and `b` of one shape and device.
pub fn lerp<const D: usize>(a: Tensor<D>, b: Tensor<D>, weight: f64) -> Tensor<D> {
    if !(has_own_kernel(&a) && b.dtype() == a.dtype()) {
        return a * (1.0 - weight) + b * weight;
    }
    Tensor::from_dispatch(<Dispatch as Lerp>::lerp(
        a.into_dispatch(),
        b.into_dispatch(),
        weight,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{randn, stream};
    use crate::tensor::to_vec_f32;
    use burn::tensor::Device;

    fn check(device: Device) {
        let a = randn(&mut stream(3, "lerp-a", 0), [7, 40_000], &device);
        let b = randn(&mut stream(3, "lerp-b", 0), [7, 40_000], &device);
        let out = to_vec_f32(lerp(a.clone(), b.clone(), 0.3));
        let (a, b) = (to_vec_f32(a), to_vec_f32(b));
        for i in (0..out.len()).step_by(997) {
            let expected = 0.7 * a[i] + 0.3 * b[i];
            assert!(
                (out[i] - expected).abs() < 1e-6,
                "{i}: {} vs {expected}",
                out[i]
            );
        }
    }

    /// Against the formula, over several rayon chunks.
    #[test]
    fn matches_the_formula_on_flex() {
        check(Device::flex());
    }

    #[cfg(feature = "tch")]
    #[test]
    fn matches_the_formula_on_libtorch() {
        check(Device::libtorch());
    }
}
