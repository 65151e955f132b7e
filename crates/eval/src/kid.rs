//! KID, the kernel distance (Bińkowski et al. 2018, "Demystifying MMD GANs", section 5): the
//! unbiased estimate of the squared maximum mean discrepancy between two feature sets under the
//! cubic polynomial kernel k(x, y) = (x . y / d + 1)^3.
//!
//! Unlike FID it fits no covariance, so it is defined for any two sets of at least two samples
//! (FID needs more samples than features) and its estimate is unbiased at every sample size
//! (FID's grows as the sets shrink): it can score each class from 50 images in the full feature
//! dimension. Being unbiased it can come out slightly negative when the two sets come from one
//! distribution. torch-fidelity and clean-fid average it over random subsets of a large set;
//! here the sets are small enough for the estimate over all pairs, which needs no randomness.
//!
//! The kernel was chosen for Inception's pool features, whose inner products per dimension are
//! of order one. `pipeline eval` divides the features by the root mean square of the held-out
//! real ones ([`feature_scale`]) so that any evaluator's features are of that order: on the
//! reference evaluators' raw features (a few units each) the cubic term dominated and the
//! real-vs-real floor swung by more than the model's own figure (measured on the README's
//! recipe, 50 images per class: overall 6.4 against a floor of -2.1; scaled, 0.027 against
//! -0.012).

use nalgebra::DMatrix;

use crate::error::{EvalError, Result};
use crate::features::Features;

/// The features as an n x d f64 matrix, divided by `scale`.
fn matrix(f: &Features, scale: f64) -> DMatrix<f64> {
    DMatrix::from_row_iterator(
        f.len(),
        f.dim(),
        f.rows().flatten().map(|&v| f64::from(v) / scale),
    )
}

/// The root mean square of all the values of `f`: the scale [`kid`] divides features by, so
/// that the cubic kernel sees inner products of order one whatever the evaluator (Inception's
/// pool features, for which the kernel was chosen, are of that order; an evaluator whose
/// features are a few units each would make the cubic term, the noisiest, dominate).
pub fn feature_scale(f: &Features) -> f64 {
    let n = (f.len() * f.dim()).max(1) as f64;
    let sum_sq: f64 = f.rows().flatten().map(|&v| f64::from(v).powi(2)).sum();
    (sum_sq / n).sqrt().max(f64::MIN_POSITIVE)
}

/// Sum of k(a_i, b_j) over all pairs, k(x, y) = (x . y / d + 1)^3, and the sum of its
/// diagonal (k(a_i, b_i); meaningful when `a` and `b` are the same set).
fn kernel_sums(a: &DMatrix<f64>, b: &DMatrix<f64>, d: f64) -> (f64, f64) {
    let k = (a * b.transpose()).map(|g| (g / d + 1.0).powi(3));
    let diagonal = (0..k.nrows().min(k.ncols())).map(|i| k[(i, i)]).sum();
    (k.sum(), diagonal)
}

