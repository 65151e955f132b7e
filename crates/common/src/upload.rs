//! Host-to-device uploads of a step's inputs: the batch, its noise, timesteps and labels.
//!
//! On CUDA (burn-tch, a `tch` build) they go through page-locked memory without waiting for
//! the device, as PyTorch's data loaders with `pin_memory` do
//! ([`crate::torch_ops::upload`], checked on first use); everywhere else through burn's
//! `Tensor::from_data`. The values are the same either way.

use burn::tensor::{Device, Int, Shape, Tensor, TensorData};

/// `values` (row-major) as a `shape` float tensor on `device`.
pub fn float<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if let Some(t) = crate::torch_ops::upload::pinned_float(&values, shape, device) {
        return t;
    }
    Tensor::from_data(TensorData::new(values, Shape::new(shape)), device)
}

/// `values` (row-major) as a `shape` integer tensor on `device`.
pub fn int<const D: usize>(values: Vec<i64>, shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    #[cfg(feature = "tch")]
    if let Some(t) = crate::torch_ops::upload::pinned_int(&values, shape, device) {
        return t;
    }
    Tensor::from_data(TensorData::new(values, Shape::new(shape)), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::to_vec_f32;

    #[test]
    fn uploads_keep_values_shape_and_autodiff_context() {
        let plain = Device::flex();
        for device in [plain.clone(), plain.autodiff()] {
            let x = float(vec![1.0, -2.5, 3.0, 0.25], [2, 2], &device);
            assert_eq!(x.dims(), [2, 2]);
            assert_eq!(x.is_autodiff(), device.is_autodiff());
            assert_eq!(to_vec_f32(x), [1.0, -2.5, 3.0, 0.25]);
            let i = int(vec![4, -1, 70_000], [3], &device);
            assert_eq!(
                i.into_data().try_into_vec_as::<i64>().unwrap(),
                [4, -1, 70_000]
            );
        }
    }
}
