//! The AdamW update of one parameter tensor in one pass over memory, on `f32` slices.
//!
//! With the gradient g (times the clipping coefficient c), moments m and v, step t, learning
//! rate lr and weight decay wd (Loshchilov & Hutter 2019, Algorithm 2, as burn's `AdamW`):
//!
//! * m' = beta_1 m + (1 - beta_1) c g
//! * v' = beta_2 v + (1 - beta_2) (c g)^2
//! * p' = p (1 - lr wd) - lr (m' / (1 - beta_1^t)) / (sqrt(v' / (1 - beta_2^t)) + eps)

use rayon::prelude::*;

/// Elements per rayon task: large enough that scheduling costs little.
const CHUNK: usize = 1 << 14;

/// The constants of one parameter's AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConstants {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// 1 - lr wd.
    pub decay: f32,
    pub lr: f32,
    /// 1 - beta_1^t.
    pub bias_correction_1: f32,
    /// 1 - beta_2^t.
    pub bias_correction_2: f32,
    /// The gradient's clipping coefficient c (1: not clipped).
    pub grad_scale: f32,
}

/// sum g^2, accumulated in f64 per chunk, in 8 independent lanes (one running sum is a serial
/// chain of f64 adds, one add's latency per element).
pub fn sum_squares(g: &[f32]) -> f64 {
    g.par_chunks(CHUNK)
        .map(|c| {
            let mut acc = [0.0f64; 8];
            let mut lanes = c.chunks_exact(8);
            for chunk in &mut lanes {
                acc.iter_mut()
                    .zip(chunk)
                    .for_each(|(a, &x)| *a += f64::from(x) * f64::from(x));
            }
            let tail: f64 = lanes
                .remainder()
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum();
            tail + acc.iter().sum::<f64>()
        })
        .sum()
}

/// One step in place: `p`, `m`, `v` become p', m', v' (m = v = 0 on the first step).
pub fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &StepConstants) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "AdamW buffers of one size"
    );
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for j in 0..p.len() {
                let g = g[j] * k.grad_scale;
                let mj = m[j] * k.beta_1 + g * (1.0 - k.beta_1);
                let vj = v[j] * k.beta_2 + g * g * (1.0 - k.beta_2);
                let delta =
                    (mj / k.bias_correction_1) / ((vj / k.bias_correction_2).sqrt() + k.epsilon);
                p[j] = p[j] * k.decay - delta * k.lr;
                m[j] = mj;
                v[j] = vj;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_covers_lanes_tails_and_chunks() {
        for len in [0, 1, 7, 8, 9, CHUNK - 3, CHUNK + 5, 3 * CHUNK + 17] {
            let g: Vec<f32> = (0..len).map(|i| (i % 13) as f32 * 0.25 - 1.5).collect();
            let exact: f64 = g.iter().map(|&x| f64::from(x).powi(2)).sum();
            let ours = sum_squares(&g);
            assert!(
                (ours - exact).abs() <= 1e-9 * exact.max(1.0),
                "len {len}: {ours} vs {exact}"
            );
        }
    }
}
