//! Conditioning embeddings: the sinusoidal timestep embedding (Ho et al. 2020, as written in
//! Dhariwal & Nichol 2021's ADM `timestep_embedding`) and DiT's `TimestepEmbedder` and
//! `LabelEmbedder` (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{Bool, Int, TensorData};
use ldm_common::activation::silu;
use ldm_common::linear::linear;
use ldm_common::per_device::PerDevice;
use ldm_common::precision::to_dtype;

/// Period of the slowest sinusoid of the timestep embedding (ADM, DiT).
pub const MAX_PERIOD: f64 = 10_000.0;

/// emb(t) = [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})] with
/// f_i = max_period^(-i/h), h = dim/2 (ADM `timestep_embedding`); an odd `dim` gets a zero last
/// column.
///
/// # Shapes
/// - `t`: `[batch]`, float timesteps (fractional values are fine)
/// - output: `[batch, dim]`
pub fn timestep_embedding(t: Tensor<1>, dim: usize, max_period: f64) -> Tensor<2> {
    let [b] = t.dims();
    let device = t.device();
    let half = dim / 2;
    let freqs = frequencies(half, max_period, &device);
    // [b, 1] * [1, half] -> [b, half]
    let args = t.reshape([b, 1]) * freqs.reshape([1, half]);
    let mut parts = vec![args.clone().cos(), args.sin()];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([b, 1], &device));
    }
    Tensor::cat(parts, 1)
}

/// f_i = max_period^(-i/h), i < h, on `device`: computed in f64 on the host and uploaded once
/// per thread, device (with its autodiff context), h and max_period. The embedding runs in
/// every forward pass (every sampling step), and on CUDA an upload from pageable host memory
/// first waits for everything queued on the device, which would serialise the host with the
/// previous step's kernels.
fn frequencies(half: usize, max_period: f64, device: &Device) -> Tensor<1> {
    thread_local! {
        static CACHE: PerDevice<(usize, u64), Tensor<1>> = PerDevice::default();
    }
    CACHE.with(|cache| {
        cache.get_or_make(device, (half, max_period.to_bits()), || {
            let values: Vec<f32> = (0..half)
                .map(|i| (-max_period.ln() * i as f64 / half as f64).exp() as f32)
                .collect();
            Tensor::<1>::from_data(TensorData::new(values, [half]), device)
        })
    })
}

/// t -> Linear(SiLU(Linear(timestep_embedding(t)))): DiT's `TimestepEmbedder`, ADM's `time_embed`.
#[derive(Module, Debug)]
pub struct TimestepEmbedder {
    linear1: Linear,
    linear2: Linear,
    frequency_dim: usize,
}

impl TimestepEmbedder {
    /// `frequency_dim` sinusoids in, `dim` features out (the MLP is `dim` wide).
    pub fn new(frequency_dim: usize, dim: usize, device: &Device) -> Self {
        Self {
            linear1: LinearConfig::new(frequency_dim, dim).init(device),
            linear2: LinearConfig::new(dim, dim).init(device),
            frequency_dim,
        }
    }

    /// # Shapes
    /// - `t`: `[batch]` -> `[batch, dim]`
    pub fn forward(&self, t: Tensor<1>) -> Tensor<2> {
        // the sinusoids in f32 (t reaches 999), then in the weights' dtype (bf16 under mixed precision)
        let emb = to_dtype(
            timestep_embedding(t, self.frequency_dim, MAX_PERIOD),
            self.linear1.weight.val().dtype(),
        );
        linear(&self.linear2, silu(linear(&self.linear1, emb)))
    }
}

/// Class ids -> learned vectors, with one extra row: id `num_classes` is the learned null class
/// that classifier-free guidance uses for "no label" (DiT's `LabelEmbedder`). Which labels are
/// dropped during training is the trainer's choice (from its seeded generator); see
/// [`drop_labels`].
#[derive(Module, Debug)]
pub struct LabelEmbedder {
    table: Embedding,
    num_classes: usize,
}

impl LabelEmbedder {
    /// A `(num_classes + 1) x dim` table, N(0, 0.02^2) as in DiT.
    pub fn new(num_classes: usize, dim: usize, device: &Device) -> Self {
        Self {
            table: EmbeddingConfig::new(num_classes + 1, dim)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            num_classes,
        }
    }

    /// The id of the learned null class.
    pub fn null_class(&self) -> usize {
        self.num_classes
    }

    /// # Shapes
    /// - `labels`: `[batch]`, ids in `0..=num_classes` -> `[batch, dim]`
    pub fn forward(&self, labels: Tensor<1, Int>) -> Tensor<2> {
        let [b] = labels.dims();
        // [b] -> [b, 1] -> [b, 1, dim] -> [b, dim]
        let emb = self.table.forward(labels.reshape([b, 1]));
        let [_, _, d] = emb.dims();
        emb.reshape([b, d])
    }
}

