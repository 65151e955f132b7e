//! Every random choice flows from `--seed`: host-side generators, seeded per purpose and step.
//!
//! Noise is drawn on the host and uploaded, so a seed gives the same numbers on every backend
//! (flex, libtorch CPU, CUDA) and a resumed run continues exactly where it stopped.

use burn::tensor::{Device, Tensor};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

use crate::upload;

/// A generator for one purpose at one step: `seed`, a purpose tag and a counter are mixed
/// (SplitMix64) so streams never overlap and need no saved state to resume.
pub fn stream(seed: u64, purpose: &str, counter: u64) -> StdRng {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in purpose.bytes() {
        h = splitmix(h ^ u64::from(b));
    }
    StdRng::seed_from_u64(splitmix(h ^ splitmix(counter)))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard normal samples N(0, I) of the given shape, drawn from `rng` on the host.
pub fn randn<const D: usize>(rng: &mut StdRng, shape: [usize; D], device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    upload::float(values, shape, device)
}

/// Uniform samples in `[0, 1)` of the given shape, drawn from `rng` on the host.
pub fn rand_uniform<const D: usize>(
    rng: &mut StdRng,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    upload::float(values, shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = stream(7, "noise", 3).next_u64();
        assert_eq!(a, stream(7, "noise", 3).next_u64());
        assert_ne!(a, stream(7, "noise", 4).next_u64());
        assert_ne!(a, stream(7, "order", 3).next_u64());
        assert_ne!(a, stream(8, "noise", 3).next_u64());
    }
}
