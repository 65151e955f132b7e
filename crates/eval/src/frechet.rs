//! The Fréchet distance between Gaussians fitted to feature sets, the FID of Heusel et al.
//! (2017), computed as pytorch-fid does but with symmetric eigendecompositions only.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::error::{EvalError, Result};
use crate::features::Features;

/// The mean and covariance of a feature set, N(mu, Sigma).
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianStats {
    mean: DVector<f64>,
    cov: DMatrix<f64>,
}

impl GaussianStats {
    /// mu = mean of the rows, Sigma = their unbiased covariance (`np.cov(x, rowvar=False)`,
    /// as pytorch-fid); needs n > d samples, else Sigma is singular by construction.
    pub fn fit(features: &Features) -> Result<Self> {
        let (n, d) = (features.len(), features.dim());
        if n <= d {
            return Err(EvalError::TooFewSamples { n, d });
        }
        let mut mean = DVector::<f64>::zeros(d);
        for row in features.rows() {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += f64::from(x);
            }
        }
        mean /= n as f64;
        // [n, d], centred
        let centred = DMatrix::<f64>::from_fn(n, d, |i, j| f64::from(features.row(i)[j]) - mean[j]);
        let cov = centred.tr_mul(&centred) / (n - 1) as f64;
        Ok(Self { mean, cov })
    }

    /// A Gaussian given directly: `mean` of length d and `cov` as d*d values, row-major
    /// (symmetrised as (S + S^T) / 2).
    pub fn new(mean: Vec<f64>, cov: Vec<f64>) -> Result<Self> {
        let d = mean.len();
        if cov.len() != d * d {
            return Err(EvalError::ShapeMismatch {
                what: "Gaussian mean and covariance",
                left: format!("mean of length {d}"),
                right: format!("{} covariance values (expected {})", cov.len(), d * d),
            });
        }
        let cov = DMatrix::from_row_slice(d, d, &cov);
        Ok(Self {
            mean: DVector::from_vec(mean),
            cov: (&cov + cov.transpose()) * 0.5,
        })
    }

    /// Dimension d.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    pub fn mean(&self) -> &[f64] {
        self.mean.as_slice()
    }

    /// Sigma, column-major (it is symmetric, so also row-major).
    pub fn covariance(&self) -> &[f64] {
        self.cov.as_slice()
    }
}

/// d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)  (Dowson & Landau 1982;
/// FID, Heusel et al. 2017). tr((S1 S2)^1/2) is taken as tr((S1^1/2 S2 S1^1/2)^1/2), a
/// symmetric PSD matrix, so no complex square root can appear; roundoff below 0 is clamped.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    if a.dim() != b.dim() {
        return Err(EvalError::FeatureDims {
            real: a.dim(),
            generated: b.dim(),
        });
    }
    let mean_term = (&a.mean - &b.mean).norm_squared();
    let sqrt_a = psd_sqrt(a.cov.clone());
    let inner = &sqrt_a * &b.cov * &sqrt_a;
    // symmetric up to roundoff; make it exact for the symmetric solver
    let inner = (&inner + inner.transpose()) * 0.5;
    let trace_sqrt: f64 = SymmetricEigen::new(inner)
        .eigenvalues
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum();
    Ok((mean_term + a.cov.trace() + b.cov.trace() - 2.0 * trace_sqrt).max(0.0))
}

