//! The forward process q(z_t | z_0) and its posterior q(z_{t-1} | z_t, z_0) (Ho et al. 2020,
//! "Denoising Diffusion Probabilistic Models", eqs. 4, 6 and 7).
//!
//! Every function takes one timestep index per sample: the coefficients are gathered on the host
//! and uploaded as a `[batch, 1, 1, 1]` tensor that broadcasts over the latent, through
//! [`ldm_common::upload`] (on CUDA from page-locked memory, so that the upload does not wait for
//! the queued kernels). The training step gathers them on the device instead
//! ([`crate::training_table`]), and the samplers, whose batch shares one timestep, multiply by
//! scalars ([`crate::parameterization::Parameterization::eps_at`]).

use burn::prelude::*;
use ldm_common::upload;

use crate::schedule::Schedule;

/// `[f(t_0), f(t_1), ...]` as a `[batch, 1, 1, 1]` tensor: a per-sample coefficient.
pub fn per_sample(t: &[usize], device: &Device, f: impl Fn(usize) -> f64) -> Tensor<4> {
    let values: Vec<f32> = t.iter().map(|&t| f(t) as f32).collect();
    upload::float(values, [t.len(), 1, 1, 1], device)
}

/// A diagonal Gaussian whose variance is shared by all dimensions of a sample.
#[derive(Debug, Clone)]
pub struct Gaussian {
    /// `[batch, channels, height, width]`
    pub mean: Tensor<4>,
    /// `[batch, 1, 1, 1]`
    pub variance: Tensor<4>,
    /// `[batch, 1, 1, 1]`
    pub log_variance: Tensor<4>,
}

fn check_batch(z: &Tensor<4>, t: &[usize]) {
    let [b, ..] = z.dims();
    assert_eq!(
        b,
        t.len(),
        "one timestep per sample: batch {b}, {} timesteps",
        t.len()
    );
}

/// z_t = sqrt(alphabar_t) z_0 + sqrt(1 - alphabar_t) eps  (DDPM eq. 4)
///
/// # Shapes
/// - `z0`, `noise` and the result: `[batch, channels, height, width]`; `t`: `batch` indices
pub fn q_sample(schedule: &Schedule, z0: Tensor<4>, t: &[usize], noise: Tensor<4>) -> Tensor<4> {
    check_batch(&z0, t);
    let device = z0.device();
    let a = per_sample(t, &device, |t| schedule.sqrt_alphas_cumprod[t]);
    let s = per_sample(t, &device, |t| schedule.sqrt_one_minus_alphas_cumprod[t]);
    q_sample_with(z0, noise, a, s)
}

/// [`q_sample`] with the per-sample coefficients given: z_t = a z_0 + s eps, with
/// a = sqrt(alphabar_t), s = sqrt(1 - alphabar_t), each `[batch, 1, 1, 1]`.
pub fn q_sample_with(z0: Tensor<4>, noise: Tensor<4>, a: Tensor<4>, s: Tensor<4>) -> Tensor<4> {
    z0 * a + noise * s
}

/// q(z_t | z_0) = N(sqrt(alphabar_t) z_0, (1 - alphabar_t) I)  (DDPM eq. 4)
pub fn q_mean_variance(schedule: &Schedule, z0: Tensor<4>, t: &[usize]) -> Gaussian {
    check_batch(&z0, t);
    let device = z0.device();
    Gaussian {
        mean: z0 * per_sample(t, &device, |t| schedule.sqrt_alphas_cumprod[t]),
        variance: per_sample(t, &device, |t| 1.0 - schedule.alphas_cumprod[t]),
        log_variance: per_sample(t, &device, |t| (1.0 - schedule.alphas_cumprod[t]).ln()),
    }
}

/// q(z_{t-1} | z_t, z_0) = N(coef1_t z_0 + coef2_t z_t, betatilde_t I)  (DDPM eqs. 6-7).
/// The log variance is the clipped one (finite at t = 0, where the variance is 0).
///
/// # Shapes
/// - `z0`, `z_t`: `[batch, channels, height, width]`; `t`: `batch` indices
pub fn q_posterior_mean_variance(
    schedule: &Schedule,
    z0: Tensor<4>,
    z_t: Tensor<4>,
    t: &[usize],
) -> Gaussian {
    check_batch(&z0, t);
    let device = z0.device();
    let coef1 = per_sample(t, &device, |t| schedule.posterior_mean_coef1[t]);
    let coef2 = per_sample(t, &device, |t| schedule.posterior_mean_coef2[t]);
    Gaussian {
        mean: z0 * coef1 + z_t * coef2,
        variance: per_sample(t, &device, |t| schedule.posterior_variance[t]),
        log_variance: per_sample(t, &device, |t| schedule.posterior_log_variance_clipped[t]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleConfig;
    use ldm_common::tensor::to_vec_f32;

    #[test]
    fn q_sample_uses_each_samples_own_timestep() {
        let device = Device::flex();
        let s = Schedule::new(&ScheduleConfig::default()).unwrap();
        let z0 = Tensor::<4>::ones([3, 1, 1, 2], &device);
        let noise = Tensor::<4>::ones([3, 1, 1, 2], &device) * 2.0;
        let t = [0, 500, 999];
        let z = to_vec_f32(q_sample(&s, z0, &t, noise));
        for (i, &t) in t.iter().enumerate() {
            let e = s.sqrt_alphas_cumprod[t] + 2.0 * s.sqrt_one_minus_alphas_cumprod[t];
            for j in 0..2 {
                assert!((f64::from(z[2 * i + j]) - e).abs() < 1e-6, "t={t}: {z:?}");
            }
        }
    }

    #[test]
    fn posterior_mean_matches_the_coefficients() {
        let device = Device::flex();
        let s = Schedule::new(&ScheduleConfig::default()).unwrap();
        let z0 = Tensor::<4>::from_floats([[[[0.5]]], [[[-1.0]]]], &device);
        let zt = Tensor::<4>::from_floats([[[[2.0]]], [[[0.25]]]], &device);
        let q = q_posterior_mean_variance(&s, z0, zt, &[0, 700]);
        let mean = to_vec_f32(q.mean);
        let var = to_vec_f32(q.variance);
        let e0 = s.posterior_mean_coef1[0] * 0.5 + s.posterior_mean_coef2[0] * 2.0;
        let e1 = -s.posterior_mean_coef1[700] + s.posterior_mean_coef2[700] * 0.25;
        // At t = 0 the posterior collapses onto the data: mean z_0, variance 0.
        assert!((e0 - 0.5).abs() < 1e-12);
        assert!((f64::from(mean[0]) - e0).abs() < 1e-6);
        assert!((f64::from(mean[1]) - e1).abs() < 1e-6);
        assert_eq!(var[0], 0.0);
        assert!((f64::from(var[1]) - s.posterior_variance[700]).abs() < 1e-8);
    }
}
