//! 2-D convolution as im2col + matrix product on plain `f32` slices in NCHW layout, with the
//! backward pass for the input, the weight and the bias.
//!
//! For one image, with K = c_in * kh * kw and P = h_out * w_out:
//!
//! * im2col: col[(c, ky, kx), (oy, ox)] = x[c, oy * sh + ky - ph, ox * sw + kx - pw] (0 outside)
//! * forward: y[c_out, P] = W[c_out, K] col[K, P] + b
//! * weight gradient: dW[c_out, K] = sum over images of dy[c_out, P] col^T[P, K], accumulated
//!   as its transpose dW^T[K, c_out] = col dy^T and transposed once at the end. `gemm` computes
//!   a row-major destination as the transpose of the product, and its microkernels read the
//!   left operand down columns: for dW that operand would be col (stride P down a column), which
//!   it first copies into panels, for dW^T it is dy, 9 c_in / c_out times smaller (at the VAE's
//!   first level, 32 images of 16 channels at 32x32, on one core: 4.9 against 1.5 ms with gemm's
//!   AVX2 kernels, 13.5 against 1.5 ms with its AVX-512 ones).
//! * bias gradient: db[c_out] = sum over images and pixels of dy
//! * input gradient: dcol[K, P] = W^T[K, c_out] dy[c_out, P], then col2im (the adjoint of
//!   im2col) adds every column entry back onto the pixel it was read from.
//!
//! Everything stays in NCHW, so no layout conversion is paid per call, and the matrix products
//! run in the `gemm` crate (the one burn-flex itself uses) with transposes as strides. Images are
//! spread over rayon's threads; with fewer images than threads the products themselves run in
//! parallel instead.

use rayon::prelude::*;

use crate::fast_math::sum;
use crate::matmul::{Operand, matmul, split};

/// Shapes of one convolution: groups 1, dilation 1, the same padding on both sides of an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl ConvGeometry {
    /// Output height and width: (h + 2 p - k) / s + 1.
    pub fn out_hw(&self) -> [usize; 2] {
        let out = |size: usize, i: usize| {
            (size + 2 * self.padding[i] - self.kernel[i]) / self.stride[i] + 1
        };
        [out(self.h, 0), out(self.w, 1)]
    }

    /// Rows of the column matrix: c_in * kh * kw.
    fn k(&self) -> usize {
        self.c_in * self.kernel[0] * self.kernel[1]
    }

    /// Columns of the column matrix: h_out * w_out.
    fn p(&self) -> usize {
        let [oh, ow] = self.out_hw();
        oh * ow
    }

    fn image_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// A 1x1 convolution with stride 1 and no padding: the column matrix is the image itself.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }
}

/// For stride 1: the output columns `lo..hi` of a row read input columns `lo + kx - pw ..`, the
/// rest lie in the padding.
fn valid_columns(g: &ConvGeometry, ow: usize, kx: usize) -> (usize, usize) {
    let lo = g.padding[1].saturating_sub(kx).min(ow);
    let hi = (g.w + g.padding[1]).saturating_sub(kx).min(ow).max(lo);
    (lo, hi)
}

/// Where a row of the column matrix is the input plane shifted: with stride 1 and w_out = w
/// (the "same" padding of an odd kernel), row (c, ky, kx) read as one flat array over
/// q = oy w + ox is col[q] = plane[q + s], s = (ky - ph) w + (kx - pw), for the output rows
/// whose input row lies inside the image, except in the |kx - pw| edge columns, where
/// ox + kx - pw falls outside [0, w) and q + s reads the neighbouring image row instead of the
/// padding. One copy (or one sum) over the whole span replaces a short one per output row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shift {
    /// The span of q read from the plane (the edge columns inside it still to be zeroed).
    lo: usize,
    hi: usize,
    /// s, the offset from q to the plane index (0 when no row is inside).
    offset: isize,
    /// The output rows inside the image.
    rows: (usize, usize),
    /// kx - pw: the edge columns are ox < -d (d < 0) or ox >= w - d (d > 0).
    d: isize,
}

impl Shift {
    /// The shift of row (ky, kx), or `None` outside the case above (then the row-by-row loop).
    fn of(g: &ConvGeometry, ky: usize, kx: usize) -> Option<Shift> {
        let [oh, ow] = g.out_hw();
        let (w, ph, pw) = (g.w as isize, g.padding[0] as isize, g.padding[1] as isize);
        if g.stride != [1, 1] || ow != g.w || pw >= w {
            return None;
        }
        let dy = ky as isize - ph;
        let d = kx as isize - pw;
        let top = (-dy).clamp(0, oh as isize) as usize;
        let bottom = (g.h as isize - dy).clamp(top as isize, oh as isize) as usize;
        let (lo, hi, offset) = if top < bottom {
            let lo = top * ow + (-d).max(0) as usize;
            (lo, bottom * ow - d.max(0) as usize, dy * w + d)
        } else {
            (0, 0, 0)
        };
        Some(Shift {
            lo,
            hi,
            offset,
            rows: (top, bottom),
            d,
        })
    }