/// KID between `real` (m samples) and `generated` (n samples), both of dimension d and divided
/// by `scale` (see [`feature_scale`]; 1 for the textbook definition):
/// MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
///         - 2 sum_{i, j} k(x_i, y_j) / (m n)
/// (Gretton et al. 2012, eq. 3; Bińkowski et al. 2018, eq. 4 with their kernel).
pub fn kid(real: &Features, generated: &Features, scale: f64) -> Result<f64> {
    if real.dim() != generated.dim() {
        return Err(EvalError::FeatureDims {
            real: real.dim(),
            generated: generated.dim(),
        });
    }
    let (m, n) = (real.len(), generated.len());
    if m < 2 || n < 2 {
        return Err(EvalError::TooFewForKernel { n: m.min(n) });
    }
    let d = real.dim() as f64;
    let (x, y) = (matrix(real, scale), matrix(generated, scale));
    let (xx, xx_diag) = kernel_sums(&x, &x, d);
    let (yy, yy_diag) = kernel_sums(&y, &y, d);
    let (xy, _) = kernel_sums(&x, &y, d);
    let (m, n) = (m as f64, n as f64);
    Ok((xx - xx_diag) / (m * (m - 1.0)) + (yy - yy_diag) / (n * (n - 1.0)) - 2.0 * xy / (m * n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use ldm_common::rng::{randn, stream};

    fn gaussian(seed: u64, n: usize, d: usize, shift: f32) -> Features {
        let f = Features::from_tensor(randn(
            &mut stream(seed, "kid-features", 0),
            [n, d],
            &Device::flex(),
        ));
        Features::new(f.rows().flatten().map(|v| v + shift).collect(), d).unwrap()
    }

    /// d = 1, X = {0, 1}, Y = {1, 2}, k(a, b) = (a b + 1)^3: the XX pair gives 1, the YY pair
    /// 27, the XY pairs 1 + 1 + 8 + 27 = 37, so MMD^2_u = 2 / 2 + 54 / 2 - 2 * 37 / 4 = 9.5.
    #[test]
    fn a_hand_computed_example() {
        let x = Features::new(vec![0.0, 1.0], 1).unwrap();
        let y = Features::new(vec![1.0, 2.0], 1).unwrap();
        assert!((kid(&x, &y, 1.0).unwrap() - 9.5).abs() < 1e-12);
        assert!((kid(&y, &x, 1.0).unwrap() - 9.5).abs() < 1e-12, "symmetric");
    }

    /// The matrix form against the definition written out pair by pair.
    #[test]
    fn matches_the_pairwise_definition() {
        let (x, y) = (gaussian(1, 7, 5, 0.0), gaussian(2, 9, 5, 0.4));
        let k = |a: &[f32], b: &[f32]| {
            let dot: f64 = a
                .iter()
                .zip(b)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            (dot / 5.0 + 1.0).powi(3)
        };
        let rows = |f: &Features| -> Vec<Vec<f32>> { f.rows().map(<[f32]>::to_vec).collect() };
        let (xs, ys) = (rows(&x), rows(&y));
        let within = |s: &[Vec<f32>]| {
            let mut total = 0.0;
            for (i, a) in s.iter().enumerate() {
                for (j, b) in s.iter().enumerate() {
                    if i != j {
                        total += k(a, b);
                    }
                }
            }
            total / (s.len() * (s.len() - 1)) as f64
        };
        let across: f64 = xs
            .iter()
            .flat_map(|a| ys.iter().map(|b| k(a, b)))
            .sum::<f64>()
            / (xs.len() * ys.len()) as f64;
        let want = within(&xs) + within(&ys) - 2.0 * across;
        let got = kid(&x, &y, 1.0).unwrap();
        assert!(
            (got - want).abs() < 1e-9 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }

    /// Unbiased: two samples of one distribution average about 0 (either sign), far below a
    /// shifted one, and the figure grows with the shift.
    #[test]
    fn near_zero_for_one_distribution_and_growing_with_a_shift() {
        let same: Vec<f64> = (0..8)
            .map(|s| {
                kid(
                    &gaussian(10 + s, 60, 16, 0.0),
                    &gaussian(30 + s, 60, 16, 0.0),
                    1.0,
                )
                .unwrap()
            })
            .collect();
        let mean = same.iter().sum::<f64>() / same.len() as f64;
        let shifted = |shift| {
            kid(
                &gaussian(50, 60, 16, 0.0),
                &gaussian(51, 60, 16, shift),
                1.0,
            )
            .unwrap()
        };
        let (small, large) = (shifted(0.3), shifted(0.6));
        assert!(
            mean.abs() < 0.1 * small,
            "mean {mean} over {same:?}, shift 0.3: {small}"
        );
        assert!(
            same.iter().any(|v| *v < 0.0),
            "an unbiased estimate dips below 0: {same:?}"
        );
        assert!(large > 2.0 * small, "{small} -> {large}");
    }

    /// Divided by the real features' RMS, KID does not depend on the evaluator's units.
    #[test]
    fn the_feature_scale_removes_the_units() {
        let (x, y) = (gaussian(3, 20, 6, 0.5), gaussian(4, 25, 6, 0.9));
        let times = |f: &Features, c: f32| {
            Features::new(f.rows().flatten().map(|v| v * c).collect(), f.dim()).unwrap()
        };
        let (x7, y7) = (times(&x, 7.0), times(&y, 7.0));
        let scaled = kid(&x, &y, feature_scale(&x)).unwrap();
        let scaled_7 = kid(&x7, &y7, feature_scale(&x7)).unwrap();
        assert!(
            (scaled - scaled_7).abs() < 1e-6 * scaled.abs(),
            "{scaled} vs {scaled_7}"
        );
        assert!((feature_scale(&x7) / feature_scale(&x) - 7.0).abs() < 1e-6);
        let raw_7 = kid(&x7, &y7, 1.0).unwrap();
        assert!(
            raw_7 > 100.0 * scaled,
            "unscaled, the cubic term takes over: {raw_7}"
        );
    }

    #[test]
    fn too_few_samples_and_other_dims_are_refused() {
        let one = Features::new(vec![1.0, 2.0], 2).unwrap();
        let two = Features::new(vec![1.0, 2.0, 3.0, 4.0], 2).unwrap();
        let e = kid(&one, &two, 1.0).unwrap_err().to_string();
        assert_eq!(e, "KID needs at least 2 samples per set; one set has 1");
        assert!(kid(&two, &Features::new(vec![1.0; 6], 3).unwrap(), 1.0).is_err());
    }
}
