//! The head layouts of self-attention: the fused projection's [batch, tokens, 3, heads, d_head]
//! (q, k and v side by side in each token's row, as `x W_qkv` leaves them) and the kernels'
//! [batch, heads, tokens, d_head] per part, and back.
//!
//! Each function writes every element of its output once, from one pass over its input; the
//! batches are split over rayon's workers.

use rayon::prelude::*;

/// The sizes of a layout change: `batch` x `tokens` rows of `parts` x `heads` x `d_head`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub d_head: usize,
}

impl Heads {
    fn width(&self) -> usize {
        self.heads * self.d_head
    }

    /// Elements of one part (q, k or v) of one batch.
    fn block(&self) -> usize {
        self.tokens * self.width()
    }
}

/// A buffer of `len` elements, every one of which `fill` writes.
fn filled(len: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    fill(&mut out);
    out
}

/// `rows` [batch, tokens, parts * heads * d_head] -> `parts` tensors [batch, heads, tokens,
/// d_head] (q, k, v from the fused projection with `parts` = 3; an output gradient with 1).
pub fn split(rows: &[f32], parts: usize, s: &Heads) -> Vec<Vec<f32>> {
    let (n, h, dh, w) = (s.tokens, s.heads, s.d_head, s.width());
    assert_eq!(rows.len(), s.batch * n * parts * w, "split: input length");
    (0..parts)
        .map(|part| {
            filled(s.batch * s.block(), |out| {
                out.par_chunks_mut(s.block())
                    .enumerate()
                    .for_each(|(bi, out)| {
                        for hi in 0..h {
                            for t in 0..n {
                                let src = ((bi * n + t) * parts + part) * w + hi * dh;
                                let dst = (hi * n + t) * dh;
                                out[dst..dst + dh].copy_from_slice(&rows[src..src + dh]);
                            }
                        }
                    })
            })
        })
        .collect()
}

/// `parts` tensors [batch, heads, tokens, d_head] -> [batch, tokens, parts * heads * d_head]:
/// the inverse of [`split`] (the attention output with 1 part; dq, dk, dv as the fused
/// projection's gradient with 3).
pub fn join(parts: &[&[f32]], s: &Heads) -> Vec<f32> {
    let (n, h, dh, w, p) = (s.tokens, s.heads, s.d_head, s.width(), parts.len());
    for part in parts {
        assert_eq!(part.len(), s.batch * s.block(), "join: part length");
    }
    filled(s.batch * n * p * w, |out| {
        out.par_chunks_mut(n * p * w)
            .enumerate()
            .for_each(|(bi, out)| {
                for (pi, part) in parts.iter().enumerate() {
                    let part = &part[bi * s.block()..(bi + 1) * s.block()];
                    for hi in 0..h {
                        for t in 0..n {
                            let src = (hi * n + t) * dh;
                            let dst = (t * p + pi) * w + hi * dh;
                            out[dst..dst + dh].copy_from_slice(&part[src..src + dh]);
                        }
                    }
                }
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the index definition: rows[b][t][part][h][c] = parts[part][b][h][t][c]; join
    /// inverts split.
    #[test]
    fn split_and_join_are_the_index_permutation() {
        let s = Heads {
            batch: 2,
            tokens: 3,
            heads: 2,
            d_head: 4,
        };
        let rows: Vec<f32> = (0..2 * 3 * 3 * 8).map(|i| i as f32).collect();
        let parts = split(&rows, 3, &s);
        for b in 0..2 {
            for t in 0..3 {
                for part in 0..3 {
                    for h in 0..2 {
                        for c in 0..4 {
                            let r = rows[(((b * 3 + t) * 3 + part) * 2 + h) * 4 + c];
                            let p = parts[part][((b * 2 + h) * 3 + t) * 4 + c];
                            assert_eq!(r, p, "b{b} t{t} part{part} h{h} c{c}");
                        }
                    }
                }
            }
        }
        let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        assert_eq!(join(&refs, &s), rows);
        // one part: [b, t, h * dh] <-> [b, h, t, dh]
        let one: Vec<f32> = (0..2 * 3 * 8).map(|i| i as f32).collect();
        let heads = split(&one, 1, &s);
        assert_eq!(
            heads[0][4], one[8],
            "b0 h0 t1 c0 is token 1's first element"
        );
        assert_eq!(join(&[&heads[0]], &s), one);
    }
}
