//! Improved precision and recall (Kynkäänniemi et al. 2019) with density and coverage
//! (Naeem et al. 2020), from k-nearest-neighbour balls around each sample in feature space.

use rayon::prelude::*;

use crate::error::{EvalError, Result};
use crate::features::Features;

/// k of the k-NN radii, as in both papers.
pub const DEFAULT_K: usize = 3;

/// Fidelity and diversity of a generated set against a real one, each in [0, 1] except
/// density, which is 1 on average for matching distributions and can exceed 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecisionRecall {
    /// Fraction of generated samples inside the real manifold.
    pub precision: f64,
    /// Fraction of real samples inside the generated manifold.
    pub recall: f64,
    /// (1 / kM) sum_j #{real balls containing generated sample j}.
    pub density: f64,
    /// Fraction of real balls that contain at least one generated sample.
    pub coverage: f64,
}

/// The manifold of a set is the union of balls B(x_i, r_i), r_i the distance from x_i to its
/// k-th nearest neighbour in the set; "inside" is d <= r, as in Kynkäänniemi et al.'s code
/// (Naeem et al. use d < r; the two differ only on ties).
pub fn precision_recall(
    real: &Features,
    generated: &Features,
    k: usize,
) -> Result<PrecisionRecall> {
    if real.dim() != generated.dim() {
        return Err(EvalError::FeatureDims {
            real: real.dim(),
            generated: generated.dim(),
        });
    }
    for (which, set) in [("real", real), ("generated", generated)] {
        if k == 0 || set.len() <= k {
            return Err(EvalError::TooFewForNeighbours {
                which,
                n: set.len(),
                k,
            });
        }
    }
    let real_radii = kth_neighbour_sq_radii(real, k);
    let gen_radii = kth_neighbour_sq_radii(generated, k);
    let n_real = real.len();

    // One pass over the real x generated distances, generated rows split across threads; the
    // per-real reductions (recall, coverage) are merged at the end, all order-independent.
    let pass = (0..generated.len())
        .into_par_iter()
        .fold(
            || CrossPass::new(n_real),
            |mut acc, j| {
                let (y, r_y) = (generated.row(j), gen_radii[j]);
                let mut inside_real = 0u64;
                for (i, x) in real.rows().enumerate() {
                    let d = squared_distance(x, y);
                    inside_real += u64::from(d <= real_radii[i]);
                    acc.real_in_gen[i] |= d <= r_y;
                    acc.nearest_gen[i] = acc.nearest_gen[i].min(d);
                }
                acc.precise += u64::from(inside_real > 0);
                acc.density_count += inside_real;
                acc
            },
        )
        .reduce(|| CrossPass::new(n_real), CrossPass::merge);

    let (m, n) = (generated.len() as f64, n_real as f64);
    let recalled = pass.real_in_gen.iter().filter(|&&b| b).count();
    let covered = pass
        .nearest_gen
        .iter()
        .zip(&real_radii)
        .filter(|(d, r)| d <= r)
        .count();
    Ok(PrecisionRecall {
        precision: pass.precise as f64 / m,
        recall: recalled as f64 / n,
        density: pass.density_count as f64 / (k as f64 * m),
        coverage: covered as f64 / n,
    })
}

/// Partial sums of one thread's share of generated samples.
struct CrossPass {
    precise: u64,
    density_count: u64,
    /// Real sample i lies in some generated ball.
    real_in_gen: Vec<bool>,
    /// Squared distance from real sample i to its nearest generated sample.
    nearest_gen: Vec<f32>,
}

impl CrossPass {
    fn new(n_real: usize) -> Self {
        Self {
            precise: 0,
            density_count: 0,
            real_in_gen: vec![false; n_real],
            nearest_gen: vec![f32::INFINITY; n_real],
        }
    }

    fn merge(mut self, other: Self) -> Self {
        self.precise += other.precise;
        self.density_count += other.density_count;
        for (a, b) in self.real_in_gen.iter_mut().zip(other.real_in_gen) {
            *a |= b;
        }
        for (a, b) in self.nearest_gen.iter_mut().zip(other.nearest_gen) {
            *a = a.min(b);
        }
        self
    }
}

/// r_i^2 = squared distance from sample i to its k-th nearest other sample: the k-th smallest
/// of its n distances counting itself (at 0), as in both papers' code.
fn kth_neighbour_sq_radii(set: &Features, k: usize) -> Vec<f32> {
    let rows: Vec<&[f32]> = set.rows().collect();
    rows.par_iter()
        .map_init(
            || Vec::with_capacity(rows.len()),
            |dists: &mut Vec<f32>, x| {
                dists.clear();
                dists.extend(rows.iter().map(|y| squared_distance(x, y)));
                *dists.select_nth_unstable_by(k, f32::total_cmp).1
            },
        )
        .collect()
}

