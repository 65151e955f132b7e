//! A linear layer on plain `f32` slices, forward and backward, as single matrix products:
//! for x [m, k] (the rows of any leading shape), W [k, n] (burn's layout: in, out) and b [n],
//!
//! * forward: y = x W + b (the bias written first, the product added onto it)
//! * backward, given dy [m, n]: dx = dy W^T, dW = x^T dy, db = the column sums of dy.

use gemm::Parallelism;

use crate::matmul::{Operand, matmul};

/// Below this many multiply-adds a product runs on one thread (burn-flex's own threshold).
const PARALLEL_WORK: usize = 192 * 192 * 192;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_WORK {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// y [m, n] = x [m, k] W [k, n] + b.
pub fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, [m, k, n]: [usize; 3]) -> Vec<f32> {
    // the bias rows written straight into a fresh buffer (no zeroing first)
    let mut y = match bias {
        Some(b) => {
            let mut y = Vec::with_capacity(m * n);
            for _ in 0..m {
                y.extend_from_slice(b);
            }
            y
        }
        None => vec![0.0f32; m * n],
    };
    let (x, w) = (Operand::rows(x, k), Operand::rows(weight, n));
    matmul(
        &mut y,
        m,
        n,
        k,
        x,
        w,
        bias.is_some(),
        1.0,
        parallelism(m, n, k),
    );
    y
}

/// (dx, dW, db) given dy, each computed only where wanted.
#[allow(clippy::type_complexity)]
pub fn backward(
    x: &[f32],
    weight: &[f32],
    out_grad: &[f32],
    [m, k, n]: [usize; 3],
    [want_x, want_weight, want_bias]: [bool; 3],
) -> (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>) {
    let dy = Operand::rows(out_grad, n);
    let dx = want_x.then(|| {
        let mut dx = vec![0.0f32; m * k];
        let w_t = Operand::transposed(weight, n);
        matmul(&mut dx, m, k, n, dy, w_t, false, 1.0, parallelism(m, k, n));
        dx
    });
    let dw = want_weight.then(|| {
        let mut dw = vec![0.0f32; k * n];
        let x_t = Operand::transposed(x, k);
        matmul(&mut dw, k, n, m, x_t, dy, false, 1.0, parallelism(k, n, m));
        dw
    });
    let db = want_bias.then(|| {
        let mut db = vec![0.0f32; n];
        for row in out_grad.chunks(n.max(1)) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
        db
    });
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// Forward and all three gradients against the definitions in f64, at a size small enough
    /// for one thread and one large enough for gemm's threads.
    #[test]
    fn forward_and_gradients_match_the_definitions() {
        for [m, k, n] in [[5, 3, 4], [1, 7, 2], [300, 200, 160]] {
            let (x, w, b, dy) = (
                values(m * k, 1),
                values(k * n, 2),
                values(n, 3),
                values(m * n, 4),
            );
            let y = forward(&x, &w, Some(&b), [m, k, n]);
            let no_bias = forward(&x, &w, None, [m, k, n]);
            let (dx, dw, db) = backward(&x, &w, &dy, [m, k, n], [true; 3]);
            let (dx, dw, db) = (dx.unwrap(), dw.unwrap(), db.unwrap());
            let close = |a: f32, e: f64, what: &str| {
                assert!(
                    (a as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "[{m}, {k}, {n}] {what}: {a} vs {e}"
                );
            };
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[c * n + j] as f64)
                        .sum();
                    close(y[i * n + j], dot + b[j] as f64, "y");
                    close(no_bias[i * n + j], dot, "y without bias");
                }
                for c in 0..k {
                    let e: f64 = (0..n)
                        .map(|j| dy[i * n + j] as f64 * w[c * n + j] as f64)
                        .sum();
                    close(dx[i * k + c], e, "dx");
                }
            }
            for c in 0..k {
                for j in 0..n {
                    let e: f64 = (0..m)
                        .map(|i| x[i * k + c] as f64 * dy[i * n + j] as f64)
                        .sum();
                    close(dw[c * n + j], e, "dW");
                }
            }
            for j in 0..n {
                let e: f64 = (0..m).map(|i| dy[i * n + j] as f64).sum();
                close(db[j], e, "db");
            }
            let (nx, nw, nb) = backward(&x, &w, &dy, [m, k, n], [false, true, false]);
            assert!(nx.is_none() && nb.is_none() && nw.is_some());
        }
    }
}
