//! Helpers of the unit tests.

/// `len` values in [-0.5, 0.5) from a linear congruential generator seeded by `seed`: the same
/// inputs on every machine, without a random-number crate.
pub fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}
