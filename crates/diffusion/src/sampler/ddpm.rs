//! Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2).

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{SampleHooks, alpha_bar_to, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::parameterization::eps_to_x0;
use crate::schedule::Schedule;

/// The variance sigma_t^2 of the reverse step p(z_{t-1} | z_t). TOML: `"beta"` (alias
/// `"fixed-large"`) or `"posterior"` (alias `"fixed-small"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DdpmVariance {
    /// sigma_t^2 = beta_t, optimal for z_0 ~ N(0, I) (DDPM section 3.2).
    #[serde(alias = "fixed-large")]
    Beta,
    /// sigma_t^2 = betatilde_t, the posterior variance, optimal for a deterministic z_0
    /// (DDPM section 3.2; diffusers' default "fixed_small").
    #[default]
    #[serde(alias = "fixed-small")]
    Posterior,
}

/// The step t -> s of q(z_s | z_t, z_0) = N(c0 z_0 + ct z_t, var) for any s < t, with
/// beta = 1 - ab_t / ab_s: c0 = sqrt(ab_s) beta / (1 - ab_t),
/// ct = sqrt(1 - beta) (1 - ab_s) / (1 - ab_t), var = (1 - ab_s) / (1 - ab_t) beta
/// (DDPM eq. 7 with alpha_t replaced by ab_t / ab_s). Returns (c0, ct, var, beta).
pub fn posterior_step(ab_t: f64, ab_s: f64) -> (f64, f64, f64, f64) {
    let beta = 1.0 - ab_t / ab_s;
    let c0 = ab_s.sqrt() * beta / (1.0 - ab_t);
    let ct = (1.0 - beta).sqrt() * (1.0 - ab_s) / (1.0 - ab_t);
    (c0, ct, (1.0 - ab_s) / (1.0 - ab_t) * beta, beta)
}

/// Ancestral sampling, Ho et al. 2020 Algorithm 2: z_s = mu(z_t, x0_hat) + sigma z, with the
/// posterior mean of eq. 7 and sigma^2 from `variance`. Over a subsequence of timesteps each
/// step uses the effective beta = 1 - ab_t / ab_s (as diffusers' DDPMScheduler); the last step
/// adds no noise and returns x0_hat.
pub fn sample_ddpm(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    variance: DdpmVariance,
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    for (i, t, next) in steps(timesteps) {
        let eps = model.predict_eps(x.clone(), t);
        let x0 = eps_to_x0(schedule, x.clone(), eps, t);
        let (c0, ct, posterior_var, beta) =
            posterior_step(schedule.alpha_bar(t), alpha_bar_to(schedule, next));
        let mean = x0 * c0 + x * ct;
        x = match next {
            None => mean,
            Some(_) => {
                let var = match variance {
                    DdpmVariance::Beta => beta,
                    DdpmVariance::Posterior => posterior_var,
                };
                let noise = hooks.noise_like(&mean);
                mean + noise * var.sqrt()
            }
        };
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
