//! Denoising diffusion implicit models (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit
//! Models").

use burn::prelude::*;

use super::{SampleHooks, alpha_bar_to, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::parameterization::eps_to_x0;
use crate::schedule::Schedule;

/// sigma_t(eta) = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)  (DDIM eq. 16):
/// 0 for eta = 0 (deterministic), the DDPM posterior standard deviation for eta = 1.
pub fn ddim_sigma(ab_t: f64, ab_s: f64, eta: f64) -> f64 {
    eta * ((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s)).sqrt()
}

/// DDIM, Song et al. 2021 eq. 12:
/// z_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z, with
/// x0_hat = (z_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t) and sigma from [`ddim_sigma`].
/// `eta = 0` is deterministic (an Euler step of the probability-flow ODE in the coordinates
/// (sigma, z / sqrt(ab))); the last step returns x0_hat.
pub fn sample_ddim(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    eta: f64,
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    for (i, t, next) in steps(timesteps) {
        let (ab_t, ab_s) = (schedule.alpha_bar(t), alpha_bar_to(schedule, next));
        let eps = model.predict_eps(x.clone(), t);
        let x0 = eps_to_x0(schedule, x, eps.clone(), t);
        let sigma = ddim_sigma(ab_t, ab_s, eta);
        let direction = eps * (1.0 - ab_s - sigma * sigma).max(0.0).sqrt();
        x = x0 * ab_s.sqrt() + direction;
        if sigma > 0.0 {
            let noise = hooks.noise_like(&x);
            x = x + noise * sigma;
        }
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
