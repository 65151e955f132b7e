//! exp and sigmoid in a form the compiler vectorises (libm's `expf` is a scalar call per
//! element, which made SiLU, GELU and sigmoid a fifth of burn-flex's time in the DiT step).

/// 1.5 * 2^23: adding and subtracting it rounds to an integer (|value| < 2^22).
const ROUND: f32 = 12_582_912.0;

/// The bits of 2^k for t = k + [`ROUND`] (k an integer in [-126, 127]): bits(t) - bits(ROUND)
/// is k, shifted into the exponent field with its bias of 127.
#[inline(always)]
fn pow2_bits(t: f32) -> u32 {
    t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23
}

/// exp(x) for x in [-87, 88] to about 2 ulp, written so that the compiler vectorises loops over
/// it (libm's `expf` is a scalar call): exp(x) = 2^k e^r with k = round(x / ln 2), r = x - k ln 2
/// in two parts, and e^r by its degree-6 Taylor polynomial (|r| <= ln 2 / 2). Rounding adds and
/// subtracts 1.5 * 2^23 (exact for |x / ln 2| < 2^22) instead of calling libm's `roundf`.
///
/// 2^k is built from the bits of t = x / ln 2 + 1.5 * 2^23, whose mantissa holds k + 1.5 * 2^23
/// exactly: bits(t) - bits(1.5 * 2^23) = k, so the exponent field is k + 127. That is integer
/// arithmetic a vector unit does in a lane; `k as i32` (Rust's saturating float-to-int
/// conversion) made the compiler convert lane by lane with scalar instructions, which cost half
/// of a SiLU loop's time (1.9 against 1.06 ns per element on one core; the results are the same
/// bit for bit).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(pow2_bits(t))
}

/// sigmoid(u) = 1 / (1 + exp(-u)).
#[inline(always)]
pub fn sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + exp(-u))
}

/// Independent accumulators of the reductions over a slice ([`sum`], attention's row max and
/// dot products), so that the compiler can keep them in vector registers: a single running
/// float sum is a serial chain it may not reorder, one add's latency per element.
pub const LANES: usize = 16;

/// sum_i f(a_i, b_i) in `L` independent partial sums (a different rounding order from a
/// running sum); `a` and `b` of one length.
#[inline(always)]
pub fn lane_sum<const L: usize>(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// sum_i x_i in [`LANES`] partial sums.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    lane_sum::<LANES>(x, x, |v, _| v)
}

/// Runs `f` compiled for AVX-512F where the CPU has it, else as it is: the crate is built for
/// the baseline x86-64 (SSE2, 4 lanes), and loops over [`exp`] in `f` (inlined into the wrapper,
/// which LLVM does for a closure marked `#[inline(always)]`) get 16 lanes. With it, attention's
/// forward ran 1.3x and GroupNorm + SiLU 1.3-1.5x faster (docs/PERFORMANCE.md). Without the
/// `#[inline(always)]` on the closure, it stayed a separate function compiled for SSE2.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX-512F, checked above.
        return unsafe { run(f) };
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_adds_every_element_in_lanes_and_tail() {
        for len in [0, 1, 15, 16, 17, 100, 1024] {
            let x: Vec<f32> = (0..len).map(|i| (i % 7) as f32 - 2.5).collect();
            let exact: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(&x) as f64 - exact).abs() < 1e-4, "len {len}");
        }
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (ours, exact) = (exp(x) as f64, (x as f64).exp());
            assert!(
                ((ours - exact) / exact).abs() < 5e-7,
                "exp({x}): {ours} vs {exact}"
            );
        }
        assert!(sigmoid(-200.0) < 1e-37 && sigmoid(200.0) == 1.0);
    }

    /// The exponent from t's bits is the saturating conversion's: the same value bit for bit.
    #[test]
    fn exponent_from_bits_matches_the_conversion() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let t = x * std::f32::consts::LOG2_E + ROUND;
            let k = t - ROUND;
            let by_conversion = ((k as i32 + 127) as u32) << 23;
            assert_eq!(by_conversion, pow2_bits(t), "exp({x})");
        }
    }
}
