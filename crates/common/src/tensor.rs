//! Reading tensors back to the host (each call is a device sync: keep them off hot paths).

use burn::tensor::Tensor;

/// All values of a float tensor as f32, whatever its stored dtype.
pub fn to_vec_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("float tensors convert to f32")
}

/// The single value of a one-element tensor as f64.
pub fn scalar<const D: usize>(t: Tensor<D>) -> f64 {
    f64::from(to_vec_f32(t)[0])
}
