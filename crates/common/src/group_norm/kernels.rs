//! GroupNorm followed by an optional SiLU, forward and backward, on plain `f32` slices.
//!
//! For x [n, c, s] (s = pixels) in g groups of c/g channels, per image and group (m = c/g * s
//! values):
//!
//! * mean = sum(x) / m, rstd = 1 / sqrt(sum((x - mean)^2) / m + eps) (the biased variance, as in
//!   PyTorch and burn)
//! * xhat = (x - mean) rstd, u = gamma[c] xhat + beta[c], y = u sigmoid(u) (SiLU) or y = u
//!
//! Backward, given dy: du = dy (s + u s (1 - s)) with s = sigmoid(u) (or du = dy), then
//! dgamma[c] = sum over images and pixels of du xhat, dbeta[c] = sum of du, and with d = du
//! gamma[c]: dx = rstd (d - mean_group(d) - xhat mean_group(d xhat)).
//!
//! One pass over memory per statistic instead of burn-nn's composition of about eight tensor
//! operations, each with its own autodiff node; work is spread over (image, group) pairs, each
//! pair's loops compiled for AVX-512 where the CPU has it ([`crate::fast_math::wide`]).

use rayon::prelude::*;

use crate::fast_math::{lane_sum, sigmoid, wide};

/// Shapes of one GroupNorm: `batch` images of `channels` channels of `pixels` values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormGeometry {
    pub batch: usize,
    pub channels: usize,
    pub pixels: usize,
    pub groups: usize,
    pub epsilon: f64,
    /// Apply SiLU after the affine map.
    pub silu: bool,
}

impl NormGeometry {
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.pixels
    }
}

/// The lanes of this kernel's sums ([`lane_sum`]).
const LANES: usize = 8;

/// Mean and 1 / sqrt(variance + eps) of one group (two passes: the centred sum of squares).
#[inline(always)]
fn statistics(x: &[f32], epsilon: f64) -> (f32, f32) {
    let m = x.len() as f32;
    let mean = lane_sum::<LANES>(x, x, |v, _| v) / m;
    let var = lane_sum::<LANES>(x, x, |v, _| (v - mean) * (v - mean)) / m;
    (mean, (1.0 / (var as f64 + epsilon).sqrt()) as f32)
}

