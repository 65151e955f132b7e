//! Clipping the predicted clean latent (iDDPM's `clip_denoised`, diffusers' `clip_sample`), and
//! the warning for the sampling start where an epsilon model needs it.
//!
//! An epsilon model's clean-latent estimate x0 = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
//! multiplies the network's error by 1 / sqrt(ab_t). On the cosine schedule (betas clipped at
//! 0.999) ab_999 = 2.4e-9: a sampler that starts at t = 999 (trailing spacing) multiplies the
//! error by 20,000, and the first step lands far outside the data. Clipping x0 to the data's
//! range bounds that step (Nichol & Dhariwal 2021 clip to [-1, 1] in pixel space; latents
//! scaled to unit variance need a wider range, such as 3 or 4).

use burn::prelude::*;

use crate::denoiser::Denoiser;
use crate::parameterization::{Parameterization, eps_to_x0};
use crate::sampler::SamplerOptions;
use crate::schedule::Schedule;

/// Below this alphabar at the first sampled step, an unclipped epsilon model's x0 estimate
/// amplifies the network's error more than 1000-fold (1 / sqrt(1e-6)).
pub const ILL_CONDITIONED_ALPHA_BAR: f64 = 1e-6;

/// A denoiser whose implied x0 is clipped to `[-range, range]`:
/// x0_c = clamp(x0, -c, c),  eps' = (z_t - sqrt(ab_t) x0_c) / sqrt(1 - ab_t)
///      = eps + sqrt(ab_t) (x0 - x0_c) / sqrt(1 - ab_t),
/// written in the second form so that where nothing is clipped eps passes through unchanged.
pub struct ClipX0<'a, D: Denoiser + ?Sized> {
    pub inner: &'a D,
    pub schedule: &'a Schedule,
    pub range: f64,
}

impl<D: Denoiser + ?Sized> Denoiser for ClipX0<'_, D> {
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4> {
        let eps = self.inner.predict_eps(z_t.clone(), t);
        let x0 = eps_to_x0(self.schedule, z_t, eps.clone(), t);
        let clipped = x0.clone().clamp(-self.range, self.range);
        let ab = self.schedule.alpha_bar(t);
        eps + (x0 - clipped) * (ab.sqrt() / (1.0 - ab).sqrt())
    }
}

/// A one-line warning when an epsilon model would start sampling where its x0 estimate is
/// ill-conditioned (alphabar at the first timestep of `options` below
/// [`ILL_CONDITIONED_ALPHA_BAR`]) without `sampler.clip_x0`; `None` otherwise (also when the
/// options name no valid timesteps: their own check reports that).
pub fn ill_conditioned_start_warning(
    parameterization: Parameterization,
    schedule: &Schedule,
    options: &SamplerOptions,
) -> Option<String> {
    let first = *options.timesteps(schedule).ok()?.first()?;
    let ab = schedule.alpha_bar(first);
    if parameterization != Parameterization::Epsilon
        || options.clip_x0.is_some()
        || ab >= ILL_CONDITIONED_ALPHA_BAR
    {
        return None;
    }
    Some(format!(
        "warning: an epsilon model starting at t = {first}, where alphas_cumprod = {ab:.1e}, \
         multiplies its error by {:.0} in the first x0 estimate; samples are likely noise. \
         Use --spacing leading (sampler.spacing = \"leading\") or --clip-x0 3 (sampler.clip_x0 = 3)",
        1.0 / ab.sqrt()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{BetaSchedule, ScheduleConfig};
    use crate::spacing::TimestepSpacing;
    use ldm_common::tensor::to_vec_f32;

    fn schedule(kind: BetaSchedule) -> Schedule {
        Schedule::new(&ScheduleConfig {
            kind,
            ..ScheduleConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn clipping_bounds_x0_and_leaves_eps_alone_where_x0_is_inside() {
        let device = Device::flex();
        let schedule = schedule(BetaSchedule::Linear);
        // An "error" eps: at t = 999 the x0 estimate of the second element is far outside [-3, 3].
        let inner =
            |z: Tensor<4>, _t: usize| z * 0.0 + Tensor::from_floats([[[[0.0, 0.5]]]], &device);
        let clip = ClipX0 {
            inner: &inner,
            schedule: &schedule,
            range: 3.0,
        };
        let t = 999;
        let ab = schedule.alpha_bar(t);
        let z = Tensor::<4>::from_floats([[[[0.01 * ab.sqrt() as f32, 0.0]]]], &device);
        let eps = clip.predict_eps(z.clone(), t);
        let x0 = to_vec_f32(eps_to_x0(&schedule, z, eps.clone(), t));
        let eps = to_vec_f32(eps);
        // inside: eps unchanged (x0 = 0.01)
        assert_eq!(eps[0], 0.0);
        assert!((x0[0] - 0.01).abs() < 1e-4, "{x0:?}");
        // outside: x0 = -0.5 sqrt(1 - ab) / sqrt(ab) ~ -79 clipped to -3, in closed form
        // eps' = (0 - sqrt(ab) (-3)) / sqrt(1 - ab)
        let expected = 3.0 * ab.sqrt() / (1.0 - ab).sqrt();
        assert!(
            (f64::from(eps[1]) - expected).abs() < 1e-6,
            "{} vs {expected}",
            eps[1]
        );
        assert!((x0[1] + 3.0).abs() < 1e-3, "{x0:?}");
    }

    #[test]
    fn warns_for_epsilon_on_cosine_from_t_999_only() {
        let options = |spacing, clip_x0| SamplerOptions {
            spacing,
            clip_x0,
            ..SamplerOptions::default()
        };
        let cosine = schedule(BetaSchedule::Cosine);
        let trailing = options(TimestepSpacing::Trailing, None);
        let line = ill_conditioned_start_warning(Parameterization::Epsilon, &cosine, &trailing)
            .expect("cosine + epsilon + trailing warns");
        assert!(
            line.contains("t = 999") && line.contains("--spacing leading"),
            "{line}"
        );
        // leading starts at 980, where alphabar is about 1e-3: fine; so are clipping, v and x0 models.
        let leading = options(TimestepSpacing::Leading, None);
        let none = |p, o: &SamplerOptions| ill_conditioned_start_warning(p, &cosine, o).is_none();
        assert!(none(Parameterization::Epsilon, &leading));
        assert!(none(
            Parameterization::Epsilon,
            &options(TimestepSpacing::Trailing, Some(3.0))
        ));
        assert!(none(Parameterization::Velocity, &trailing));
        assert!(none(Parameterization::Sample, &trailing));
        // the linear schedule's alphabar_999 = 4.0e-5 works in practice (the default recipes)
        let linear = schedule(BetaSchedule::Linear);
        assert!(
            ill_conditioned_start_warning(Parameterization::Epsilon, &linear, &trailing).is_none()
        );
    }
}