/// S^1/2 = V diag(sqrt(max(l, 0))) V^T for a symmetric PSD S = V diag(l) V^T; eigenvalues
/// below 0 are roundoff of a rank-deficient covariance.
fn psd_sqrt(s: DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(s);
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// FID between two feature sets: the Fréchet distance of their fitted Gaussians.
pub fn fid(real: &Features, generated: &Features) -> Result<f64> {
    if real.dim() != generated.dim() {
        return Err(EvalError::FeatureDims {
            real: real.dim(),
            generated: generated.dim(),
        });
    }
    frechet_distance(&GaussianStats::fit(real)?, &GaussianStats::fit(generated)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use ldm_common::rng::{randn, stream};

    fn gaussian(seed: u64, n: usize, d: usize) -> Features {
        Features::from_tensor(randn(
            &mut stream(seed, "features", 0),
            [n, d],
            &Device::flex(),
        ))
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn identical_sets_are_at_distance_zero() {
        let f = gaussian(1, 300, 16);
        let scale = GaussianStats::fit(&f).unwrap().cov.trace();
        let d = fid(&f, &f).unwrap();
        assert!(d.abs() < 1e-6 * scale, "{d}");
    }

    #[test]
    fn a_pure_mean_shift_gives_the_squared_shift() {
        let f = gaussian(2, 300, 8);
        let shift: Vec<f32> = (0..8).map(|j| 0.25 * j as f32 - 1.0).collect();
        let shifted: Vec<Vec<f32>> = f
            .rows()
            .map(|r| r.iter().zip(&shift).map(|(x, s)| x + s).collect())
            .collect();
        let expected: f64 = shift.iter().map(|&s| f64::from(s).powi(2)).sum();
        // the covariance of the shifted set differs by f32 rounding of x + s only
        close(
            fid(&f, &Features::from_rows(&shifted).unwrap()).unwrap(),
            expected,
            1e-5,
        );
    }

    #[test]
    fn diagonal_covariances_match_the_closed_form() {
        // |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = (1 + 4) + (1 - 3)^2 + (2 - 1)^2 = 10
        let a = GaussianStats::new(vec![0.0, 0.0], vec![1.0, 0.0, 0.0, 4.0]).unwrap();
        let b = GaussianStats::new(vec![1.0, 2.0], vec![9.0, 0.0, 0.0, 1.0]).unwrap();
        close(frechet_distance(&a, &b).unwrap(), 10.0, 1e-9);
    }

    #[test]
    fn commuting_covariances_match_the_closed_form() {
        // S1 = R diag(1, 4) R^T, S2 = R diag(4, 9) R^T share eigenvectors: the distance is
        // |dmu|^2 + (1 - 2)^2 + (2 - 3)^2 = 0.25 + 2
        let (c, s) = (0.3f64.cos(), 0.3f64.sin());
        let rotate = |l1: f64, l2: f64| {
            vec![
                c * c * l1 + s * s * l2,
                c * s * (l1 - l2),
                c * s * (l1 - l2),
                s * s * l1 + c * c * l2,
            ]
        };
        let a = GaussianStats::new(vec![0.5, 0.0], rotate(1.0, 4.0)).unwrap();
        let b = GaussianStats::new(vec![0.0, 0.0], rotate(4.0, 9.0)).unwrap();
        close(frechet_distance(&a, &b).unwrap(), 2.25, 1e-9);
    }

    #[test]
    fn non_commuting_covariances_match_sqrtm() {
        // fixtures/frechet_reference.py (Denman-Beavers; scipy.linalg.sqrtm agrees to 2e-15)
        let a = GaussianStats::new(
            vec![0.1, -0.2, 0.3],
            vec![2.0, 0.5, 0.1, 0.5, 1.0, 0.3, 0.1, 0.3, 1.5],
        )
        .unwrap();
        let b = GaussianStats::new(
            vec![0.5, 0.1, -0.4],
            vec![1.0, -0.4, 0.2, -0.4, 2.0, 0.6, 0.2, 0.6, 0.8],
        )
        .unwrap();
        close(
            frechet_distance(&a, &b).unwrap(),
            1.604_351_723_847_431,
            1e-9,
        );
        close(
            frechet_distance(&b, &a).unwrap(),
            1.604_351_723_847_431,
            1e-9,
        );
    }

    #[test]
    fn fit_uses_the_unbiased_covariance() {
        // rows (0, 0), (2, 0), (1, 3): mean (1, 1); cov [[1, 0], [0, 3]] with n - 1 = 2
        let f = Features::from_rows(&[vec![0.0, 0.0], vec![2.0, 0.0], vec![1.0, 3.0]]).unwrap();
        let g = GaussianStats::fit(&f).unwrap();
        assert_eq!(g.mean(), &[1.0, 1.0]);
        assert_eq!(g.covariance(), &[1.0, 0.0, 0.0, 3.0]);
    }

    #[test]
    fn too_few_samples_or_mismatched_dims_are_refused() {
        let err = fid(&gaussian(3, 50, 128), &gaussian(4, 500, 128)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "FID needs more samples than feature dimensions: got n = 50 for d = 128; use -n 129 or more"
        );
        let err = fid(&gaussian(3, 50, 4), &gaussian(4, 50, 5)).unwrap_err();
        assert!(
            matches!(
                err,
                EvalError::FeatureDims {
                    real: 4,
                    generated: 5
                }
            ),
            "{err}"
        );
        let empty = Features::new(Vec::new(), 4).unwrap();
        assert!(matches!(
            fid(&empty, &gaussian(4, 50, 4)).unwrap_err(),
            EvalError::TooFewSamples { n: 0, d: 4 }
        ));
    }
}
