//! Multi-head scaled dot-product attention on plain `f32` slices, forward and backward, one
//! (batch, head) pair at a time, with the pair's scores kept in a scratch matrix.
//!
//! For one pair, with Q [n, d], K [l, d], V [l, d], scale s and an additive key bias b [l]
//! (0, or -inf for a padding key):
//!
//! * scores: S = s Q K^T + b (b added to every row)
//! * forward: P = softmax(S) row by row, O = P V, and the row's log-sum-exp
//!   lse_i = log sum_j exp(S_ij), kept for the backward
//! * backward, given dO: P = exp(S - lse) recomputed from Q and K (the n x l matrix is not
//!   stored between the passes, as in FlashAttention), then
//!   dV = P^T dO, dP = dO V^T, D_i = sum_j dO_ij O_ij (= sum_j P_ij dP_ij),
//!   dS = P * (dP - D) (elementwise, D broadcast along rows), dQ = s dS K, dK = s dS^T Q
//!
//! A row whose keys are all padding has P = 0 and O = 0 (burn's attention gives the same), and
//! no gradient. Pairs are spread over rayon's threads; with fewer pairs than threads the products
//! themselves run in parallel instead ([`crate::matmul::split`]).

use rayon::prelude::*;

use crate::fast_math::{LANES, exp, lane_sum, sum, wide};
use crate::matmul::{Operand, matmul, split};

/// Shapes of one attention call: q [batch, heads, queries, d_head], k and v [batch, heads,
/// keys, d_head], all contiguous; the key bias, if any, [batch, keys].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionGeometry {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub d_head: usize,
    /// The factor of the scores, 1 / sqrt(d_head) by default.
    pub scale: f32,
}

impl AttentionGeometry {
    /// The geometry with the default scale 1 / sqrt(d_head).
    pub fn new(batch: usize, heads: usize, queries: usize, keys: usize, d_head: usize) -> Self {
        Self {
            batch,
            heads,
            queries,
            keys,
            d_head,
            scale: 1.0 / (d_head as f32).sqrt(),
        }
    }

    fn pairs(&self) -> usize {
        self.batch * self.heads
    }
}

/// The slices of pair `pair` in q, k and v, and its batch's key bias.
struct Pair<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl<'a> Pair<'a> {
    fn of(
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        bias: Option<&'a [f32]>,
        g: &AttentionGeometry,
        pair: usize,
    ) -> Self {
        let (nd, ld) = (g.queries * g.d_head, g.keys * g.d_head);
        let batch = pair / g.heads;
        Self {
            q: &q[pair * nd..(pair + 1) * nd],
            k: &k[pair * ld..(pair + 1) * ld],
            v: &v[pair * ld..(pair + 1) * ld],
            bias: bias.map(|b| &b[batch * g.keys..(batch + 1) * g.keys]),
        }
    }

    /// s[n, l] = scale Q K^T + bias.
    fn scores(&self, s: &mut [f32], g: &AttentionGeometry, par: gemm::Parallelism) {
        let (n, l, d) = (g.queries, g.keys, g.d_head);
        let k_t = Operand::transposed(self.k, d);
        matmul(
            s,
            n,
            l,
            d,
            Operand::rows(self.q, d),
            k_t,
            false,
            g.scale,
            par,
        );
        if let Some(bias) = self.bias {
            for row in s.chunks_mut(l) {
                row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
            }
        }
    }
}

/// exp(x), and exactly 0 below exp's range (a padding key's -inf included).
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    let e = exp(x);
    if x < -87.0 { 0.0 } else { e }
}

/// max_j row_j (-inf for an empty row).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        acc.iter_mut().zip(chunk).for_each(|(a, &x)| *a = a.max(x));
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// Replaces each row of scores by its softmax and returns its log-sum-exp (-inf for a row of
/// -inf, which becomes zeros).
#[inline(always)]
fn softmax_rows(s: &mut [f32], l: usize, lse: &mut [f32]) {
    for (row, lse) in s.chunks_mut(l).zip(lse) {
        let max = row_max(row);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            *lse = f32::NEG_INFINITY;
            continue;
        }
        row.iter_mut().for_each(|x| *x = exp_or_zero(*x - max));
        let sum = sum(row);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
        *lse = max + sum.ln();
    }
}

/// P = exp(S - lse) row by row, in place of the scores S (zeros for a row whose lse is -inf).
#[inline(always)]
fn probabilities(s: &mut [f32], l: usize, lse: &[f32]) {
    for (row, &lse) in s.chunks_mut(l).zip(lse) {
        if lse == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            row.iter_mut().for_each(|x| *x = exp_or_zero(*x - lse));
        }
    }
}