    /// The plane's indices read by q in lo..hi.
    fn source(&self) -> std::ops::Range<usize> {
        let start = (self.lo as isize + self.offset) as usize;
        start..start + (self.hi - self.lo)
    }

    /// Zeroes the edge columns of the rows inside the image.
    fn zero_edges(&self, row: &mut [f32], w: usize) {
        let cols = self.d.unsigned_abs();
        let edge = if self.d < 0 { 0..cols } else { w - cols..w };
        for oy in self.rows.0..self.rows.1 {
            row[oy * w..][edge.clone()].fill(0.0);
        }
    }
}

/// The column matrix [K, P] of one image `x` [c_in, h, w].
fn im2col(x: &[f32], g: &ConvGeometry, col: &mut [f32]) {
    let [oh, ow] = g.out_hw();
    let [kh, kw] = g.kernel;
    let p = oh * ow;
    for c in 0..g.c_in {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &mut col[((c * kh + ky) * kw + kx) * p..][..p];
                if let Some(shift) = Shift::of(g, ky, kx) {
                    row[..shift.lo].fill(0.0);
                    row[shift.lo..shift.hi].copy_from_slice(&plane[shift.source()]);
                    row[shift.hi..].fill(0.0);
                    shift.zero_edges(row, ow);
                    continue;
                }
                for oy in 0..oh {
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * g.stride[0] + ky) as isize - g.padding[0] as isize;
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if g.stride[1] == 1 {
                        let (lo, hi) = valid_columns(g, ow, kx);
                        let start = lo + kx - g.padding[1];
                        dst[..lo].fill(0.0);
                        dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                        dst[hi..].fill(0.0);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * g.stride[1] + kx) as isize - g.padding[1] as isize;
                            *d = if ix < 0 || ix >= g.w as isize {
                                0.0
                            } else {
                                src[ix as usize]
                            };
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: dx[c, iy, ix] = sum of the column entries read from it. `col` is
/// scratch: the entries that lie in the padding may be zeroed.
fn col2im(col: &mut [f32], g: &ConvGeometry, dx: &mut [f32]) {
    let [oh, ow] = g.out_hw();
    let [kh, kw] = g.kernel;
    let p = oh * ow;
    dx.fill(0.0);
    for c in 0..g.c_in {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &mut col[((c * kh + ky) * kw + kx) * p..][..p];
                if let Some(shift) = Shift::of(g, ky, kx) {
                    shift.zero_edges(row, ow);
                    for (d, s) in plane[shift.source()]
                        .iter_mut()
                        .zip(&row[shift.lo..shift.hi])
                    {
                        *d += *s;
                    }
                    continue;
                }
                let row = &*row;
                for oy in 0..oh {
                    let iy = (oy * g.stride[0] + ky) as isize - g.padding[0] as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let src = &row[oy * ow..(oy + 1) * ow];
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if g.stride[1] == 1 {
                        let (lo, hi) = valid_columns(g, ow, kx);
                        let start = lo + kx - g.padding[1];
                        for (d, s) in dst[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *d += *s;
                        }
                    } else {
                        for (ox, s) in src.iter().enumerate() {
                            let ix = (ox * g.stride[1] + kx) as isize - g.padding[1] as isize;
                            if ix >= 0 && (ix as usize) < g.w {
                                dst[ix as usize] += *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// y = conv(x, W) + b.
///
/// # Shapes
/// - `x`: [batch, c_in, h, w]; `weight`: [c_out, c_in, kh, kw]; `bias`: [c_out]
/// - returns [batch, c_out, h_out, w_out]
pub fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    let image = g.image_len();
    let mut out = vec![0.0f32; g.batch * g.c_out * p];
    if out.is_empty() {
        return out;
    }
    let (per_task, par) = split(g.batch);
    out.par_chunks_mut(per_task * g.c_out * p)
        .enumerate()
        .for_each(|(task, chunk)| {
            let mut col = if g.is_pointwise() {
                Vec::new()
            } else {
                vec![0.0f32; k * p]
            };
            for (j, y) in chunk.chunks_mut(g.c_out * p).enumerate() {
                let i = task * per_task + j;
                let xi = &x[i * image..(i + 1) * image];
                let cols = if g.is_pointwise() {
                    xi
                } else {
                    im2col(xi, g, &mut col);
                    &col
                };
                if let Some(b) = bias {
                    for (row, &bc) in y.chunks_mut(p).zip(b) {
                        row.fill(bc);
                    }
                }
                let w = Operand::rows(weight, k);
                matmul(
                    y,
                    g.c_out,
                    p,
                    k,
                    w,
                    Operand::rows(cols, p),
                    bias.is_some(),
                    1.0,
                    par,
                );
            }
        });
    out
}

/// The transpose [cols, rows] of a row-major [rows, cols] matrix.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for (r, row) in a.chunks(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            t[c * rows + r] = *v;
        }
    }
    t
}

/// Which gradients [`backward`] computes.
#[derive(Debug, Clone, Copy)]
pub struct Wanted {
    pub x: bool,
    pub weight: bool,
    pub bias: bool,
}

/// Gradients of a loss L with respect to x, W and b, given dL/dy (`out_grad`, [batch, c_out,
/// h_out, w_out]); each is `None` unless wanted.
#[allow(clippy::type_complexity)]
pub fn backward(
    x: &[f32],
    weight: &[f32],
    out_grad: &[f32],
    g: &ConvGeometry,
    wanted: Wanted,
) -> (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>) {
    let (k, p) = (g.k(), g.p());
    let image = g.image_len();
    if g.batch == 0 {
        let zeros = |on: bool, len: usize| on.then(|| vec![0.0f32; len]);
        return (
            zeros(wanted.x, 0),
            zeros(wanted.weight, g.c_out * k),
            zeros(wanted.bias, g.c_out),
        );
    }
    let (per_task, par) = split(g.batch);
    let tasks = g.batch.div_ceil(per_task).max(1);
    let mut dx = vec![0.0f32; if wanted.x { g.batch * image } else { 0 }];
    let mut dx_chunks: Vec<&mut [f32]> = if wanted.x {
        dx.chunks_mut(per_task * image).collect()
    } else {
        (0..tasks).map(|_| Default::default()).collect()
    };
    // Per task: partial weight and bias gradients, summed below.
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx_chunks
        .par_iter_mut()
        .enumerate()
        .map(|(task, dx_task)| {
            let mut col = vec![0.0f32; k * p];
            let mut dw_t = vec![0.0f32; if wanted.weight { g.c_out * k } else { 0 }];
            let mut db = vec![0.0f32; if wanted.bias { g.c_out } else { 0 }];
            let first = task * per_task;
            for i in first..(first + per_task).min(g.batch) {
                let dy = &out_grad[i * g.c_out * p..(i + 1) * g.c_out * p];
                if wanted.weight {
                    // dW^T[K, c_out] += col[K, P] dy^T[P, c_out] (see the module's documentation).
                    let xi = &x[i * image..(i + 1) * image];
                    let cols: &[f32] = if g.is_pointwise() {
                        xi
                    } else {
                        im2col(xi, g, &mut col);
                        &col
                    };
                    matmul(
                        &mut dw_t,
                        k,
                        g.c_out,
                        p,
                        Operand::rows(cols, p),
                        Operand::transposed(dy, p),
                        true,
                        1.0,
                        par,
                    );
                }
                if wanted.bias {
                    for (d, row) in db.iter_mut().zip(dy.chunks(p)) {
                        *d += sum(row);
                    }
                }
                if wanted.x {
                    let dxi = &mut dx_task[(i - first) * image..(i - first + 1) * image];
                    // a pointwise convolution's column matrix is the image itself
                    let dcol = if g.is_pointwise() {
                        &mut *dxi
                    } else {
                        &mut col[..]
                    };
                    let (w_t, dy) = (Operand::transposed(weight, k), Operand::rows(dy, p));
                    matmul(dcol, k, p, g.c_out, w_t, dy, false, 1.0, par);
                    if !g.is_pointwise() {
                        col2im(&mut col, g, dxi);
                    }
                }
            }
            (dw_t, db)
        })
        .collect();
    let sum = |parts: Vec<Vec<f32>>| {
        parts.into_iter().reduce(|mut acc, part| {
            acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            acc
        })
    };
    let (dws, dbs): (Vec<_>, Vec<_>) = partial.into_iter().unzip();
    (
        wanted.x.then_some(dx),
        if wanted.weight {
            sum(dws).map(|dw_t| transpose(&dw_t, k, g.c_out))
        } else {
            None
        },
        if wanted.bias { sum(dbs) } else { None },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// Direct definition: y[n, o, oy, ox] = b[o] + sum_{c, ky, kx} W[o, c, ky, kx] x[n, c, iy, ix].
    fn naive(x: &[f32], w: &[f32], b: &[f32], g: &ConvGeometry) -> Vec<f32> {
        let [oh, ow] = g.out_hw();
        let [kh, kw] = g.kernel;
        let mut y = vec![0.0f32; g.batch * g.c_out * oh * ow];
        for n in 0..g.batch {
            for o in 0..g.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = b[o] as f64;
                        for c in 0..g.c_in {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy =
                                        (oy * g.stride[0] + ky) as isize - g.padding[0] as isize;
                                    let ix =
                                        (ox * g.stride[1] + kx) as isize - g.padding[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((n * g.c_in + c) * g.h + iy as usize) * g.w
                                        + ix as usize];
                                    let wv = w[((o * g.c_in + c) * kh + ky) * kw + kx];
                                    acc += (xv * wv) as f64;
                                }
                            }
                        }
                        y[((n * g.c_out + o) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    fn geometries() -> Vec<ConvGeometry> {
        let g = |batch, c_in, h, w, c_out, k: [usize; 2], s, p| ConvGeometry {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel: k,
            stride: s,
            padding: p,
        };
        vec![
            g(3, 2, 5, 6, 4, [3, 3], [1, 1], [1, 1]),
            g(2, 3, 7, 6, 2, [3, 3], [2, 2], [1, 1]),
            g(1, 4, 5, 5, 3, [1, 1], [1, 1], [0, 0]),
            g(5, 2, 4, 7, 3, [3, 2], [1, 2], [0, 1]),
            g(2, 1, 3, 3, 2, [3, 3], [1, 1], [2, 2]),
            // "same" width, with and without vertical padding, kernel 5, width 2 and 1
            g(2, 2, 6, 5, 3, [3, 3], [1, 1], [0, 1]),
            g(2, 2, 6, 7, 2, [5, 5], [1, 1], [2, 2]),
            g(3, 2, 4, 2, 2, [3, 3], [1, 1], [1, 1]),
            g(2, 2, 3, 1, 2, [3, 3], [1, 1], [1, 1]),
        ]
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geometries() {
            let x = values(g.batch * g.image_len(), 1);
            let w = values(g.c_out * g.k(), 2);
            let b = values(g.c_out, 3);
            close(
                &forward(&x, &w, Some(&b), &g),
                &naive(&x, &w, &b, &g),
                1e-5,
                &format!("{g:?}"),
            );
            let zero = vec![0.0; g.c_out];
            close(
                &forward(&x, &w, None, &g),
                &naive(&x, &w, &zero, &g),
                1e-5,
                "no bias",
            );
        }
    }

    /// The gradients are the adjoints of the (linear) forward map: for L = <dy, y(x, W, b)>,
    /// <dx, v> = L(x + v) - L(x) with W, b fixed, exactly in exact arithmetic; checked in f64
    /// sums of the f32 results against central differences of size 1 (exact for a linear map).
    #[test]
    fn gradients_are_the_adjoints_of_the_forward_map() {
        for g in geometries() {
            let x = values(g.batch * g.image_len(), 4);
            let w = values(g.c_out * g.k(), 5);
            let b = values(g.c_out, 6);
            let y_len = g.batch * g.c_out * g.p();
            let dy = values(y_len, 7);
            let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
                naive(x, w, b, &g)
                    .iter()
                    .zip(&dy)
                    .map(|(a, c)| (*a as f64) * (*c as f64))
                    .sum()
            };
            let all = Wanted {
                x: true,
                weight: true,
                bias: true,
            };
            let (dx, dw, db) = backward(&x, &w, &dy, &g, all);
            let (dx, dw, db) = (dx.unwrap(), dw.unwrap(), db.unwrap());
            let base = loss(&x, &w, &b);
            for i in 0..x.len() {
                let mut x2 = x.clone();
                x2[i] += 1.0;
                let fd = loss(&x2, &w, &b) - base;
                assert!(
                    (dx[i] as f64 - fd).abs() < 1e-3,
                    "dx[{i}] {g:?}: {} vs {fd}",
                    dx[i]
                );
            }
            for i in 0..w.len() {
                let mut w2 = w.clone();
                w2[i] += 1.0;
                let fd = loss(&x, &w2, &b) - base;
                assert!(
                    (dw[i] as f64 - fd).abs() < 1e-3,
                    "dw[{i}] {g:?}: {} vs {fd}",
                    dw[i]
                );
            }
            for i in 0..b.len() {
                let mut b2 = b.clone();
                b2[i] += 1.0;
                let fd = loss(&x, &w, &b2) - base;
                assert!(
                    (db[i] as f64 - fd).abs() < 1e-3,
                    "db[{i}] {g:?}: {} vs {fd}",
                    db[i]
                );
            }
            // Only what is wanted is computed.
            let (nx, nw, nb) = backward(
                &x,
                &w,
                &dy,
                &g,
                Wanted {
                    x: false,
                    weight: true,
                    bias: false,
                },
            );
            assert!(nx.is_none() && nb.is_none());
            close(&nw.unwrap(), &dw, 1e-6, "weight alone");
        }
    }
}