/// ||a - b||^2, summed in 8 lanes so the compiler vectorises it.
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let mut lanes = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            lanes[l] += d * d;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tensor};
    use ldm_common::rng::{randn, stream};

    fn gaussian(seed: u64, n: usize, d: usize, offset: f32) -> Features {
        let t: Tensor<2> = randn(&mut stream(seed, "features", 0), [n, d], &Device::flex());
        Features::from_tensor(t + offset)
    }

    /// Points on a line, embedded in 9 dimensions so both the 8-lane and the tail path of
    /// the distance run.
    fn on_a_line(xs: &[f32]) -> Features {
        let rows: Vec<Vec<f32>> = xs
            .iter()
            .map(|&x| {
                let mut row = vec![0.0; 9];
                row[8] = x;
                row
            })
            .collect();
        Features::from_rows(&rows).unwrap()
    }

    #[test]
    fn identical_sets_are_fully_precise_and_recalled() {
        let f = gaussian(1, 200, 16, 0.0);
        let pr = precision_recall(&f, &f, DEFAULT_K).unwrap();
        assert_eq!((pr.precision, pr.recall, pr.coverage), (1.0, 1.0, 1.0));
        // each real ball holds its centre and its k neighbours: density = (k + 1) / k
        assert!((pr.density - 4.0 / 3.0).abs() < 1e-12, "{pr:?}");
    }

    #[test]
    fn far_apart_clusters_share_nothing() {
        let real = gaussian(2, 100, 8, 0.0);
        let generated = gaussian(3, 120, 8, 100.0);
        let pr = precision_recall(&real, &generated, DEFAULT_K).unwrap();
        assert_eq!(
            pr,
            PrecisionRecall {
                precision: 0.0,
                recall: 0.0,
                density: 0.0,
                coverage: 0.0
            }
        );
    }

    #[test]
    fn a_hand_checked_case() {
        // k = 1. Real radii: 0 -> 1, 1 -> 1, 3 -> 2, 8 -> 5, 40 -> 1, 41 -> 1.
        // Generated radii: 0.5 -> 5, 5.5 -> 5, 14 -> 6, 20 -> 6.
        // precision: 0.5 (balls of 0 and 1), 5.5 (ball of 8) in; 14, 20 out -> 2/4
        // density: (2 + 1 + 0 + 0) / (1 * 4) = 0.75
        // recall: 0, 1, 3 (ball of 0.5), 8 (ball of 5.5) in; 40, 41 out -> 4/6
        // coverage: nearest generated within the real radius for 0, 1, 8 -> 3/6
        let real = on_a_line(&[0.0, 1.0, 3.0, 8.0, 40.0, 41.0]);
        let generated = on_a_line(&[0.5, 5.5, 14.0, 20.0]);
        let pr = precision_recall(&real, &generated, 1).unwrap();
        assert_eq!(
            pr,
            PrecisionRecall {
                precision: 0.5,
                recall: 4.0 / 6.0,
                density: 0.75,
                coverage: 0.5
            }
        );
    }

    #[test]
    fn radii_are_the_kth_neighbour_excluding_self() {
        let f = on_a_line(&[0.0, 1.0, 3.0, 8.0]);
        assert_eq!(kth_neighbour_sq_radii(&f, 1), vec![1.0, 1.0, 4.0, 25.0]);
        assert_eq!(kth_neighbour_sq_radii(&f, 3), vec![64.0, 49.0, 25.0, 64.0]);
    }

    #[test]
    fn squared_distance_matches_the_plain_sum() {
        let a: Vec<f32> = (0..13).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..13).map(|i| (i * i) as f32 * 0.1).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        assert!((squared_distance(&a, &b) - plain).abs() < 1e-4 * plain);
    }

    #[test]
    fn too_small_sets_are_refused() {
        let err =
            precision_recall(&gaussian(4, 10, 4, 0.0), &gaussian(5, 3, 4, 0.0), 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "precision/recall with k = 3 needs at least 4 samples per set; the generated set has 3"
        );
        assert!(precision_recall(&gaussian(4, 10, 4, 0.0), &gaussian(5, 10, 5, 0.0), 3).is_err());
    }

    /// Wall time at the largest intended size, 5000 x 128 per set.
    /// `cargo test --release -p ldm-eval prdc_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, prints; run by hand"]
    fn prdc_timing_5000() {
        let (real, generated) = (gaussian(6, 5000, 128, 0.0), gaussian(7, 5000, 128, 0.1));
        let start = std::time::Instant::now();
        let pr = precision_recall(&real, &generated, DEFAULT_K).unwrap();
        println!("{pr:?} in {:.2?}", start.elapsed());
    }
}