/// dS = P * (dP - D) row by row in place of dP, with D_i = sum_c dO_ic O_ic.
#[inline(always)]
fn score_gradients(dp: &mut [f32], p: &[f32], d_o: &[f32], o: &[f32], l: usize, d: usize) {
    let rows = dp.chunks_mut(l).zip(p.chunks(l));
    for ((dp_row, p_row), (d_o, o)) in rows.zip(d_o.chunks(d).zip(o.chunks(d))) {
        let delta = lane_sum::<LANES>(d_o, o, |x, y| x * y);
        dp_row
            .iter_mut()
            .zip(p_row)
            .for_each(|(x, &p)| *x = p * (*x - delta));
    }
}

/// O = softmax(scale Q K^T + bias) V per pair, and the log-sum-exp of each score row.
///
/// # Shapes
/// - `q`: [batch, heads, queries, d_head]; `k`, `v`: [batch, heads, keys, d_head]
/// - `bias`: [batch, keys]
/// - returns O [batch, heads, queries, d_head] and lse [batch, heads, queries]
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    g: &AttentionGeometry,
) -> (Vec<f32>, Vec<f32>) {
    let (n, l, d) = (g.queries, g.keys, g.d_head);
    let mut out = vec![0.0f32; g.pairs() * n * d];
    let mut lse = vec![f32::NEG_INFINITY; g.pairs() * n];
    if out.is_empty() || l == 0 {
        // no keys: every row is fully masked (O = 0, lse = -inf)
        return (out, lse);
    }
    let (per_task, par) = split(g.pairs());
    out.par_chunks_mut(per_task * n * d)
        .zip(lse.par_chunks_mut(per_task * n))
        .enumerate()
        .for_each(|(task, (out, lse))| {
            let mut s = vec![0.0f32; n * l];
            for (j, (o, lse)) in out.chunks_mut(n * d).zip(lse.chunks_mut(n)).enumerate() {
                let pair = Pair::of(q, k, v, bias, g, task * per_task + j);
                pair.scores(&mut s, g, par);
                wide(
                    #[inline(always)]
                    || softmax_rows(&mut s, l, lse),
                );
                let v = Operand::rows(pair.v, d);
                matmul(o, n, d, l, Operand::rows(&s, l), v, false, 1.0, par);
            }
        });
    (out, lse)
}

