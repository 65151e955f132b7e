//! The training objective (Ho et al. 2020's L_simple, optionally Min-SNR weighted as in Hang et
//! al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") and the variational
//! bound as an evaluation (Ho et al. 2020, eq. 5; Luo 2022, eqs. 58 and 87-99).

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};
use crate::parameterization::Parameterization;
use crate::process::{per_sample, q_mean_variance, q_posterior_mean_variance};
use crate::sampler::DdpmVariance;
use crate::schedule::Schedule;

/// How the per-sample squared errors are weighted. TOML: `{ kind = "simple" }` or
/// `{ kind = "min-snr", gamma = 5.0 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum LossWeighting {
    /// Unweighted MSE on the parameterization's target (Ho et al. 2020, eq. 14). A struct
    /// variant (no fields) so that `deny_unknown_fields` refuses `{ kind = "simple", gamma = 5 }`
    /// instead of dropping `gamma` silently.
    Simple {},
    /// Min-SNR-gamma: the x0-space weight min(SNR(t), gamma), expressed in the target's space
    /// (Hang et al. 2023).
    MinSnr {
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

impl Default for LossWeighting {
    fn default() -> Self {
        Self::Simple {}
    }
}

fn default_gamma() -> f64 {
    5.0
}

impl LossWeighting {
    /// Checks that gamma is a positive number.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::MinSnr { gamma } if !(gamma > 0.0 && gamma.is_finite()) => {
                Err(DiffusionError::InvalidConfig {
                    key: "loss.gamma".into(),
                    value: gamma.to_string(),
                    expected: "a positive number (5 in Hang et al. 2023)".into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The weight of one sample at timestep `t` for a network predicting `parameterization`:
    /// 1 for `Simple`; for Min-SNR eps: min(SNR, g) / SNR, x0: min(SNR, g),
    /// v: min(SNR, g) / (SNR + 1)  (Hang et al. 2023). At SNR = 0 (zero terminal SNR) the eps
    /// weight takes its limit 1.
    pub fn weight(&self, schedule: &Schedule, parameterization: Parameterization, t: usize) -> f64 {
        let Self::MinSnr { gamma } = *self else {
            return 1.0;
        };
        let snr = schedule.snr[t];
        match parameterization {
            Parameterization::Epsilon => (gamma / snr).min(1.0),
            Parameterization::Sample => snr.min(gamma),
            Parameterization::Velocity => snr.min(gamma) / (snr + 1.0),
        }
    }

    /// [`Self::weight`] for each sample's timestep. Shape `[batch]`.
    pub fn weights(
        &self,
        schedule: &Schedule,
        parameterization: Parameterization,
        t: &[usize],
        device: &Device,
    ) -> Tensor<1> {
        per_sample(t, device, |t| self.weight(schedule, parameterization, t)).reshape([t.len()])
    }
}

/// mean_b w_b * mean_{c,h,w} (output - target)^2: the weighted MSE (Ho et al. 2020, eq. 14).
///
/// # Shapes
/// - `output`, `target`: `[batch, channels, height, width]`; `weights`: `[batch]`; result `[1]`
pub fn diffusion_loss(output: Tensor<4>, target: Tensor<4>, weights: Tensor<1>) -> Tensor<1> {
    let [b, ..] = output.dims();
    let mse: Tensor<1> = (output - target)
        .powi_scalar(2)
        .mean_dims(&[1, 2, 3])
        .reshape([b]);
    (mse * weights).mean()
}

/// KL(N(m1, e^lv1) || N(m2, e^lv2)) = 0.5 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^-lv2)
/// per element (Luo 2022, eq. 88 for one dimension). Variances may be `[batch, 1, 1, 1]`.
pub fn normal_kl(
    mean1: Tensor<4>,
    log_var1: Tensor<4>,
    mean2: Tensor<4>,
    log_var2: Tensor<4>,
) -> Tensor<4> {
    let ratio = (log_var1.clone() - log_var2.clone()).exp();
    let mahalanobis = (mean1 - mean2).powi_scalar(2) * (-log_var2.clone()).exp();
    (log_var2 - log_var1 + ratio + mahalanobis - 1.0) * 0.5
}

/// -log N(x; m, e^lv) = 0.5 (log 2 pi + lv + (x - m)^2 e^-lv) per element.
pub fn gaussian_nll(x: Tensor<4>, mean: Tensor<4>, log_var: Tensor<4>) -> Tensor<4> {
    let ln_2pi = (2.0 * std::f64::consts::PI).ln();
    ((x - mean).powi_scalar(2) * (-log_var.clone()).exp() + log_var + ln_2pi) * 0.5
}

/// Sums a per-element quantity over the dimensions of each sample: `[b, c, h, w]` -> `[b]`.
fn sum_per_sample(x: Tensor<4>) -> Tensor<1> {
    let [b, ..] = x.dims();
    x.sum_dims(&[1, 2, 3]).reshape([b])
}

/// The prior term L_T = KL(q(z_T | z_0) || N(0, I)) in nats per sample, summed over dimensions
/// (DDPM eq. 5; Luo eq. 58's "prior matching term"). 0 on a zero-terminal-SNR schedule.
///
/// # Shapes
/// - `z0`: `[batch, channels, height, width]`; result `[batch]`
pub fn prior_kl(schedule: &Schedule, z0: Tensor<4>) -> Tensor<1> {
    let [b, ..] = z0.dims();
    let q = q_mean_variance(schedule, z0, &vec![schedule.num_timesteps() - 1; b]);
    let zeros = q.mean.zeros_like();
    sum_per_sample(normal_kl(q.mean, q.log_variance, zeros.clone(), zeros))
}

/// One term of the variational bound in nats per sample, summed over dimensions (DDPM eq. 5;
/// Luo eqs. 58, 87-99). For each sample's index `t` (index t is the paper's step t + 1):
///
/// - `t >= 1`: L_t = KL(q(z_{t-1} | z_t, z_0) || p(z_{t-1} | z_t)), where p has the posterior
///   mean with x0 predicted from `eps_pred` and the variance of `variance`;
/// - `t = 0`: L_0 = -log p(z_0 | z_1) as a continuous Gaussian NLL (latents are continuous, so
///   there is no discretized decoder) with mean x0_hat and the same variance choice.
///
/// Variance choices: `Beta` is sigma_t^2 = beta_t for all t (DDPM section 3.2); `Posterior` is
/// betatilde_t, with betatilde_1 used at t = 0 where betatilde is 0 (Nichol & Dhariwal 2021).
///
/// Estimator: the negative ELBO of z_0 is `prior_kl + sum_{t=0}^{T-1} E_{z_t ~ q(z_t|z_0)}
/// vlb_term(t)`. Sum every t (T network calls per sample, exact in t), or use the unbiased
/// `prior_kl + T * vlb_term(t)` with t ~ U{0..T-1} and fresh noise per sample; either total
/// goes through [`nats_per_dim`] to compare latents of different sizes.
///
/// # Shapes
/// - `z0`, `z_t`, `eps_pred`: `[batch, channels, height, width]`; `t`: `batch` indices;
///   result `[batch]`
pub fn vlb_term(
    schedule: &Schedule,
    z0: Tensor<4>,
    z_t: Tensor<4>,
    t: &[usize],
    eps_pred: Tensor<4>,
    variance: DdpmVariance,
) -> Tensor<1> {
    let device = z0.device();
    let x0_hat = Parameterization::Epsilon.x0(schedule, z_t.clone(), eps_pred, t);
    let model_mean = q_posterior_mean_variance(schedule, x0_hat, z_t.clone(), t).mean;
    let model_log_var = per_sample(t, &device, |t| match variance {
        DdpmVariance::Beta => schedule.betas[t].ln(),
        DdpmVariance::Posterior => schedule.posterior_log_variance_clipped[t],
    });
    let q = q_posterior_mean_variance(schedule, z0.clone(), z_t, t);
    // Both terms are finite for every sample (the clipped log variance is finite at t = 0);
    // each sample keeps the one that belongs to its t.
    let kl = sum_per_sample(normal_kl(
        q.mean,
        q.log_variance,
        model_mean.clone(),
        model_log_var.clone(),
    ));
    let nll = sum_per_sample(gaussian_nll(z0, model_mean, model_log_var));
    let is_decoder = per_sample(t, &device, |t| if t == 0 { 1.0 } else { 0.0 }).reshape([t.len()]);
    nll * is_decoder.clone() + kl * (is_decoder.neg() + 1.0)
}

/// Nats per latent dimension: a per-sample total divided by `channels * height * width`.
pub fn nats_per_dim(total_nats: Tensor<1>, dims_per_sample: usize) -> Tensor<1> {
    total_nats / dims_per_sample as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::q_sample;
    use crate::schedule::ScheduleConfig;
    use ldm_common::config::parse_toml;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    fn linear() -> Schedule {
        Schedule::new(&ScheduleConfig::default()).unwrap()
    }

    #[test]
    fn kl_and_nll_match_hand_computed_values() {
        let d = Device::flex();
        let t = |v: f32| Tensor::<4>::from_floats([[[[v]]]], &d);
        // KL(N(1, 1) || N(0, 1)) = 0.5 (1 - 1 + 1) = 0.5
        let kl = to_vec_f32(normal_kl(t(1.0), t(0.0), t(0.0), t(0.0)))[0];
        assert!((kl - 0.5).abs() < 1e-6, "{kl}");
        // KL(N(0, 4) || N(1, 2)) = 0.5 (-1 + ln 2 - ln 4 + 2 + 1/2) = 0.5 (1.5 - ln 2)
        let kl = to_vec_f32(normal_kl(t(0.0), t(4f32.ln()), t(1.0), t(2f32.ln())))[0];
        assert!(
            (f64::from(kl) - 0.5 * (1.5 - 2f64.ln())).abs() < 1e-6,
            "{kl}"
        );
        // KL(p || p) = 0
        let kl = to_vec_f32(normal_kl(t(0.3), t(-1.0), t(0.3), t(-1.0)))[0];
        assert!(kl.abs() < 1e-7);
        // -log N(1; 0, 1) = 0.5 (ln 2 pi + 1) = 1.418938533
        let nll = to_vec_f32(gaussian_nll(t(1.0), t(0.0), t(0.0)))[0];
        assert!((nll - 1.418_938_5).abs() < 1e-6, "{nll}");
        // -log N(2; 1, e^2) = 0.5 (ln 2 pi + 2 + e^-2) = 1.986606175
        let nll = to_vec_f32(gaussian_nll(t(2.0), t(1.0), t(2.0)))[0];
        assert!((nll - 1.986_606_2).abs() < 1e-6, "{nll}");
    }

    #[test]
    fn prior_kl_vanishes_when_the_last_step_is_pure_noise() {
        let d = Device::flex();
        let z0 = randn(&mut stream(3, "loss-test", 0), [2, 4, 8, 8], &d);
        let zero = Schedule::new(&ScheduleConfig {
            rescale_zero_terminal_snr: true,
            ..ScheduleConfig::default()
        })
        .unwrap();
        let kl = to_vec_f32(prior_kl(&zero, z0.clone()));
        assert!(kl.iter().all(|k| k.abs() < 1e-6), "{kl:?}");
        // Linear: alphabar_T = 4.04e-5, so per dim 0.5 (ab z0^2 - ab - ln(1 - ab)) ~ 0.5 ab z0^2.
        let s = linear();
        let ab = s.alphas_cumprod[999];
        let per_dim = to_vec_f32(nats_per_dim(prior_kl(&s, z0.clone()), 256));
        let z2 = to_vec_f32(z0.powi_scalar(2).sum_dims(&[1, 2, 3]));
        for (k, z2) in per_dim.iter().zip(z2) {
            let e = 0.5 * (ab * f64::from(z2) - 256.0 * ab - 256.0 * (1.0 - ab).ln()) / 256.0;
            assert!((f64::from(*k) - e).abs() < 1e-7 && e < 1e-4, "{k} vs {e}");
        }
    }

    #[test]
    fn vlb_term_with_the_true_noise_leaves_only_the_variance_mismatch() {
        let d = Device::flex();
        let s = linear();
        let mut rng = stream(4, "loss-test", 0);
        let z0 = randn(&mut rng, [3, 2, 4, 4], &d);
        let eps = randn(&mut rng, [3, 2, 4, 4], &d);
        let t = [0, 10, 600];
        let z_t = q_sample(&s, z0.clone(), &t, eps.clone());
        let dims = 32.0;
        let term = |v| {
            to_vec_f32(vlb_term(&s, z0.clone(), z_t.clone(), &t, eps.clone(), v))
                .into_iter()
                .map(f64::from)
                .collect::<Vec<_>>()
        };
        let posterior = term(DdpmVariance::Posterior);
        let beta = term(DdpmVariance::Beta);
        let ln_2pi = (2.0 * std::f64::consts::PI).ln();
        // t = 0: x0_hat = z0, so the NLL is 0.5 (ln 2 pi + lv) per dim.
        let lv = s.posterior_log_variance_clipped[0];
        assert!(
            (posterior[0] - dims * 0.5 * (ln_2pi + lv)).abs() < 1e-2,
            "{posterior:?}"
        );
        let lv = s.betas[0].ln();
        assert!(
            (beta[0] - dims * 0.5 * (ln_2pi + lv)).abs() < 1e-2,
            "{beta:?}"
        );
        for (i, &t) in t.iter().enumerate().skip(1) {
            // Same means: the KL is 0 for the posterior variance, and
            // 0.5 (-1 + ln beta - ln betatilde + betatilde / beta) per dim for beta.
            assert!(posterior[i].abs() < 1e-3 * dims, "t={t}: {posterior:?}");
            let (b, bt) = (s.betas[t], s.posterior_variance[t]);
            let e = dims * 0.5 * (-1.0 + b.ln() - bt.ln() + bt / b);
            assert!(
                (beta[i] - e).abs() < 1e-3 * dims,
                "t={t}: {} vs {e}",
                beta[i]
            );
        }
        // A wrong eps costs nats: about 1.1 at t = 10 and 0.05 at t = 600 for eps / 2 here.
        let wrong = vlb_term(&s, z0.clone(), z_t, &t, eps * 0.5, DdpmVariance::Posterior);
        let wrong = to_vec_f32(wrong);
        assert!(wrong[1] > 0.3 && wrong[2] > 0.02, "{wrong:?}");
    }

    #[test]
    fn min_snr_weights_follow_hang_et_al() {
        let s = linear();
        let w = LossWeighting::MinSnr { gamma: 5.0 };
        for t in [0, 100, 300, 999] {
            let snr = s.snr[t];
            let m = snr.min(5.0);
            let close = |a: f64, b: f64| (a - b).abs() < 1e-12 * b.abs().max(1.0);
            assert!(close(w.weight(&s, Parameterization::Epsilon, t), m / snr));
            assert!(close(w.weight(&s, Parameterization::Sample, t), m));
            assert!(close(
                w.weight(&s, Parameterization::Velocity, t),
                m / (snr + 1.0)
            ));
            assert_eq!(
                LossWeighting::Simple {}.weight(&s, Parameterization::Velocity, t),
                1.0
            );
        }
        // Low t has SNR >> 5: eps weight 5 / SNR; high t has SNR << 5: eps weight 1.
        assert!(w.weight(&s, Parameterization::Epsilon, 0) < 1e-3);
        assert_eq!(w.weight(&s, Parameterization::Epsilon, 999), 1.0);
        let zero = Schedule::new(&ScheduleConfig {
            rescale_zero_terminal_snr: true,
            ..ScheduleConfig::default()
        })
        .unwrap();
        assert_eq!(w.weight(&zero, Parameterization::Epsilon, 999), 1.0);
        assert_eq!(w.weight(&zero, Parameterization::Velocity, 999), 0.0);
        let weights = w.weights(&s, Parameterization::Sample, &[0, 999], &Device::flex());
        let weights = to_vec_f32(weights);
        assert_eq!(weights[0], 5.0);
        assert!((f64::from(weights[1]) - s.snr[999]).abs() < 1e-9);
    }

    #[test]
    fn weighted_loss_is_the_weighted_mean_of_per_sample_mse() {
        let d = Device::flex();
        let out = Tensor::<4>::from_floats([[[[1.0, 3.0]]], [[[0.0, 0.0]]]], &d);
        let target = Tensor::<4>::from_floats([[[[0.0, 0.0]]], [[[2.0, 0.0]]]], &d);
        // per-sample MSE: 5 and 2; weights 1 and 0.5: (5 + 1) / 2 = 3
        let w = Tensor::<1>::from_floats([1.0, 0.5], &d);
        let loss = to_vec_f32(diffusion_loss(out, target, w));
        assert_eq!(loss.len(), 1);
        assert!((loss[0] - 3.0).abs() < 1e-6, "{loss:?}");
    }

    #[test]
    fn weighting_reads_from_toml() {
        #[derive(Deserialize)]
        struct C {
            loss: LossWeighting,
        }
        let read = |s: &str| parse_toml::<C>(s).map(|c| c.loss);
        assert_eq!(
            read("loss = { kind = \"simple\" }").unwrap(),
            LossWeighting::Simple {}
        );
        // a key that only min-snr has is refused, not dropped
        let e = read("loss = { kind = \"simple\", gamma = 5.0 }").unwrap_err();
        assert!(e.contains("gamma"), "{e}");
        assert_eq!(
            read("loss = { kind = \"min-snr\", gamma = 3.0 }").unwrap(),
            LossWeighting::MinSnr { gamma: 3.0 }
        );
        assert_eq!(
            read("[loss]\nkind = \"min-snr\"").unwrap(),
            LossWeighting::MinSnr { gamma: 5.0 }
        );
        let e = read("loss = { kind = \"max-snr\" }").unwrap_err();
        assert!(e.contains("simple") && e.contains("min-snr"), "{e}");
        let e = LossWeighting::MinSnr { gamma: -1.0 }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss.gamma = -1"), "{e}");
    }
}
