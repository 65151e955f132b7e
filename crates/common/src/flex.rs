//! Helpers shared by this crate's burn-flex backend extensions (`gemm_conv`, `group_norm`):
//! reading a burn-flex tensor's values and making one from a `Vec`.

use burn::backend::DispatchDevice;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Device, Tensor, TensorData};

/// The tensor in row-major order with no offset (copied only if it is not already).
pub fn contiguous(t: &FlexTensor) -> FlexTensor {
    into_contiguous(t.clone())
}

/// [`contiguous`] taking the handle: `t` itself when it already is (so that `storage_mut`
/// writes it in place if no other handle shares the storage), else a copy.
pub fn into_contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a tensor made by [`contiguous`]; the extensions route only f32 tensors here.
pub fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("an f32 tensor made contiguous (the callers check the dtype)")
}

/// A burn-flex tensor of these values and shape.
pub fn flex_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// Whether `device` is burn-flex (with or without autodiff).
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}

/// Whether `x` lives on burn-flex (with or without autodiff).
pub fn on_flex<const D: usize>(x: &Tensor<D>) -> bool {
    is_flex(&x.device())
}

/// Whether `x` is an f32 tensor on burn-flex: where this crate's own operations run.
pub fn on_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    on_flex(x) && x.dtype() == DType::F32
}

/// Whether an operation with both a burn-flex kernel (f32) and a libtorch one runs its own
/// kernel on `x`: [`on_flex_f32`], or burn-tch in the `tch` build.
pub fn has_own_kernel<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    if crate::torch_ops::on_libtorch(x) {
        return true;
    }
    on_flex_f32(x)
}
