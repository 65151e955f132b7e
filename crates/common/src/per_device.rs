//! Values made once per device and autodiff context: constant tensors (a table of schedule
//! coefficients, an embedding's frequencies) uploaded on first use and reused by every step.
//!
//! burn's `Device` equality ignores autodiff, so the autodiff context is part of the key: a
//! constant made on a device's autodiff twin would make every operation it meets on the plain
//! device an autodiff one (a sampler run after training recorded graphs, fixed in c0574dd).

use std::sync::Mutex;

use burn::tensor::{Device, GradientCheckpointingStrategy};

/// A cache of `T` keyed by device, autodiff context and a key `K` of the caller's.
pub struct PerDevice<K, T> {
    entries: Mutex<Vec<Entry<K, T>>>,
}

type Entry<K, T> = (Device, Option<GradientCheckpointingStrategy>, K, T);

impl<K, T> Default for PerDevice<K, T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
        }
    }
}

impl<K: PartialEq, T: Clone> PerDevice<K, T> {
    /// The value for `(device, its autodiff context, key)`, made by `make` on first use.
    pub fn get_or_make(&self, device: &Device, key: K, make: impl FnOnce() -> T) -> T {
        let context = device.gradient_checkpointing_strategy();
        // a poisoned lock only means another thread panicked while inserting: the entries
        // already there are complete
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((.., value)) = entries
            .iter()
            .find(|(d, c, k, _)| d == device && *c == context && *k == key)
        {
            return value.clone();
        }
        let value = make();
        entries.push((device.clone(), context, key, value.clone()));
        value
    }
}

impl<K, T> std::fmt::Debug for PerDevice<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        write!(f, "PerDevice({n} entries)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::prelude::*;

    #[test]
    fn one_value_per_device_context_and_key() {
        let cache = PerDevice::<u8, Tensor<1>>::default();
        let plain = Device::flex();
        let autodiff = plain.clone().autodiff();
        let mut made = 0;
        for device in [&plain, &autodiff, &plain, &autodiff] {
            for key in [1u8, 2] {
                let value = cache.get_or_make(device, key, || {
                    made += 1;
                    Tensor::from_floats([key as f32], device)
                });
                assert_eq!(value.is_autodiff(), device.is_autodiff());
                assert_eq!(value.into_scalar::<f32>(), key as f32);
            }
        }
        assert_eq!(made, 4, "two contexts times two keys");
    }
}
