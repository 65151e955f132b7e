//! Pseudo linear multistep (PLMS; Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
//! Models on Manifolds"), the `PLMSSampler` of the CompVis latent-diffusion and Stable Diffusion
//! code (diffusers' `PNDMScheduler` with `skip_prk_steps`): DDIM's deterministic transfer with
//! eps replaced by an Adams-Bashforth combination of the previous steps' eps.

use burn::prelude::*;

use super::{SampleHooks, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::parameterization::eps_to_x0;
use crate::schedule::Schedule;

/// DDIM's deterministic step (Song et al. 2021 eq. 12, sigma = 0) with the noise estimate `e`:
/// z_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s) e, x0_hat = (z_t - sqrt(1 - ab_t) e) / sqrt(ab_t);
/// x0_hat itself when `next` is the data (Liu et al.'s transfer part phi).
fn transfer(
    schedule: &Schedule,
    x: Tensor<4>,
    e: Tensor<4>,
    t: usize,
    next: Option<usize>,
) -> Tensor<4> {
    let x0 = eps_to_x0(schedule, x, e.clone(), t);
    match next {
        None => x0,
        Some(s) => {
            let ab_s = schedule.alpha_bar(s);
            x0 * ab_s.sqrt() + e * (1.0 - ab_s).sqrt()
        }
    }
}

/// PLMS as CompVis' `p_sample_plms` runs it (Liu et al. 2022 eqs. 11-12 with their pseudo
/// improved Euler start), with e_k the model's eps at step k:
/// - first step: e' = (e_0 + eps(transfer(z, e_0), t_1)) / 2 (one extra model call);
/// - second: e' = (3 e_1 - e_0) / 2;
/// - third: e' = (23 e_2 - 16 e_1 + 5 e_0) / 12;
/// - then: e' = (55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24 (4th-order Adams-Bashforth);
///
/// and z moves by [`transfer`] with e'. `steps + 1` model calls; deterministic.
pub fn sample_plms(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    // The previous steps' eps, oldest first (at most three).
    let mut old: Vec<Tensor<4>> = Vec::with_capacity(3);
    for (i, t, next) in steps(timesteps) {
        let e = model.predict_eps(x.clone(), t);
        let e_prime = match (old.as_slice(), next) {
            ([], None) => e.clone(),
            ([], Some(s)) => {
                let provisional = transfer(schedule, x.clone(), e.clone(), t, next);
                (e.clone() + model.predict_eps(provisional, s)) * 0.5
            }
            ([e1], _) => (e.clone() * 3.0 - e1.clone()) * 0.5,
            ([e2, e1], _) => (e.clone() * 23.0 - e1.clone() * 16.0 + e2.clone() * 5.0) / 12.0,
            ([e3, e2, e1], _) => {
                (e.clone() * 55.0 - e1.clone() * 59.0 + e2.clone() * 37.0 - e3.clone() * 9.0) / 24.0
            }
            _ => unreachable!("at most three previous eps are kept"),
        };
        x = transfer(schedule, x, e_prime, t, next);
        if old.len() == 3 {
            old.remove(0);
        }
        old.push(e);
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
