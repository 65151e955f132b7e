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

/// sum g^2, accumulated in f64 per chunk.
pub fn sum_squares(g: &[f32]) -> f64 {
    g.par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
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
