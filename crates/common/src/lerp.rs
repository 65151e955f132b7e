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

/// [`lerp`] of each pair (a_i, b_i), as rank-less dispatch tensors (a module's parameters),
/// all in one operation: on burn-tch, when every tensor is there and of one dtype, one
/// `torch.lerp` over all of them, the flat buffers taken as views where the tensors already
/// lie side by side (as the results do, so an EMA updated every step costs one launch after
/// its first step; PyTorch's EMA is one `torch._foreach_lerp_`). `None` elsewhere: the caller
/// blends pair by pair with [`lerp`] (on burn-flex one pass per pair already).
pub fn lerp_all(
    a: Vec<FloatTensor<Dispatch>>,
    b: Vec<FloatTensor<Dispatch>>,
    weight: f64,
) -> Option<Vec<FloatTensor<Dispatch>>> {
    assert_eq!(a.len(), b.len(), "lerp_all: as many tensors on each side");
    #[cfg(feature = "tch")]
    {
        torch_lerp_all(&a, &b, weight)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = weight;
        None
    }
}

/// [`lerp_all`] into the `a_i` themselves (as PyTorch's `_foreach_lerp_`), without new
/// tensors: on burn-tch, when the `a_i` are the views of one buffer that a previous
/// [`lerp_all`] left, and nothing holds that buffer but `handles` handles on each `a_i` (the
/// caller's list and its module's parameters: 2), and no `b_i` lies in it. Writing in place
/// changes every handle on the `a_i`, which is why any other makes it `false`, as does
/// anything else [`lerp_all`] would refuse: then nothing is written.
pub fn lerp_all_in_place(
    a: &[FloatTensor<Dispatch>],
    b: &[FloatTensor<Dispatch>],
    weight: f64,
    handles: usize,
) -> bool {
    assert_eq!(
        a.len(),
        b.len(),
        "lerp_all_in_place: as many tensors on each side"
    );
    #[cfg(feature = "tch")]
    {
        torch_lerp_all_in_place(a, b, weight, handles)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = (weight, handles);
        false
    }
}

/// [`lerp_all_in_place`] on libtorch.
#[cfg(feature = "tch")]
fn torch_lerp_all_in_place(
    a: &[FloatTensor<Dispatch>],
    b: &[FloatTensor<Dispatch>],
    weight: f64,
    handles: usize,
) -> bool {
    use crate::torch_ops::flat::{exclusive_flat, flatten};
    let Some((a, b)) = libtorch_pairs(a, b) else {
        return false;
    };
    // (not when some b_i lies in the buffer: an EMA just copied from the model, say)
    let Some(mut flat) = exclusive_flat(&a, handles, &b) else {
        return false;
    };
    let b: Vec<&tch::Tensor> = b.iter().map(|t| &t.tensor).collect();
    let _ = flat.lerp_(&flatten(&b), weight);
    true
}

/// The burn-tch tensors of `a` and `b`, if every one is a libtorch tensor, all of one dtype,
/// `a_i` and `b_i` of one shape (what [`lerp_all`] and [`lerp_all_in_place`] blend).
#[cfg(feature = "tch")]
fn libtorch_pairs<'a>(
    a: &'a [FloatTensor<Dispatch>],
    b: &'a [FloatTensor<Dispatch>],
) -> Option<(
    Vec<&'a burn::backend::libtorch::TchTensor>,
    Vec<&'a burn::backend::libtorch::TchTensor>,
)> {
    use crate::torch_ops::flat::as_tch_tensor;
    let a: Vec<_> = a.iter().map(as_tch_tensor).collect::<Option<_>>()?;
    let b: Vec<_> = b.iter().map(as_tch_tensor).collect::<Option<_>>()?;
    let kind = a.first()?.tensor.kind();
    let matched = a.iter().chain(&b).all(|t| t.tensor.kind() == kind)
        && a.iter()
            .zip(&b)
            .all(|(a, b)| a.tensor.size() == b.tensor.size());
    matched.then_some((a, b))
}