/// Replaces the labels where `drop_mask` is true by the null class id `num_classes` (the
/// classifier-free guidance label dropout of Ho & Salimans 2022, DiT's `token_drop`).
///
/// # Shapes
/// - `labels`, `drop_mask`, output: `[batch]`
pub fn drop_labels(
    labels: Tensor<1, Int>,
    drop_mask: Tensor<1, Bool>,
    num_classes: usize,
) -> Tensor<1, Int> {
    labels.mask_fill(drop_mask, num_classes as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::test_util::{check_gradient, weighted_sum};
    use burn::module::Param;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    /// Odd and even widths, two periods, two devices, each asked twice: the second call takes
    /// the frequencies made by the first, and no two settings share them.
    #[test]
    fn sinusoid_matches_the_formula() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            for _ in 0..2 {
                for (dim, period) in [(7, MAX_PERIOD), (6, MAX_PERIOD), (7, 100.0)] {
                    let t = Tensor::<1>::from_floats([0.0, 3.0, 999.0], &device);
                    let emb = to_vec_f32(timestep_embedding(t, dim, period));
                    let half = dim / 2;
                    for (row, &tv) in [0.0f64, 3.0, 999.0].iter().enumerate() {
                        for i in 0..half {
                            let f = period.powf(-(i as f64) / half as f64);
                            let cos = emb[row * dim + i];
                            let sin = emb[row * dim + half + i];
                            let what = format!("dim {dim} period {period} t={tv} i={i}");
                            assert!((f64::from(cos) - (tv * f).cos()).abs() < 1e-4, "cos {what}");
                            assert!((f64::from(sin) - (tv * f).sin()).abs() < 1e-4, "sin {what}");
                        }
                        if dim % 2 == 1 {
                            assert_eq!(emb[row * dim + dim - 1], 0.0, "odd dim pads with zero");
                        }
                    }
                }
            }
        }
    }

    /// The frequencies are kept per autodiff context too (burn's device equality ignores it):
    /// an embedding on a plain device after one on its autodiff twin is a plain tensor, not
    /// one that turns the sampler's operations into autodiff ones.
    #[test]
    fn frequencies_follow_the_autodiff_context() {
        let plain = Device::flex();
        let autodiff = plain.clone().autodiff();
        for (first, second) in [(&autodiff, &plain), (&plain, &autodiff)] {
            for device in [first, second] {
                let t = Tensor::<1>::from_floats([1.0, 2.0], device);
                let emb = timestep_embedding(t, 8, MAX_PERIOD);
                assert_eq!(emb.is_autodiff(), device.is_autodiff());
            }
        }
    }

    /// d/dt and d/dW of a Linear over the sinusoidal embedding (sin, cos, broadcasting, cat).
    #[test]
    fn sinusoid_through_linear_gradient() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let lin = LinearConfig::new(8, 5).init(&device);
        let w = randn(&mut stream(11, "w", 0), [3, 5], &device);
        let t = Tensor::<1>::from_floats([0.5, 17.0, 250.0], &device);
        let loss = |t: Tensor<1>, lin: &Linear| {
            weighted_sum(lin.forward(timestep_embedding(t, 8, MAX_PERIOD)), &w)
        };
        check_gradient("d/dt", |t| loss(t, &lin), t.clone(), 1e-2);
        let weight_loss = |wt: Tensor<2>| {
            let mut l = lin.clone();
            l.weight = Param::from_tensor(wt);
            loss(t.clone(), &l)
        };
        check_gradient("d/dW", weight_loss, lin.weight.val(), 1e-2);
    }

    #[test]
    fn null_class_and_dropped_label_share_an_embedding() {
        let device = Device::flex();
        device.seed(5);
        let emb = LabelEmbedder::new(4, 6, &device);
        let labels = Tensor::<1, Int>::from_ints([0, 3, 2], &device);
        let mask = Tensor::<1, Bool>::from_bool(TensorData::from([true, false, true]), &device);
        let dropped = drop_labels(labels, mask, 4);
        assert_eq!(
            dropped.clone().into_data().try_into_vec_as::<i64>().ok(),
            Some(vec![4, 3, 4])
        );
        let null = emb.forward(Tensor::<1, Int>::from_ints(
            [emb.null_class() as i64],
            &device,
        ));
        let e = to_vec_f32(emb.forward(dropped));
        let null = to_vec_f32(null);
        assert_eq!(&e[0..6], &null[..]);
        assert_eq!(&e[12..18], &null[..]);
        assert_ne!(&e[6..12], &null[..]);
    }

    /// The table's gradient, with a repeated label accumulating into one row.
    #[test]
    fn label_embedding_gradient() {
        let device = Device::flex().autodiff();
        device.seed(12);
        let emb = LabelEmbedder::new(3, 4, &device);
        let labels = Tensor::<1, Int>::from_ints([1, 1, 3], &device);
        let w = randn(&mut stream(12, "w", 0), [3, 4], &device);
        let table_loss = |table: Tensor<2>| {
            let mut e = emb.clone();
            e.table.weight = Param::from_tensor(table);
            weighted_sum(e.forward(labels.clone()), &w)
        };
        check_gradient("d/dtable", table_loss, emb.table.weight.val(), 1e-2);
    }
}
