//! The per-timestep numbers of a training step as one constant table on the device, so that a
//! step uploads its timesteps once, as integers, and gathers every per-sample coefficient there.
//!
//! Built per sample on the host ([`crate::process::per_sample`]), the step's coefficients were
//! five uploads besides the timesteps themselves: q_sample's a and s, v's a and s, the loss
//! weights. On CUDA each upload from pageable host memory waits for the device's queue, so
//! each one is a host-device synchronisation. Here they are columns of one `[COLUMNS, T]` f32
//! table, uploaded once per device and autodiff context, and one `select` gathers them all:
//!
//! | row | value at timestep t                          | used by                         |
//! |-----|----------------------------------------------|---------------------------------|
//! | 0   | sqrt_alphas_cumprod[t]                       | q_sample's a (DDPM eq. 4)       |
//! | 1   | sqrt_one_minus_alphas_cumprod[t]             | q_sample's s                    |
//! | 2   | sqrt(alpha_bar(t))                           | v's target (floored alphabar)   |
//! | 3   | sqrt(1 - alpha_bar(t))                       | v's target                      |
//! | 4   | w(t), [`LossWeighting::weight`]              | the weighted MSE                |
//! | 5   | t                                            | the network's time input        |
//!
//! Every value is the f32 that `per_sample` uploaded (the f64 formula, then `as f32`; t < 2^24
//! is exact), so a step computes the same numbers as with per-sample uploads.

use burn::prelude::*;
use burn::tensor::TensorData;
use ldm_common::per_device::PerDevice;
use ldm_common::upload;

use crate::loss::LossWeighting;
use crate::parameterization::Parameterization;
use crate::process::q_sample_with;
use crate::schedule::Schedule;

const COLUMNS: usize = 6;

/// The training step's coefficients for every timestep of a schedule (module doc).
#[derive(Debug)]
pub struct TrainingTable {
    /// `[COLUMNS, T]`, row-major.
    values: Vec<f32>,
    parameterization: Parameterization,
    uploaded: PerDevice<(), Tensor<2>>,
}

/// One batch's per-sample coefficients, gathered on the device.
#[derive(Debug, Clone)]
pub struct StepCoefficients {
    parameterization: Parameterization,
    /// The table's columns at each sample's timestep, `[COLUMNS, batch]`.
    rows: Tensor<2>,
    /// The loss weights, `[batch]`.
    pub weights: Tensor<1>,
    /// The timesteps as floats (the network's time input), `[batch]`.
    pub t: Tensor<1>,
}

impl TrainingTable {
    /// The table of a schedule, a parameterization and a loss weighting.
    pub fn new(
        schedule: &Schedule,
        parameterization: Parameterization,
        weighting: &LossWeighting,
    ) -> Self {
        let big_t = schedule.num_timesteps();
        let columns: [&dyn Fn(usize) -> f64; COLUMNS] = [
            &|t| schedule.sqrt_alphas_cumprod[t],
            &|t| schedule.sqrt_one_minus_alphas_cumprod[t],
            &|t| schedule.alpha_bar(t).sqrt(),
            &|t| (1.0 - schedule.alpha_bar(t)).sqrt(),
            &|t| weighting.weight(schedule, parameterization, t),
            &|t| t as f64,
        ];
        let values = columns
            .iter()
            .flat_map(|f| (0..big_t).map(move |t| f(t) as f32))
            .collect();
        Self {
            values,
            parameterization,
            uploaded: PerDevice::default(),
        }
    }

    /// The coefficients of timesteps `t` (one per sample) on `device`: one upload of `t` as
    /// integers and one gather from the table (uploaded on the first call per device and
    /// autodiff context).
    ///
    /// # Panics
    /// If a timestep is not below the schedule's T (the caller draws them from 0..T).
    pub fn gather(&self, t: &[usize], device: &Device) -> StepCoefficients {
        let big_t = self.values.len() / COLUMNS;
        let b = t.len();
        let indices: Vec<i64> = t
            .iter()
            .map(|&t| {
                assert!(t < big_t, "timestep {t} outside the schedule's 0..{big_t}");
                t as i64
            })
            .collect();
        let indices = upload::int(indices, [b], device);
        let table = self.uploaded.get_or_make(device, (), || {
            Tensor::from_data(
                TensorData::new(self.values.clone(), [COLUMNS, big_t]),
                device,
            )
        });
        // [COLUMNS, b]: each row a contiguous per-sample vector
        let rows = table.select(1, indices);
        let row = |k: usize| rows.clone().narrow(0, k, 1).reshape([b]);
        StepCoefficients {
            parameterization: self.parameterization,
            weights: row(4),
            t: row(5),
            rows,
        }
    }
}

