//! Peak signal-to-noise ratio for images in [0, 1].

use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::error::{EvalError, Result};
use crate::images::{host_pair, mean};

/// PSNR = 10 log10(1 / MSE) in dB for pixels in [0, 1] (data range 1; clamp decoder outputs
/// first). Identical images give `f64::INFINITY` (not capped), as scikit-image does.
pub fn psnr(a: &[f32], b: &[f32]) -> Result<f64> {
    if a.len() != b.len() {
        return Err(EvalError::ShapeMismatch {
            what: "PSNR",
            left: format!("{} pixels", a.len()),
            right: format!("{} pixels", b.len()),
        });
    }
    if a.is_empty() {
        return Err(EvalError::NoImages { what: "PSNR" });
    }
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    Ok(-10.0 * mse.log10())
}

/// PSNR of each image pair of two `[n, c, h, w]` batches in [0, 1].
pub fn psnr_per_image(a: Tensor<4>, b: Tensor<4>) -> Result<Vec<f64>> {
    let (a, b, [_, c, h, w]) = host_pair("PSNR", a, b)?;
    let len = c * h * w;
    a.par_chunks_exact(len)
        .zip(b.par_chunks_exact(len))
        .map(|(x, y)| psnr(x, y))
        .collect()
}

/// The mean over image pairs of the per-image PSNR (infinite if any pair is identical).
pub fn mean_psnr(a: Tensor<4>, b: Tensor<4>) -> Result<f64> {
    mean("PSNR", &psnr_per_image(a, b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn identical_images_are_infinite() {
        let a = [0.1, 0.5, 0.9];
        assert_eq!(psnr(&a, &a).unwrap(), f64::INFINITY);
    }

    #[test]
    fn a_known_mse_gives_the_exact_psnr() {
        // half the pixels off by 0.25: MSE = 0.0625 / 2 = 1/32, PSNR = 10 log10(32)
        let a = [0.0f32; 8];
        let b = [0.25, 0.0, 0.25, 0.0, 0.25, 0.0, 0.25, 0.0];
        let expected = 15.051_499_783_199_06;
        assert!((psnr(&a, &b).unwrap() - expected).abs() < 1e-12);
        // MSE 1 -> 0 dB
        assert!((psnr(&[0.0], &[1.0]).unwrap()).abs() < 1e-12);
    }

    #[test]
    fn batches_give_per_image_values_and_their_mean() {
        let device = Device::flex();
        // image 0: MSE 1/32 (15.0515 dB); image 1: MSE 1/4 (6.0206 dB)
        let a = Tensor::<4>::zeros([2, 2, 1, 2], &device);
        let b = Tensor::<4>::from_floats(
            [[[[0.25, 0.25]], [[0.0, 0.0]]], [[[0.5, 0.5]], [[0.5, 0.5]]]],
            &device,
        );
        let per = psnr_per_image(a.clone(), b.clone()).unwrap();
        let expected = [10.0 * 32f64.log10(), 10.0 * 4f64.log10()];
        for (p, e) in per.iter().zip(expected) {
            assert!((p - e).abs() < 1e-12, "{per:?}");
        }
        let m = mean_psnr(a.clone(), b).unwrap();
        assert!((m - (expected[0] + expected[1]) / 2.0).abs() < 1e-12);
        let err = mean_psnr(a, Tensor::<4>::zeros([2, 1, 2, 2], &device)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PSNR: shapes differ, [2, 2, 1, 2] vs [2, 1, 2, 2]"
        );
    }
}
