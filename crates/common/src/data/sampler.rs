//! The order in which training images are visited: a fresh seeded permutation per epoch,
//! concatenated into one endless stream that batch `k` reads at `[k * b, (k + 1) * b)`.
//! The order is a pure function of (seed, step, batch size), so `--resume` continues with
//! exactly the batches the uninterrupted run would have seen.

use rand::seq::SliceRandom;

use crate::rng::stream;

/// Deterministic batches over a data set of `len` items.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    seed: u64,
    len: usize,
    batch_size: usize,
    cached_epoch: Option<(u64, Vec<usize>)>,
}

impl BatchOrder {
    pub fn new(seed: u64, len: usize, batch_size: usize) -> Self {
        assert!(len > 0 && batch_size > 0, "validated by the caller");
        Self {
            seed,
            len,
            batch_size,
            cached_epoch: None,
        }
    }

    /// The permutation of epoch `epoch`.
    fn permutation(&mut self, epoch: u64) -> &[usize] {
        if self.cached_epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..self.len).collect();
            perm.shuffle(&mut stream(self.seed, "data-order", epoch));
            self.cached_epoch = Some((epoch, perm));
        }
        &self.cached_epoch.as_ref().expect("just filled").1
    }

    /// The item indices of batch number `step` (0-based).
    pub fn batch(&mut self, step: u64) -> Vec<usize> {
        let start = step * self.batch_size as u64;
        (start..start + self.batch_size as u64)
            .map(|pos| {
                let (epoch, offset) = (pos / self.len as u64, (pos % self.len as u64) as usize);
                self.permutation(epoch)[offset]
            })
            .collect()
    }

    /// The epoch (possibly fractional) reached after `steps` batches.
    pub fn epochs(&self, steps: u64) -> f64 {
        (steps * self.batch_size as u64) as f64 / self.len as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_visits_every_item_once() {
        let mut order = BatchOrder::new(3, 10, 4);
        let seen: Vec<usize> = (0..5).flat_map(|s| order.batch(s)).collect();
        let mut first: Vec<usize> = seen[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let mut second: Vec<usize> = seen[10..20].to_vec();
        second.sort();
        assert_eq!(second, (0..10).collect::<Vec<_>>());
        assert_ne!(seen[..10], seen[10..20], "epochs are reshuffled");
    }

    #[test]
    fn order_depends_only_on_seed_and_step() {
        let mut a = BatchOrder::new(9, 100, 8);
        let mut b = BatchOrder::new(9, 100, 8);
        let _ = a.batch(0);
        assert_eq!(a.batch(30), b.batch(30));
        assert_ne!(BatchOrder::new(10, 100, 8).batch(0), b.batch(0));
    }
}
