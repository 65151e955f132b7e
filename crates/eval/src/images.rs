//! Image batches on the host for the pixel metrics (PSNR, SSIM).

use burn::tensor::Tensor;

use crate::error::{EvalError, Result};

/// Two batches read to the host (one sync each), checked to share `[n, c, h, w]`.
pub(crate) fn host_pair(
    what: &'static str,
    a: Tensor<4>,
    b: Tensor<4>,
) -> Result<(Vec<f32>, Vec<f32>, [usize; 4])> {
    let (dims_a, dims_b) = (a.dims(), b.dims());
    if dims_a != dims_b {
        return Err(EvalError::ShapeMismatch {
            what,
            left: format!("{dims_a:?}"),
            right: format!("{dims_b:?}"),
        });
    }
    if dims_a.contains(&0) {
        return Err(EvalError::NoImages { what });
    }
    let to_host = ldm_common::tensor::to_vec_f32;
    Ok((to_host(a), to_host(b), dims_a))
}

/// The arithmetic mean; an error for an empty list.
pub(crate) fn mean(what: &'static str, values: &[f64]) -> Result<f64> {
    if values.is_empty() {
        return Err(EvalError::NoImages { what });
    }
    Ok(values.iter().sum::<f64>() / values.len() as f64)
}
