//! Row-major f32 matrix products on host slices through the `gemm` crate (the one burn-flex
//! itself uses), with transposes expressed as strides: the building block of this crate's
//! burn-flex operations ([`crate::gemm_conv`], [`crate::attention`]).

use gemm::Parallelism;

/// A matrix operand read in place: element (i, j) at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A contiguous row-major [rows, cols] matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose [rows, cols] of a contiguous row-major [cols, rows] matrix.
    pub fn transposed(data: &'a [f32], rows: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: rows,
        }
    }

    /// Panics unless every element of a [rows, cols] view lies in the slice.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "matmul {what}: a [{rows}, {cols}] view needs {} values, the slice has {}",
                last + 1,
                self.data.len()
            );
        }
    }
}

/// dst[m, n] (contiguous, row-major) = (accumulate ? dst : 0) + scale * lhs[m, k] rhs[k, n].
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
    scale: f32,
    par: Parallelism,
) {
    assert_eq!(dst.len(), m * n, "matmul destination");
    lhs.check(m, k, "left operand");
    rhs.check(k, n, "right operand");
    // SAFETY: the checks above keep every element gemm reads inside its slice, and `dst` is a
    // `&mut` slice, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// How `items` independent products are run: (items per rayon task, the parallelism inside
/// one product). Items are split over the threads when there are enough of them; otherwise
/// each product runs on all the threads.
pub fn split(items: usize) -> (usize, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    if items >= threads {
        (items.div_ceil(threads), Parallelism::None)
    } else {
        (items.max(1), Parallelism::Rayon(threads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_with_transposes_scale_and_accumulation() {
        // a [2, 3], b [3, 2]; a b = [[4, 5], [10, 14]]... computed below from the definition
        let a = [1.0, 2.0, 0.0, 3.0, 1.0, 2.0];
        let b = [1.0, 0.0, 0.5, 2.0, 1.0, 1.0];
        let at: Vec<f32> = (0..6).map(|i| a[(i % 2) * 3 + i / 2]).collect(); // [3, 2]
        let bt: Vec<f32> = (0..6).map(|i| b[(i % 3) * 2 + i / 3]).collect(); // [2, 3]
        let mut expected = [0.0f32; 4];
        for i in 0..2 {
            for j in 0..2 {
                expected[i * 2 + j] = (0..3).map(|k| a[i * 3 + k] * b[k * 2 + j]).sum();
            }
        }
        for (lhs, rhs) in [
            (Operand::rows(&a, 3), Operand::rows(&b, 2)),
            (Operand::transposed(&at, 2), Operand::transposed(&bt, 3)),
        ] {
            let mut dst = [1.0f32; 4];
            matmul(&mut dst, 2, 2, 3, lhs, rhs, true, 0.5, Parallelism::None);
            for (d, e) in dst.iter().zip(expected) {
                assert!(
                    (d - (1.0 + 0.5 * e)).abs() < 1e-6,
                    "{dst:?} vs 1 + {expected:?} / 2"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "matmul right operand")]
    fn a_short_operand_is_refused() {
        let mut dst = [0.0f32; 4];
        let a = [0.0f32; 6];
        matmul(
            &mut dst,
            2,
            2,
            3,
            Operand::rows(&a, 3),
            Operand::rows(&a[..5], 2),
            false,
            1.0,
            Parallelism::None,
        );
    }
}
