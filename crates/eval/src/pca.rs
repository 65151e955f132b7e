//! Principal components of a feature set: the k directions of largest variance, used to
//! compare small per-class sets in fewer dimensions than the evaluator's d (FID needs n > d).

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::error::{EvalError, Result};
use crate::features::Features;
use crate::frechet::GaussianStats;

/// An orthonormal projection onto the top-k principal directions of a reference set:
/// y = V_k^T (x - mu), V_k the eigenvectors of its covariance with the k largest eigenvalues.
#[derive(Debug, Clone)]
pub struct Pca {
    mean: DVector<f64>,
    /// `[k, d]`: one principal direction per row, by decreasing eigenvalue.
    directions: DMatrix<f64>,
    /// Fraction of the reference set's total variance the k directions keep:
    /// sum of the top k eigenvalues / tr(Sigma).
    explained_variance: f64,
}

impl Pca {
    /// Fits the top `k` directions (1 <= k <= d) of `reference`, which needs n > d samples
    /// (as any full-rank covariance does).
    pub fn fit(reference: &Features, k: usize) -> Result<Self> {
        let d = reference.dim();
        if k == 0 || k > d {
            return Err(EvalError::InvalidConfig {
                key: "PCA dimensions".into(),
                value: k.to_string(),
                expected: format!("1 to the feature dimension {d}"),
            });
        }
        let stats = GaussianStats::fit(reference)?;
        let cov = DMatrix::from_column_slice(d, d, stats.covariance());
        let eig = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let top = &order[..k];
        let directions = DMatrix::from_fn(k, d, |r, c| eig.eigenvectors[(c, top[r])]);
        let total: f64 = eig.eigenvalues.iter().map(|l| l.max(0.0)).sum();
        let kept: f64 = top.iter().map(|&i| eig.eigenvalues[i].max(0.0)).sum();
        Ok(Self {
            mean: DVector::from_column_slice(stats.mean()),
            directions,
            explained_variance: if total > 0.0 { kept / total } else { 1.0 },
        })
    }

    /// Number of kept directions k.
    pub fn dim(&self) -> usize {
        self.directions.nrows()
    }

    /// Fraction of the reference variance kept, in [0, 1].
    pub fn explained_variance(&self) -> f64 {
        self.explained_variance
    }

    /// The k coordinates of every sample of `features` (same d as the reference).
    pub fn project(&self, features: &Features) -> Result<Features> {
        if features.dim() != self.mean.len() {
            return Err(EvalError::FeatureDims {
                real: self.mean.len(),
                generated: features.dim(),
            });
        }
        let mut values = Vec::with_capacity(features.len() * self.dim());
        for row in features.rows() {
            let centred = DVector::from_iterator(
                row.len(),
                row.iter()
                    .zip(self.mean.iter())
                    .map(|(&x, m)| f64::from(x) - m),
            );
            values.extend((&self.directions * centred).iter().map(|&y| y as f32));
        }
        Features::new(values, self.dim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frechet::fid;

    /// n samples with independent coordinates of standard deviations `scales`, then rotated
    /// so that no axis is a principal direction.
    fn anisotropic(seed: u64, n: usize, scales: &[f32], shift: f32) -> Features {
        let d = scales.len();
        let mut rng = ldm_common::rng::stream(seed, "features", 0);
        let z = ldm_common::rng::randn(&mut rng, [n, d], &burn::tensor::Device::flex());
        let z = Features::from_tensor(z);
        let rows: Vec<Vec<f32>> = z
            .rows()
            .map(|r| {
                let x: Vec<f32> = r.iter().zip(scales).map(|(v, s)| v * s).collect();
                // a fixed rotation by 30 degrees in every pair of coordinates (0,1), (2,3), ...
                let (c, s) = (0.866_025_4f32, 0.5f32);
                (0..d)
                    .map(|j| {
                        let pair = j - j % 2;
                        let y = if pair + 1 < d {
                            if j % 2 == 0 {
                                c * x[pair] - s * x[pair + 1]
                            } else {
                                s * x[pair] + c * x[pair + 1]
                            }
                        } else {
                            x[j]
                        };
                        y + shift
                    })
                    .collect()
            })
            .collect();
        Features::from_rows(&rows).unwrap()
    }

    #[test]
    fn keeps_the_directions_of_largest_variance() {
        let f = anisotropic(1, 4000, &[5.0, 0.5, 0.5, 0.5], 0.0);
        let pca = Pca::fit(&f, 1).unwrap();
        // variance 25 of 25.75 lies on the first (rotated) axis
        assert!(
            (pca.explained_variance() - 25.0 / 25.75).abs() < 0.01,
            "{}",
            pca.explained_variance()
        );
        let y = pca.project(&f).unwrap();
        assert_eq!((y.len(), y.dim()), (4000, 1));
        let var = y.rows().map(|r| f64::from(r[0]).powi(2)).sum::<f64>() / 4000.0;
        assert!((var - 25.0).abs() < 1.5, "{var}");
    }

    #[test]
    fn all_directions_are_a_rotation_that_fid_does_not_see() {
        // FID is invariant under orthogonal maps: with k = d it is unchanged.
        let a = anisotropic(2, 300, &[2.0, 1.0, 0.7, 0.3], 0.0);
        let b = anisotropic(3, 300, &[1.0, 1.5, 0.2, 0.3], 0.4);
        let pca = Pca::fit(&a, 4).unwrap();
        assert!((pca.explained_variance() - 1.0).abs() < 1e-12);
        let full = fid(&a, &b).unwrap();
        let rotated = fid(&pca.project(&a).unwrap(), &pca.project(&b).unwrap()).unwrap();
        assert!((full - rotated).abs() < 1e-4 * full, "{full} vs {rotated}");
    }

    #[test]
    fn fewer_directions_never_increase_the_distance() {
        // The Fréchet distance is the 2-Wasserstein distance of the fitted Gaussians, which an
        // orthogonal projection (1-Lipschitz) cannot increase: a lower bound of the full FID.
        let a = anisotropic(4, 300, &[2.0, 1.0, 0.7, 0.3, 0.2, 0.1], 0.0);
        let b = anisotropic(5, 300, &[1.0, 1.5, 0.2, 0.3, 0.9, 0.1], 0.3);
        let full = fid(&a, &b).unwrap();
        let pca = Pca::fit(&a, 6).unwrap();
        let mut last = f64::INFINITY;
        for k in (1..=6).rev() {
            let pca_k = Pca::fit(&a, k).unwrap();
            let d = fid(&pca_k.project(&a).unwrap(), &pca_k.project(&b).unwrap()).unwrap();
            assert!(
                d <= full * (1.0 + 1e-6) && d <= last * (1.0 + 1e-6),
                "k={k}: {d}"
            );
            last = d;
        }
        assert!(last > 0.0);
        assert_eq!(pca.dim(), 6);
    }

    #[test]
    fn bad_dimensions_are_refused() {
        let a = anisotropic(6, 50, &[1.0, 1.0, 1.0], 0.0);
        let err = Pca::fit(&a, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PCA dimensions = 4: expected 1 to the feature dimension 3"
        );
        assert!(Pca::fit(&a, 0).is_err());
        let pca = Pca::fit(&a, 2).unwrap();
        assert!(matches!(
            pca.project(&Features::new(vec![0.0; 4], 2).unwrap()),
            Err(EvalError::FeatureDims { .. })
        ));
    }
}
