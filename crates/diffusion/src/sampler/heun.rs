//! Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", Algorithm 1) on the probability-flow ODE of the discrete
//! VP schedule.

use burn::prelude::*;

use super::{SampleHooks, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::schedule::Schedule;

/// sigma = sqrt((1 - ab) / ab): the noise level of x~ = z / sqrt(ab), in which the VP
/// probability-flow ODE is dx~/dsigma = (x~ - D(x~; sigma)) / sigma  (Karras et al. 2022,
/// eq. 4 with s(t) = sqrt(ab), section 2 / Table 1).
fn sigma(ab: f64) -> f64 {
    ((1.0 - ab) / ab).sqrt()
}

/// Heun's method, Karras et al. 2022 Algorithm 1 (deterministic, no churn): with
/// d = (x~ - D) / sigma = eps_hat (k-diffusion's `to_d`), an Euler step
/// x~' = x~ + (sigma_s - sigma_t) d_t, then the trapezoidal correction
/// x~_s = x~ + (sigma_s - sigma_t) (d_t + d_s(x~')) / 2, except on the last step to sigma = 0,
/// which stays Euler and returns x0_hat. Both evaluations fall on trained timesteps (t and the
/// next one), so 2 steps - 1 network calls in all.
pub fn sample_heun(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    for (i, t, next) in steps(timesteps) {
        let ab_t = schedule.alpha_bar(t);
        let x_ve = x.clone() / ab_t.sqrt();
        let d = model.predict_eps(x, t);
        x = match next {
            None => x_ve - d * sigma(ab_t),
            Some(s) => {
                let ab_s = schedule.alpha_bar(s);
                let dt = sigma(ab_s) - sigma(ab_t);
                let euler = x_ve.clone() + d.clone() * dt;
                let d_next = model.predict_eps(euler * ab_s.sqrt(), s);
                (x_ve + (d + d_next) * (0.5 * dt)) * ab_s.sqrt()
            }
        };
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