impl StepCoefficients {
    /// Column `k` of the table per sample, `[batch, 1, 1, 1]` (a view of the gathered rows).
    fn column(&self, k: usize) -> Tensor<4> {
        let [_, b] = self.rows.dims();
        self.rows.clone().narrow(0, k, 1).reshape([b, 1, 1, 1])
    }

    /// z_t = sqrt(alphabar_t) z_0 + sqrt(1 - alphabar_t) eps  (DDPM eq. 4)
    pub fn q_sample(&self, z0: Tensor<4>, eps: Tensor<4>) -> Tensor<4> {
        q_sample_with(z0, eps, self.column(0), self.column(1))
    }

    /// The parameterization's training target ([`Parameterization::target`]).
    pub fn target(&self, z0: Tensor<4>, eps: Tensor<4>) -> Tensor<4> {
        self.parameterization
            .target_with(z0, eps, || (self.column(2), self.column(3)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{per_sample, q_sample};
    use crate::schedule::{BetaSchedule, ScheduleConfig};
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    fn bits(x: Tensor<4>) -> Vec<u32> {
        to_vec_f32(x).iter().map(|v| v.to_bits()).collect()
    }

    /// Every gathered value is bit for bit what the per-sample uploads gave, on a
    /// zero-terminal-SNR schedule (where the floored alphabar differs from alphas_cumprod).
    #[test]
    fn gathered_coefficients_are_the_per_sample_uploads() {
        let mut config = ScheduleConfig {
            kind: BetaSchedule::Cosine,
            num_timesteps: 50,
            ..ScheduleConfig::default()
        };
        config.rescale_zero_terminal_snr = true;
        let schedule = Schedule::new(&config).unwrap();
        let device = Device::flex();
        let t = [49, 0, 7, 49, 23];
        for p in [
            Parameterization::Epsilon,
            Parameterization::Sample,
            Parameterization::Velocity,
        ] {
            let weighting = LossWeighting::MinSnr { gamma: 5.0 };
            let table = TrainingTable::new(&schedule, p, &weighting);
            let c = table.gather(&t, &device);
            let z0 = randn(&mut stream(3, "z0", 0), [5, 2, 3, 3], &device);
            let eps = randn(&mut stream(3, "eps", 0), [5, 2, 3, 3], &device);
            assert_eq!(
                bits(c.q_sample(z0.clone(), eps.clone())),
                bits(q_sample(&schedule, z0.clone(), &t, eps.clone()))
            );
            assert_eq!(
                bits(c.target(z0.clone(), eps.clone())),
                bits(p.target(&schedule, z0, eps, &t))
            );
            let weights = weighting.weights(&schedule, p, &t, &device);
            assert_eq!(to_vec_f32(c.weights), to_vec_f32(weights));
            let t_float = per_sample(&t, &device, |t| t as f64).reshape([5]);
            assert_eq!(to_vec_f32(c.t), to_vec_f32(t_float));
        }
    }

    #[test]
    fn the_table_follows_the_autodiff_context() {
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let table = TrainingTable::new(
            &schedule,
            Parameterization::Velocity,
            &LossWeighting::default(),
        );
        let plain = Device::flex();
        let autodiff = plain.clone().autodiff();
        for device in [&autodiff, &plain, &autodiff] {
            let c = table.gather(&[1, 2], device);
            assert_eq!(c.weights.is_autodiff(), device.is_autodiff());
            assert_eq!(c.t.is_autodiff(), device.is_autodiff());
        }
    }

    #[test]
    #[should_panic(expected = "timestep 1000 outside the schedule's 0..1000")]
    fn a_timestep_past_the_schedule_is_refused() {
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let table = TrainingTable::new(
            &schedule,
            Parameterization::Epsilon,
            &LossWeighting::default(),
        );
        table.gather(&[0, 1000], &Device::flex());
    }
}
