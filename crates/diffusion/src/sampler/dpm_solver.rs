//! DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models", Algorithm 2): a second-order multistep solver of the probability-flow
//! ODE in data prediction form.

use burn::prelude::*;

use super::{SampleHooks, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::parameterization::eps_to_x0;
use crate::schedule::Schedule;

/// lambda_t = log(alpha_t / sigma_t) = 0.5 log(ab / (1 - ab)), half the log-SNR (Lu et al. 2022).
fn lambda(ab: f64) -> f64 {
    0.5 * (ab / (1.0 - ab)).ln()
}

/// DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 with alpha = sqrt(ab), sigma = sqrt(1 - ab),
/// h = lambda_s - lambda_t:
/// z_s = (sigma_s / sigma_t) z_t - alpha_s (e^-h - 1) D, where D = x0_hat at the first step and
/// D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev with r = h_prev / h afterwards. The step that
/// lands on the data (sigma = 0, h = inf) is first order and returns x0_hat, as k-diffusion's
/// `sample_dpmpp_2m` and diffusers' `lower_order_final` do. Deterministic.
pub fn sample_dpm_solver_pp(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    let mut previous: Option<(Tensor<4>, f64)> = None;
    for (i, t, next) in steps(timesteps) {
        let ab_t = schedule.alpha_bar(t);
        let eps = model.predict_eps(x.clone(), t);
        let x0 = eps_to_x0(schedule, x.clone(), eps, t);
        x = match next {
            None => x0.clone(),
            Some(s) => {
                let ab_s = schedule.alpha_bar(s);
                let h = lambda(ab_s) - lambda(ab_t);
                let d = match &previous {
                    None => x0.clone(),
                    Some((x0_prev, lambda_prev)) => {
                        let r = (lambda(ab_t) - lambda_prev) / h;
                        x0.clone() * (1.0 + 0.5 / r) - x0_prev.clone() * (0.5 / r)
                    }
                };
                let sigma_ratio = ((1.0 - ab_s) / (1.0 - ab_t)).sqrt();
                x * sigma_ratio - d * (ab_s.sqrt() * (-h).exp_m1())
            }
        };
        previous = Some((x0, lambda(ab_t)));
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
