//! Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004), as their reference
//! `ssim_index.m`: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1,
//! statistics over 'valid' window positions only, the SSIM map averaged.

use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::error::{EvalError, Result};
use crate::images::{host_pair, mean};

/// Side of the Gaussian window.
pub const WINDOW: usize = 11;
const SIGMA: f64 = 1.5;
const C1: f64 = 0.01 * 0.01;
const C2: f64 = 0.03 * 0.03;

/// SSIM of two images in [0, 1] laid out as `[channels, height, width]`, the mean of the
/// per-channel SSIM. Needs height and width of at least 11.
pub fn ssim(a: &[f32], b: &[f32], [channels, height, width]: [usize; 3]) -> Result<f64> {
    let len = channels * height * width;
    if a.len() != len || b.len() != len {
        return Err(EvalError::ShapeMismatch {
            what: "SSIM",
            left: format!("{} and {} pixels", a.len(), b.len()),
            right: format!("[{channels}, {height}, {width}] = {len} pixels"),
        });
    }
    if len == 0 {
        return Err(EvalError::NoImages { what: "SSIM" });
    }
    if height < WINDOW || width < WINDOW {
        return Err(EvalError::ImageTooSmall {
            height,
            width,
            window: WINDOW,
        });
    }
    let plane = height * width;
    let total: f64 = a
        .chunks_exact(plane)
        .zip(b.chunks_exact(plane))
        .map(|(x, y)| ssim_plane(x, y, height, width))
        .sum();
    Ok(total / channels as f64)
}

/// SSIM of each image pair of two `[n, c, h, w]` batches in [0, 1].
pub fn ssim_per_image(a: Tensor<4>, b: Tensor<4>) -> Result<Vec<f64>> {
    let (a, b, [_, c, h, w]) = host_pair("SSIM", a, b)?;
    let len = c * h * w;
    a.par_chunks_exact(len)
        .zip(b.par_chunks_exact(len))
        .map(|(x, y)| ssim(x, y, [c, h, w]))
        .collect()
}

/// The mean over image pairs of the per-image SSIM.
pub fn mean_ssim(a: Tensor<4>, b: Tensor<4>) -> Result<f64> {
    mean("SSIM", &ssim_per_image(a, b)?)
}

/// mean over valid positions of (2 mu_x mu_y + C1)(2 s_xy + C2) /
/// ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))  (Wang et al. 2004, eq. 13).
fn ssim_plane(x: &[f32], y: &[f32], h: usize, w: usize) -> f64 {
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let y: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    let product =
        |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(a, b)| a * b).collect() };
    let taps = gaussian_taps();
    let mu_x = filter_valid(&x, h, w, &taps);
    let mu_y = filter_valid(&y, h, w, &taps);
    let xx = filter_valid(&product(&x, &x), h, w, &taps);
    let yy = filter_valid(&product(&y, &y), h, w, &taps);
    let xy = filter_valid(&product(&x, &y), h, w, &taps);
    let n = mu_x.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (mx, my) = (mu_x[i], mu_y[i]);
            let (sxx, syy, sxy) = (xx[i] - mx * mx, yy[i] - my * my, xy[i] - mx * my);
            ((2.0 * mx * my + C1) * (2.0 * sxy + C2))
                / ((mx * mx + my * my + C1) * (sxx + syy + C2))
        })
        .sum();
    total / n as f64
}

/// g_i = exp(-(i - 5)^2 / (2 sigma^2)) / sum; g g^T is MATLAB's fspecial('gaussian', 11, 1.5).
fn gaussian_taps() -> [f64; WINDOW] {
    let centre = (WINDOW / 2) as f64;
    let mut taps = [0.0; WINDOW];
    for (i, t) in taps.iter_mut().enumerate() {
        *t = (-(i as f64 - centre).powi(2) / (2.0 * SIGMA * SIGMA)).exp();
    }
    let sum: f64 = taps.iter().sum();
    taps.map(|t| t / sum)
}

