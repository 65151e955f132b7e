//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models"), as diffusers' `UniPCMultistepScheduler` runs it by default: data
//! prediction, B(h) = e^h - 1 ("bh2"), order 2, first order at the first and the last step.

use burn::prelude::*;

use super::{SampleHooks, check_timesteps, steps};
use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::parameterization::eps_to_x0;
use crate::schedule::Schedule;

/// alpha = sqrt(ab), sigma = sqrt(1 - ab) and lambda = log(alpha / sigma) of a noise level;
/// the data (ab = 1) has sigma 0 and lambda = +inf.
#[derive(Clone, Copy)]
struct Level {
    alpha: f64,
    sigma: f64,
    lambda: f64,
}

impl Level {
    fn of(ab: f64) -> Self {
        let (alpha, sigma) = (ab.sqrt(), (1.0 - ab).sqrt());
        Self {
            alpha,
            sigma,
            lambda: alpha.ln() - sigma.ln(),
        }
    }
}

/// One UniPC update from level `s0` (where `x` lies and the data prediction is `m0`) to
/// level `t`, with h = lambda_t - lambda_s0 and B(h) = e^-h - 1 (UniPC's `bh2` in data
/// prediction, Zhao et al. 2023, Algorithms 1 and 2 with their Appendix's B(h)):
/// x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0 - alpha_t B(h) correction,
/// the first two terms DPM-Solver++'s first-order step (all of it without a correction). At
/// the data (sigma_t = 0) it is m0.
fn update(
    x: Tensor<4>,
    m0: &Tensor<4>,
    s0: Level,
    t: Level,
    correction: Option<Tensor<4>>,
) -> Tensor<4> {
    if t.sigma == 0.0 {
        return m0.clone();
    }
    let b_h = (-(t.lambda - s0.lambda)).exp_m1();
    let first_order = x * (t.sigma / s0.sigma) - m0.clone() * (t.alpha * b_h);
    match correction {
        Some(c) => first_order - c * (t.alpha * b_h),
        None => first_order,
    }
}

/// The corrector's weights (rho_1, rho_2) for order 2 with r1 = (lambda_{s1} - lambda_s0) / h:
/// the solution of [[1, 1], [r1, 1]] rho = (b1, b2) with, for hh = -h,
/// phi_1 = (e^hh - 1) / hh - 1, b1 = phi_1 / B(h), b2 = 2 (phi_1 / hh - 1/2) / B(h).
fn corrector_weights(h: f64, r1: f64) -> (f64, f64) {
    let hh = -h;
    let b_h = hh.exp_m1();
    let phi_1 = hh.exp_m1() / hh - 1.0;
    let (b1, b2) = (phi_1 / b_h, 2.0 * (phi_1 / hh - 0.5) / b_h);
    let rho_1 = (b1 - b2) / (1.0 - r1);
    (rho_1, b1 - rho_1)
}

/// UniPC-2 with the bh2 B(h), diffusers' defaults (`solver_order=2`, `solver_type="bh2"`,
/// `predict_x0=True`, `lower_order_final=True`). At step i the network's data prediction m_i
/// at t_i first corrects x_i (UniC, except at the first step) using m_i, the previous
/// predictions and x_{i-1}, then the predictor (UniP) moves the corrected x_i to t_{i+1}: order
/// 1 at the first step (and at the last, which returns m whatever the order), else order 2
/// with the divided difference
/// D1 = (m_{i-1} - m_i) / r1, r1 = (lambda_{i-1} - lambda_i) / h, weighted 1/2. The corrector
/// reuses the evaluation the next step makes anyway, so N steps cost N network calls; the last
/// step lands on the data and returns m. Deterministic.
pub fn sample_unipc(
    model: &dyn Denoiser,
    schedule: &Schedule,
    mut x: Tensor<4>,
    timesteps: &[usize],
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    check_timesteps(schedule, timesteps)?;
    // The data predictions of the last two steps with their levels, the newest last.
    let mut history: Vec<(Tensor<4>, Level)> = Vec::with_capacity(3);
    // x_{i-1} before its predictor step, and that step's order.
    let mut previous: Option<(Tensor<4>, usize)> = None;
    for (i, t, next) in steps(timesteps) {
        let level = Level::of(schedule.alpha_bar(t));
        let eps = model.predict_eps(x.clone(), t);
        let m = eps_to_x0(schedule, x.clone(), eps, t);
        if let Some((x_prev, order)) = previous.take() {
            let (m0, s0) = history.last().expect("a previous step left its prediction");
            let h = level.lambda - s0.lambda;
            let d1_t = m.clone() - m0.clone();
            let correction = match (order, history.len()) {
                (2, 2) => {
                    let (m1, s1) = &history[0];
                    let r1 = (s1.lambda - s0.lambda) / h;
                    let (rho_1, rho_t) = corrector_weights(h, r1);
                    (m1.clone() - m0.clone()) * (rho_1 / r1) + d1_t * rho_t
                }
                _ => d1_t * 0.5,
            };
            x = update(x_prev, m0, *s0, level, Some(correction));
        }
        history.push((m, level));
        if history.len() > 2 {
            history.remove(0);
        }
        // First order at the first step (no history); the last step, to the data, returns m
        // whatever the order (diffusers' `lower_order_final`).
        let order = if i == 0 { 1 } else { 2 };
        previous = Some((x.clone(), order));
        let (m0, s0) = history.last().expect("just pushed");
        let target = Level::of(next.map_or(1.0, |s| schedule.alpha_bar(s)));
        let correction = (order == 2).then(|| {
            let (m1, s1) = &history[0];
            let r1 = (s1.lambda - s0.lambda) / (target.lambda - s0.lambda);
            (m1.clone() - m0.clone()) * (0.5 / r1)
        });
        x = update(x, m0, *s0, target, correction);
        x = hooks.end_step(i, timesteps.len(), next, x)?;
    }
    Ok(x)
}