/// The output y and, per (image, group), the mean and rstd the backward pass needs.
///
/// # Shapes
/// - `x`: [batch, channels, pixels]; `gamma`, `beta`: [channels]
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    g: &NormGeometry,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = g.group_len();
    let per_group = g.channels / g.groups;
    let mut y = vec![0.0f32; x.len()];
    let stats: Vec<(f32, f32)> = y
        .par_chunks_mut(len.max(1))
        .zip(x.par_chunks(len.max(1)))
        .enumerate()
        .map(|(ng, (yg, xg))| {
            wide(
                #[inline(always)]
                || {
                    let (mean, rstd) = statistics(xg, g.epsilon);
                    let first = (ng % g.groups) * per_group;
                    for (j, (yc, xc)) in
                        yg.chunks_mut(g.pixels).zip(xg.chunks(g.pixels)).enumerate()
                    {
                        let a = gamma[first + j] * rstd;
                        let b = beta[first + j] - mean * a;
                        if g.silu {
                            for (o, &v) in yc.iter_mut().zip(xc) {
                                let u = v * a + b;
                                *o = u * sigmoid(u);
                            }
                        } else {
                            for (o, &v) in yc.iter_mut().zip(xc) {
                                *o = v * a + b;
                            }
                        }
                    }
                    (mean, rstd)
                },
            )
        })
        .collect();
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// dx, dgamma and dbeta from dy, with the forward's saved `mean` and `rstd`.
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    rstd: &[f32],
    out_grad: &[f32],
    g: &NormGeometry,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = g.group_len().max(1);
    let per_group = g.channels / g.groups;
    let mut dx = vec![0.0f32; x.len()];
    // Per (image, channel): sum of du xhat and of du, reduced over the images below.
    let partial: Vec<Vec<(f32, f32)>> = dx
        .par_chunks_mut(len)
        .zip(x.par_chunks(len).zip(out_grad.par_chunks(len)))
        .enumerate()
        .map(|(ng, (dxg, (xg, dyg)))| {
            wide(
                #[inline(always)]
                || {
                    let (mu, rs) = (mean[ng], rstd[ng]);
                    let first = (ng % g.groups) * per_group;
                    let mut sums = Vec::with_capacity(per_group);
                    // Pass 1: du into dxg, the channel sums, and the group means of d and d xhat.
                    let (mut sum_d, mut sum_d_xhat) = (0.0f64, 0.0f64);
                    for (j, ((dxc, xc), dyc)) in dxg
                        .chunks_mut(g.pixels)
                        .zip(xg.chunks(g.pixels))
                        .zip(dyg.chunks(g.pixels))
                        .enumerate()
                    {
                        let (gm, bt) = (gamma[first + j], beta[first + j]);
                        if g.silu {
                            for ((o, &v), &dy) in dxc.iter_mut().zip(xc).zip(dyc) {
                                let u = gm * ((v - mu) * rs) + bt;
                                let s = sigmoid(u);
                                *o = dy * (s + u * s * (1.0 - s));
                            }
                        } else {
                            dxc.copy_from_slice(dyc);
                        }
                        let s_du = lane_sum::<LANES>(dxc, dxc, |du, _| du);
                        let s_du_xhat = lane_sum::<LANES>(dxc, xc, |du, v| du * ((v - mu) * rs));
                        sums.push((s_du_xhat, s_du));
                        sum_d += (gm * s_du) as f64;
                        sum_d_xhat += (gm * s_du_xhat) as f64;
                    }
                    let m = (per_group * g.pixels) as f64;
                    let (mean_d, mean_d_xhat) = ((sum_d / m) as f32, (sum_d_xhat / m) as f32);
                    // Pass 2: dx = rstd (du gamma - mean(d) - xhat mean(d xhat)).
                    for (j, (dxc, xc)) in dxg
                        .chunks_mut(g.pixels)
                        .zip(xg.chunks(g.pixels))
                        .enumerate()
                    {
                        let gm = gamma[first + j];
                        for (o, &v) in dxc.iter_mut().zip(xc) {
                            let xhat = (v - mu) * rs;
                            *o = rs * (*o * gm - mean_d - xhat * mean_d_xhat);
                        }
                    }
                    sums
                },
            )
        })
        .collect();
    let mut dgamma = vec![0.0f32; g.channels];
    let mut dbeta = vec![0.0f32; g.channels];
    for (ng, sums) in partial.iter().enumerate() {
        let first = (ng % g.groups) * per_group;
        for (j, &(s_du_xhat, s_du)) in sums.iter().enumerate() {
            dgamma[first + j] += s_du_xhat;
            dbeta[first + j] += s_du;
        }
    }
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// The definition in f64: per group statistics, affine, optional SiLU.
    fn reference(x: &[f32], gamma: &[f32], beta: &[f32], g: &NormGeometry) -> Vec<f64> {
        let len = g.group_len();
        let per_group = g.channels / g.groups;
        let mut y = vec![0.0; x.len()];
        for (ng, xg) in x.chunks(len).enumerate() {
            let mean = xg.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let var = xg.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
            for (i, &v) in xg.iter().enumerate() {
                let c = (ng % g.groups) * per_group + i / g.pixels;
                let u =
                    (v as f64 - mean) / (var + g.epsilon).sqrt() * gamma[c] as f64 + beta[c] as f64;
                y[ng * len + i] = if g.silu { u / (1.0 + (-u).exp()) } else { u };
            }
        }
        y
    }

    fn geometries() -> Vec<NormGeometry> {
        let g = |batch, channels, pixels, groups, silu| NormGeometry {
            batch,
            channels,
            pixels,
            groups,
            epsilon: 1e-5,
            silu,
        };
        vec![
            g(2, 4, 6, 2, true),
            g(3, 6, 5, 3, false),
            g(1, 8, 9, 8, true),
            g(2, 4, 4, 1, true),
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geometries() {
            let x = values(g.batch * g.channels * g.pixels, 1, 6.0);
            let gamma = values(g.channels, 2, 2.0);
            let beta = values(g.channels, 3, 2.0);
            let (y, _, _) = forward(&x, &gamma, &beta, &g);
            for (a, b) in y.iter().zip(reference(&x, &gamma, &beta, &g)) {
                assert!(
                    (*a as f64 - b).abs() < 2e-5 * (1.0 + b.abs()),
                    "{g:?}: {a} vs {b}"
                );
            }
        }
    }

    /// Every gradient against central differences of L = sum(dy * y) computed in f64.
    #[test]
    fn gradients_match_finite_differences() {
        for g in geometries() {
            let x = values(g.batch * g.channels * g.pixels, 4, 6.0);
            let gamma = values(g.channels, 5, 2.0);
            let beta = values(g.channels, 6, 2.0);
            let dy = values(x.len(), 7, 2.0);
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
                reference(x, gamma, beta, &g)
                    .iter()
                    .zip(&dy)
                    .map(|(a, b)| a * *b as f64)
                    .sum()
            };
            let (_, mean, rstd) = forward(&x, &gamma, &beta, &g);
            let (dx, dgamma, dbeta) = backward(&x, &gamma, &beta, &mean, &rstd, &dy, &g);
            let h = 1e-3f32;
            let check = |name: &str, analytic: &[f32], perturb: &dyn Fn(usize, f32) -> f64| {
                for (i, &a) in analytic.iter().enumerate() {
                    let fd = (perturb(i, h) - perturb(i, -h)) / (2.0 * h as f64);
                    assert!(
                        (a as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                        "{name}[{i}] {g:?}: {a} vs {fd}"
                    );
                }
            };
            check("dx", &dx, &|i, d| {
                let mut x2 = x.clone();
                x2[i] += d;
                loss(&x2, &gamma, &beta)
            });
            check("dgamma", &dgamma, &|i, d| {
                let mut g2 = gamma.clone();
                g2[i] += d;
                loss(&x, &g2, &beta)
            });
            check("dbeta", &dbeta, &|i, d| {
                let mut b2 = beta.clone();
                b2[i] += d;
                loss(&x, &gamma, &b2)
            });
        }
    }
}