/// The window-weighted mean at every position where the window fits ('valid' filtering, rows
/// then columns): `[h, w]` -> `[h - 10, w - 10]`, row-major.
fn filter_valid(plane: &[f64], h: usize, w: usize, taps: &[f64; WINDOW]) -> Vec<f64> {
    let (oh, ow) = (h - WINDOW + 1, w - WINDOW + 1);
    // [h, ow]: filtered along each row
    let mut rows = vec![0.0; h * ow];
    for r in 0..h {
        for c in 0..ow {
            let src = &plane[r * w + c..r * w + c + WINDOW];
            rows[r * ow + c] = src.iter().zip(taps).map(|(v, t)| v * t).sum();
        }
    }
    // [oh, ow]: then along each column
    let mut out = vec![0.0; oh * ow];
    for r in 0..oh {
        for c in 0..ow {
            out[r * ow + c] = (0..WINDOW).map(|k| rows[(r + k) * ow + c] * taps[k]).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The image pair of `fixtures/ssim_reference.py`: a 31-bit LCG, a = next % 256,
    /// b = clamp(a + next % 121 - 60, 0, 255), pixels k / 255.
    fn lcg_images(len: usize) -> (Vec<f32>, Vec<f32>) {
        let mut state: u64 = 2004;
        let mut next = || {
            state = (state * 1_103_515_245 + 12_345) % (1 << 31);
            (state >> 16) as i64
        };
        (0..len)
            .map(|_| {
                let a = next() % 256;
                let b = (a + next() % 121 - 60).clamp(0, 255);
                (a as f32 / 255.0, b as f32 / 255.0)
            })
            .unzip()
    }

    #[test]
    fn identical_images_score_one() {
        let (a, _) = lcg_images(3 * 12 * 14);
        assert!((ssim(&a, &a, [3, 12, 14]).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn taps_are_normalised_and_symmetric() {
        let taps = gaussian_taps();
        assert!((taps.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(taps[0], taps[10]);
        // exp(-25 / 4.5) / exp(0): the edge tap relative to the centre
        assert!((taps[0] / taps[5] - (-25.0f64 / 4.5).exp()).abs() < 1e-15);
    }

    #[test]
    fn a_shifted_ramp_has_the_closed_form_luminance_term() {
        // x = ramp along the width, y = x + delta: sigma_x = sigma_y = sigma_xy, so the
        // contrast-structure term is 1; a symmetric window's mean of a ramp is its centre
        // value, so SSIM = mean over valid centres m of (2 m (m + delta) + C1) /
        // (m^2 + (m + delta)^2 + C1).
        let (h, w, delta) = (12, 16, 0.2);
        let ramp = |c: usize| 0.1 + 0.03 * c as f64;
        let x: Vec<f32> = (0..h * w).map(|i| ramp(i % w) as f32).collect();
        let y: Vec<f32> = x.iter().map(|&v| v + delta as f32).collect();
        let centres = 5..w - 5;
        let expected = centres
            .clone()
            .map(|c| {
                let (m, n) = (ramp(c), ramp(c) + delta);
                (2.0 * m * n + C1) / (m * m + n * n + C1)
            })
            .sum::<f64>()
            / centres.len() as f64;
        let got = ssim(&x, &y, [1, h, w]).unwrap();
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        assert!(got < 0.95, "the shift must matter: {got}");
    }

    #[test]
    fn matches_the_reference_implementation() {
        // fixtures/ssim_reference.py (the 2-D window of ssim_index.m; scipy agrees to 1e-15)
        let (a, b) = lcg_images(2 * 16 * 13);
        let got = ssim(&a, &b, [2, 16, 13]).unwrap();
        assert!((got - 0.896_266_734_891_811).abs() < 1e-6, "{got}");
    }

    #[test]
    fn batches_give_per_image_values_and_their_mean() {
        let device = Device::flex();
        let (a, b) = lcg_images(2 * 16 * 13);
        let data = |v: Vec<f32>| {
            Tensor::<4>::from_data(burn::tensor::TensorData::new(v, [2, 1, 16, 13]), &device)
        };
        let per = ssim_per_image(data(a.clone()), data(b.clone())).unwrap();
        let plane = 16 * 13;
        let expected = [0.933_913_605_821_451_6, 0.858_619_863_962_169_4];
        for (p, e) in per.iter().zip(expected) {
            assert!((p - e).abs() < 1e-6, "{per:?}");
        }
        assert_eq!(per[0], ssim(&a[..plane], &b[..plane], [1, 16, 13]).unwrap());
        let m = mean_ssim(data(a), data(b)).unwrap();
        assert!((m - 0.896_266_734_891_811).abs() < 1e-6);
    }

    #[test]
    fn small_or_mismatched_images_are_refused() {
        let err = ssim(&[0.0; 64], &[0.0; 64], [1, 8, 8]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "SSIM needs images of at least 11x11 pixels (its Gaussian window), got 8x8"
        );
        assert!(ssim(&[0.0; 121], &[0.0; 120], [1, 11, 11]).is_err());
    }
}