/// The gradients (dQ, dK, dV) given dO, from the inputs and the forward's O and lse.
///
/// # Shapes
/// As [`forward`]; `out` and `out_grad` [batch, heads, queries, d_head], `lse` [batch, heads,
/// queries].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    out: &[f32],
    lse: &[f32],
    out_grad: &[f32],
    g: &AttentionGeometry,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, l, d) = (g.queries, g.keys, g.d_head);
    let mut dq = vec![0.0f32; g.pairs() * n * d];
    let mut dk = vec![0.0f32; g.pairs() * l * d];
    let mut dv = vec![0.0f32; g.pairs() * l * d];
    if g.pairs() == 0 || n * l * d == 0 {
        return (dq, dk, dv);
    }
    let (per_task, par) = split(g.pairs());
    dq.par_chunks_mut(per_task * n * d)
        .zip(dk.par_chunks_mut(per_task * l * d))
        .zip(dv.par_chunks_mut(per_task * l * d))
        .enumerate()
        .for_each(|(task, ((dq, dk), dv))| {
            let (mut p, mut ds) = (vec![0.0f32; n * l], vec![0.0f32; n * l]);
            let chunks = dq.chunks_mut(n * d).zip(dk.chunks_mut(l * d));
            for (j, ((dq, dk), dv)) in chunks.zip(dv.chunks_mut(l * d)).enumerate() {
                let index = task * per_task + j;
                let pair = Pair::of(q, k, v, bias, g, index);
                let rows = index * n..(index + 1) * n;
                let (o, d_o) = (
                    &out[rows.start * d..rows.end * d],
                    &out_grad[rows.start * d..rows.end * d],
                );
                // P = exp(S - lse)
                pair.scores(&mut p, g, par);
                wide(
                    #[inline(always)]
                    || probabilities(&mut p, l, &lse[rows]),
                );
                // dV = P^T dO; dP = dO V^T
                let d_o_rows = Operand::rows(d_o, d);
                matmul(
                    dv,
                    l,
                    d,
                    n,
                    Operand::transposed(&p, l),
                    d_o_rows,
                    false,
                    1.0,
                    par,
                );
                let v_t = Operand::transposed(pair.v, d);
                matmul(&mut ds, n, l, d, d_o_rows, v_t, false, 1.0, par);
                wide(
                    #[inline(always)]
                    || score_gradients(&mut ds, &p, d_o, o, l, d),
                );
                // dQ = scale dS K; dK = scale dS^T Q
                let (k_rows, q_rows) = (Operand::rows(pair.k, d), Operand::rows(pair.q, d));
                matmul(
                    dq,
                    n,
                    d,
                    l,
                    Operand::rows(&ds, l),
                    k_rows,
                    false,
                    g.scale,
                    par,
                );
                let ds_t = Operand::transposed(&ds, l);
                matmul(dk, l, d, n, ds_t, q_rows, false, g.scale, par);
            }
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in f64: O and lse per pair, then the gradients of sum(O * w) by central
    /// differences of that same function.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bias: Option<&[f32]>,
        g: &AttentionGeometry,
    ) -> (Vec<f64>, Vec<f64>) {
        let (n, l, d) = (g.queries, g.keys, g.d_head);
        let mut out = vec![0.0f64; g.pairs() * n * d];
        let mut lse = vec![0.0f64; g.pairs() * n];
        for pair in 0..g.pairs() {
            let b = pair / g.heads;
            for i in 0..n {
                let scores: Vec<f64> = (0..l)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| {
                                q[(pair * n + i) * d + c] as f64 * k[(pair * l + j) * d + c] as f64
                            })
                            .sum();
                        dot * g.scale as f64 + bias.map_or(0.0, |bb| bb[b * l + j] as f64)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    lse[pair * n + i] = f64::NEG_INFINITY;
                    continue;
                }
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                lse[pair * n + i] = max + sum.ln();
                for c in 0..d {
                    out[(pair * n + i) * d + c] = (0..l)
                        .map(|j| (scores[j] - max).exp() / sum * v[(pair * l + j) * d + c] as f64)
                        .sum();
                }
            }
        }
        (out, lse)
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // a fixed, irregular sequence in [-1.5, 1.5]
        (0..len)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 97);
                (x % 3001) as f32 / 1000.0 - 1.5
            })
            .collect()
    }

    fn geometries() -> Vec<AttentionGeometry> {
        let g = AttentionGeometry::new;
        // one pair (products on all threads), more pairs than threads, cross-attention shapes,
        // and no keys at all (every row fully masked)
        vec![
            g(1, 1, 5, 5, 3),
            g(3, 2, 4, 4, 2),
            g(2, 3, 6, 3, 4),
            g(5, 1, 1, 7, 2),
            g(2, 1, 3, 0, 2),
        ]
    }

    /// Key bias for batch b: padding (-inf) on the last key of odd batches, every key of
    /// batch 2 (fully masked rows), 0 elsewhere.
    fn padding(g: &AttentionGeometry) -> Vec<f32> {
        (0..g.batch * g.keys)
            .map(|i| {
                let (b, j) = (i / g.keys, i % g.keys);
                if b == 2 || (b % 2 == 1 && j == g.keys - 1) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geometries() {
            let (n, l, d) = (g.queries, g.keys, g.d_head);
            let q = values(g.pairs() * n * d, 1);
            let k = values(g.pairs() * l * d, 2);
            let v = values(g.pairs() * l * d, 3);
            let bias = padding(&g);
            for bias in [None, Some(&bias[..])] {
                let (out, lse) = forward(&q, &k, &v, bias, &g);
                let (out_ref, lse_ref) = reference(&q, &k, &v, bias, &g);
                for (a, b) in out.iter().zip(&out_ref) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{g:?} {bias:?}: O {a} vs {b}");
                }
                for (a, b) in lse.iter().zip(&lse_ref) {
                    let same = (*a as f64 == *b) || (*a as f64 - b).abs() < 1e-5;
                    assert!(same, "{g:?} {bias:?}: lse {a} vs {b}");
                }
            }
        }
    }

    /// Central differences of L = sum(O * w) through the f64 definition against [`backward`].
    #[test]
    fn gradients_match_finite_differences() {
        for g in geometries() {
            let (n, l, d) = (g.queries, g.keys, g.d_head);
            let mut inputs = [
                values(g.pairs() * n * d, 4),
                values(g.pairs() * l * d, 5),
                values(g.pairs() * l * d, 6),
            ];
            let w = values(g.pairs() * n * d, 7);
            let bias = padding(&g);
            for bias in [None, Some(&bias[..])] {
                let [q, k, v] = &inputs;
                let (out, lse) = forward(q, k, v, bias, &g);
                let grads = backward(q, k, v, bias, &out, &lse, &w, &g);
                let loss = |inputs: &[Vec<f32>; 3]| -> f64 {
                    let (o, _) = reference(&inputs[0], &inputs[1], &inputs[2], bias, &g);
                    o.iter().zip(&w).map(|(o, w)| o * *w as f64).sum()
                };
                for (which, grad) in [grads.0.clone(), grads.1.clone(), grads.2.clone()]
                    .iter()
                    .enumerate()
                {
                    for index in 0..grad.len() {
                        let h = 1e-3f32;
                        let x = inputs[which][index];
                        inputs[which][index] = x + h;
                        let up = loss(&inputs);
                        inputs[which][index] = x - h;
                        let down = loss(&inputs);
                        inputs[which][index] = x;
                        let numeric = (up - down) / (2.0 * h as f64);
                        assert!(
                            (grad[index] as f64 - numeric).abs() < 2e-3,
                            "{g:?} {bias:?}: input {which}[{index}]: {} vs {numeric}",
                            grad[index]
                        );
                    }
                }
            }
        }
    }
}
