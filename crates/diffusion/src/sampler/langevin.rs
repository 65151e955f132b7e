//! Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
//! Stochastic Differential Equations", Algorithms 1, 3 and 5 for the VP SDE): a reverse-diffusion
//! predictor and an annealed Langevin corrector.

use burn::prelude::*;

use super::{SampleHooks, alpha_bar_to, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::parameterization::eps_to_score_at;
use crate::schedule::Schedule;

/// ||x|| per sample: `[b, c, h, w]` -> `[b, 1, 1, 1]`.
fn norm_per_sample(x: Tensor<4>) -> Tensor<4> {
    x.powi_scalar(2).sum_dims(&[1, 2, 3]).sqrt()
}

/// One Langevin corrector step, Song et al. 2021 Algorithm 5 (VP): with score g and noise z,
/// eps = 2 alpha_t (r ||z|| / ||g||)^2, x <- x + eps g + sqrt(2 eps) z. The step size is per
/// sample (the algorithm is written for one x), so samples do not depend on their batch.
fn langevin_step(
    x: Tensor<4>,
    score: Tensor<4>,
    noise: Tensor<4>,
    alpha: f64,
    snr: f64,
) -> Tensor<4> {
    let ratio = norm_per_sample(noise.clone()) / norm_per_sample(score.clone()).clamp_min(1e-12);
    let step = ratio.powi_scalar(2) * (2.0 * alpha * snr * snr);
    x + score * step.clone() + noise * (step * 2.0).sqrt()
}

/// Predictor-corrector sampling, Song et al. 2021 Algorithm 1 with the VP choices: at each
/// timestep t, `corrector_steps` Langevin steps ([`langevin_step`], signal-to-noise `snr`), then
/// the reverse-diffusion predictor (Algorithm 3)
/// z_s = (2 - sqrt(1 - beta)) z_t + beta score + sqrt(beta) z, with beta = 1 - ab_t / ab_s for
/// a subsequence of timesteps. Correcting before predicting follows the authors' `pc_sampler`;
/// the last predictor step adds no noise (their `denoise = True`). The predictor is a first-order
/// discretization: use many steps (the paper uses all T).
pub fn sample_langevin(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    snr: f64,
    corrector_steps: usize,
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    let score_at = |x: Tensor<4>, t: usize| {
        let eps = model.predict_eps(x, t);
        eps_to_score_at(schedule, eps, t)
    };
    for (i, t, next) in steps(timesteps) {
        for _ in 0..corrector_steps {
            let score = score_at(x.clone(), t);
            let noise = hooks.noise_like(&x);
            x = langevin_step(x, score, noise, schedule.alphas[t], snr);
        }
        let beta = 1.0 - schedule.alpha_bar(t) / alpha_bar_to(schedule, next);
        let score = score_at(x.clone(), t);
        let mean = x * (2.0 - (1.0 - beta).sqrt()) + score * beta;
        x = match next {
            None => mean,
            Some(_) => {
                let noise = hooks.noise_like(&mean);
                mean + noise * beta.sqrt()
            }
        };
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