/// [`lerp_all`] on libtorch, or `None` if some tensor is elsewhere or of another dtype.
#[cfg(feature = "tch")]
fn torch_lerp_all(
    a: &[FloatTensor<Dispatch>],
    b: &[FloatTensor<Dispatch>],
    weight: f64,
) -> Option<Vec<FloatTensor<Dispatch>>> {
    use crate::torch_ops::flat::{flatten, from_tch, split};
    let (a, b) = libtorch_pairs(a, b)?;
    let (a, b): (Vec<&tch::Tensor>, Vec<&tch::Tensor>) = (
        a.iter().map(|t| &t.tensor).collect(),
        b.iter().map(|t| &t.tensor).collect(),
    );
    let shapes: Vec<Vec<i64>> = a.iter().map(|t| t.size()).collect();
    let out = flatten(&a).lerp(&flatten(&b), weight);
    Some(split(&out, &shapes).into_iter().map(from_tch).collect())
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

    /// On libtorch every pair against the formula, tensors of several shapes at once; on
    /// burn-flex `None` (pair by pair is the caller's).
    fn check_all(device: Device) -> bool {
        let draw = |name: &str, dims: [usize; 2]| randn(&mut stream(3, name, 0), dims, &device);
        let a = [draw("a0", [3, 5]), draw("a1", [1, 7])];
        let b = [draw("b0", [3, 5]), draw("b1", [1, 7])];
        let Some(out) = lerp_all(
            a.iter().map(|t| t.clone().into_dispatch()).collect(),
            b.iter().map(|t| t.clone().into_dispatch()).collect(),
            0.25,
        ) else {
            return false;
        };
        for ((a, b), out) in a.into_iter().zip(b).zip(out) {
            let out = Tensor::<2>::from_dispatch(out);
            assert_eq!(out.dims(), a.dims());
            let (a, b, out) = (to_vec_f32(a), to_vec_f32(b), to_vec_f32(out));
            for i in 0..out.len() {
                assert!((out[i] - (0.75 * a[i] + 0.25 * b[i])).abs() < 1e-6);
            }
        }
        true
    }

    #[test]
    fn lerp_all_leaves_flex_to_the_caller() {
        assert!(!check_all(Device::flex()));
    }

    #[cfg(feature = "tch")]
    #[test]
    fn lerp_all_matches_the_formula_on_libtorch() {
        assert!(check_all(Device::libtorch()));
    }

    /// In place only into the views of one buffer that a previous `lerp_all` left, held by no
    /// other handle than the ones named, and not while the other side lies in that buffer.
    #[cfg(feature = "tch")]
    #[test]
    fn lerp_all_in_place_writes_only_into_a_buffer_of_its_own() {
        let device = Device::libtorch();
        let draw = |name: &str, dims: [usize; 2]| {
            randn(&mut stream(4, name, 0), dims, &device).into_dispatch()
        };
        let values = |t: &FloatTensor<Dispatch>| to_vec_f32(Tensor::<2>::from_dispatch(t.clone()));
        let a = vec![draw("a0", [3, 5]), draw("a1", [1, 7])];
        let b = vec![draw("b0", [3, 5]), draw("b1", [1, 7])];
        // tensors of their own, not views of one buffer
        assert!(!lerp_all_in_place(&a, &b, 0.5, 1));
        let a = lerp_all(a, b.clone(), 0.25).expect("libtorch");
        let before: Vec<Vec<f32>> = a.iter().map(values).collect();
        assert!(lerp_all_in_place(&a, &b, 0.5, 1));
        for ((a, before), b) in a.iter().zip(&before).zip(&b) {
            for ((x, y), z) in values(a).iter().zip(before).zip(values(b)) {
                assert!((x - (0.5 * y + 0.5 * z)).abs() < 1e-6);
            }
        }
        // the other side in the buffer (the same handles, or others on the same memory), or a
        // handle held elsewhere
        assert!(!lerp_all_in_place(&a, &a, 0.5, 1));
        let alias: Vec<FloatTensor<Dispatch>> = a
            .iter()
            .map(|t| {
                let view = crate::torch_ops::flat::as_tch(t).unwrap().shallow_clone();
                crate::torch_ops::flat::from_tch(burn::backend::libtorch::TchTensor::new(view))
            })
            .collect();
        assert!(!lerp_all_in_place(&a, &alias, 0.5, 1));
        drop(alias);
        let held = a[1].clone();
        assert!(!lerp_all_in_place(&a, &b, 0.5, 1));
        drop(held);
        assert!(lerp_all_in_place(&a, &b, 0.5, 1));
    }
}
