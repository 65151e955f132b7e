//! SiLU and the tanh GELU with their derivatives, element by element on `f32` slices.
//!
//! * SiLU: y = x s(x), dy/dx = s + x s (1 - s), with s the sigmoid
//! * GELU (tanh form): y = x s(z), z = c (x + a x^3), c = 2 sqrt(2 / pi), a = 0.044715 (that is
//!   0.5 x (1 + tanh(z / 2))); dy/dx = s + x s (1 - s) c (1 + 3 a x^2)
//!
//! Chunks are spread over rayon's threads, each chunk's loop compiled for AVX-512 where the CPU
//! has it ([`crate::fast_math::wide`]).

use rayon::prelude::*;

use crate::fast_math::{sigmoid, wide};

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Silu,
    GeluTanh,
}

/// 2 sqrt(2 / pi) = 1.59576912..., rounded to the nearest f32 (twice the sqrt(2 / pi) of
/// PyTorch's tanh GELU; the literal 1.5957691 rounded one ulp below it).
pub const GELU_C: f32 = 1.595_769_2;
const C: f32 = GELU_C;
const A: f32 = 0.044_715;

/// Elements per rayon task: large enough that scheduling costs little.
const CHUNK: usize = 1 << 14;

/// (sigmoid argument z, dz/dx) at x.
#[inline(always)]
fn inner(kind: Kind, x: f32) -> (f32, f32) {
    match kind {
        Kind::Silu => (x, 1.0),
        Kind::GeluTanh => (C * (x + A * x * x * x), C * (1.0 + 3.0 * A * x * x)),
    }
}

/// y = x sigmoid(z(x)).
pub fn forward(x: &[f32], kind: Kind) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            wide(
                #[inline(always)]
                || {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = v * sigmoid(inner(kind, v).0);
                    }
                },
            )
        });
    y
}

/// dx = dy (s + x s (1 - s) dz/dx), s = sigmoid(z(x)).
pub fn backward(x: &[f32], out_grad: &[f32], kind: Kind) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(out_grad.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| {
            wide(
                #[inline(always)]
                || {
                    for ((o, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        let (z, dz) = inner(kind, v);
                        let s = sigmoid(z);
                        *o = g * (s + v * s * (1.0 - s) * dz);
                    }
                },
            )
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: Kind, x: f64) -> f64 {
        let z = match kind {
            Kind::Silu => x,
            Kind::GeluTanh => (8.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3)),
        };
        x / (1.0 + (-z).exp())
    }

    #[test]
    fn gelu_constant_is_the_nearest_f32() {
        assert_eq!(GELU_C, (8.0 / std::f64::consts::PI).sqrt() as f32);
    }

    #[test]
    fn values_and_derivatives_match_f64_references() {
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.01).collect();
        for kind in [Kind::Silu, Kind::GeluTanh] {
            let y = forward(&xs, kind);
            let ones = vec![1.0f32; xs.len()];
            let dy = backward(&xs, &ones, kind);
            for (i, &x) in xs.iter().enumerate() {
                let exact = reference(kind, x as f64);
                assert!(
                    (y[i] as f64 - exact).abs() < 1e-6 * (1.0 + exact.abs()),
                    "{kind:?}({x}): {} vs {exact}",
                    y[i]
                );
                let h = 1e-4;
                let fd =
                    (reference(kind, x as f64 + h) - reference(kind, x as f64 - h)) / (2.0 * h);
                assert!(
                    (dy[i] as f64 - fd).abs() < 1e-5 * (1.0 + fd.abs()),
                    "{kind:?}'({x}): {} vs {fd}",
                    dy[i]
                );
            }
        }
        // The tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
        let x = 0.7f64;
        let tanh_form = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        assert!((reference(Kind::GeluTanh, x) - tanh_form).abs() < 1e-12);
    }
}
