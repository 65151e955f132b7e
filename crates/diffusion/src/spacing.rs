//! Which of the T training timesteps a sampler visits (diffusers' `timestep_spacing`; compared in
//! Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2),
//! or the trained timesteps nearest Karras et al.'s noise levels (diffusers'
//! `use_karras_sigmas`).

use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result, parse_name};
use crate::schedule::Schedule;

/// rho of the Karras et al. 2022 noise levels (their eq. 5 and Table 1; k-diffusion's and
/// diffusers' value).
pub const KARRAS_RHO: f64 = 7.0;

/// How `steps` timesteps are picked from `0..T`. TOML: `"leading"`, `"trailing"`, `"linspace"`,
/// `"karras"`. The default is `trailing`: it always starts at T - 1, the only index spacing that
/// reaches the pure noise step of a zero-terminal-SNR schedule (Lin et al. 2024, section 3.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimestepSpacing {
    /// `(0..steps) * (T / steps)`, integer ratio: starts at 0, may stop short of T - 1 (DDIM).
    Leading,
    /// `round(T - i * T / steps) - 1`: ends at T - 1.
    #[default]
    Trailing,
    /// `round(linspace(0, T - 1, steps))`: both ends.
    Linspace,
    /// The trained timesteps nearest (in log sigma) to Karras et al.'s levels from sigma_max
    /// (t = T - 1) to sigma_min (t = 0), dense at low noise; see [`karras`].
    Karras,
}

impl TimestepSpacing {
    pub const ALL: [Self; 4] = [Self::Leading, Self::Trailing, Self::Linspace, Self::Karras];

    /// The config / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Leading => "leading",
            Self::Trailing => "trailing",
            Self::Linspace => "linspace",
            Self::Karras => "karras",
        }
    }
}

impl std::str::FromStr for TimestepSpacing {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        parse_name("sampler.spacing", s, &Self::ALL, Self::name)
    }
}

/// The timesteps of a `steps`-step sampler over `schedule`, descending, as diffusers computes
/// them (numpy's round-half-to-even included). `karras` may give fewer than `steps`
/// ([`karras`]); the others give exactly `steps`.
pub fn timesteps(
    schedule: &Schedule,
    steps: usize,
    spacing: TimestepSpacing,
) -> Result<Vec<usize>> {
    let num_train = schedule.num_timesteps();
    if steps == 0 || steps > num_train {
        return Err(DiffusionError::InvalidConfig {
            key: "steps".into(),
            value: steps.to_string(),
            expected: format!("between 1 and the {num_train} training timesteps"),
        });
    }
    let (t, n) = (num_train as f64, steps as f64);
    let mut ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => (0..steps).map(|i| i * (num_train / steps)).collect(),
        TimestepSpacing::Trailing => (0..steps)
            .map(|i| (t - i as f64 * (t / n)).round_ties_even() as usize - 1)
            .collect(),
        TimestepSpacing::Linspace if steps == 1 => vec![0],
        TimestepSpacing::Linspace => (0..steps)
            .map(|i| (i as f64 * (t - 1.0) / (n - 1.0)).round_ties_even() as usize)
            .collect(),
        TimestepSpacing::Karras => return Ok(karras(schedule, steps)),
    };
    ts.sort_unstable_by(|a, b| b.cmp(a));
    Ok(ts)
}

/// sigma_t = sqrt((1 - ab_t) / ab_t) of every trained timestep, ascending with t: the noise
/// level of z_t / sqrt(ab_t) (Karras et al. 2022, Table 1, VP column). Read through
/// [`Schedule::alpha_bar`], so a zero-terminal-SNR schedule ends at a finite sigma (4096).
pub fn sigmas(schedule: &Schedule) -> Vec<f64> {
    (0..schedule.num_timesteps())
        .map(|t| {
            let ab = schedule.alpha_bar(t);
            ((1.0 - ab) / ab).sqrt()
        })
        .collect()
}

/// Karras et al. 2022, eq. 5, on the discrete schedule as diffusers' `use_karras_sigmas` does:
/// sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
/// for i = 0..n, rho = 7, sigma_max = sigma_{T-1}, sigma_min = sigma_0; each sigma_i becomes
/// the fractional timestep interpolated linearly in log sigma (diffusers' `_sigma_to_t`),
/// rounded half to even (diffusers' DPM-Solver does the same), so every step runs the network
/// at a trained timestep and the sampler's level is exactly that timestep's. Levels crowd near
/// sigma_min: where two round to the same timestep the duplicate is dropped (T = 1000,
/// scaled-linear: 10 and 20 steps stay 10 and 20, 50 give 49, 100 give 95).
pub fn karras(schedule: &Schedule, steps: usize) -> Vec<usize> {
    let sigmas = sigmas(schedule);
    let log_sigmas: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
    let (max_inv, min_inv) = (
        sigmas[sigmas.len() - 1].powf(1.0 / KARRAS_RHO),
        sigmas[0].powf(1.0 / KARRAS_RHO),
    );
    let mut ts: Vec<usize> = (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            let sigma = (max_inv + ramp * (min_inv - max_inv)).powf(KARRAS_RHO);
            fractional_timestep(&log_sigmas, sigma.ln()).round_ties_even() as usize
        })
        .collect();
    ts.dedup();
    ts
}

/// The fractional timestep whose log sigma is `log_sigma`, by linear interpolation between the
/// two trained timesteps around it, clamped to `[0, T - 1]` (diffusers' `_sigma_to_t`). Where
/// the floor of [`Schedule::alpha_bar`] makes the last levels equal (cosine), the later one.
fn fractional_timestep(log_sigmas: &[f64], log_sigma: f64) -> f64 {
    let last = log_sigmas.len() - 1;
    let low = log_sigmas
        .iter()
        .rposition(|&l| l <= log_sigma)
        .unwrap_or(0)
        .min(last - 1);
    let (l0, l1) = (log_sigmas[low], log_sigmas[low + 1]);
    if l1 <= l0 {
        return if log_sigma >= l1 { low + 1 } else { low } as f64;
    }
    let w = ((log_sigma - l0) / (l1 - l0)).clamp(0.0, 1.0);
    low as f64 + w
}

/// The tail of `timesteps` for image-to-image (SDEdit, Meng et al. 2022): the last
/// `round_down(len * strength)` steps, so the sampler starts from a latent noised to
/// `timesteps[0]` of the result. `strength` 1 keeps every step.
pub fn for_strength(timesteps: &[usize], strength: f64) -> Result<Vec<usize>> {
    let keep = (timesteps.len() as f64 * strength).floor() as usize;
    if !(strength > 0.0 && strength <= 1.0) || keep == 0 {
        return Err(DiffusionError::InvalidConfig {
            key: "strength".into(),
            value: strength.to_string(),
            expected: format!(
                "a number in (0, 1] large enough to keep one of the {} steps",
                timesteps.len()
            ),
        });
    }
    Ok(timesteps[timesteps.len() - keep..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{BetaSchedule, ScheduleConfig};

    fn schedule(kind: BetaSchedule, num_timesteps: usize, zero_snr: bool) -> Schedule {
        Schedule::new(&ScheduleConfig {
            kind,
            num_timesteps,
            rescale_zero_terminal_snr: zero_snr,
            ..ScheduleConfig::default()
        })
        .unwrap()
    }

    fn linear(num_timesteps: usize) -> Schedule {
        schedule(BetaSchedule::Linear, num_timesteps, false)
    }

    #[test]
    fn diffusers_documented_values_for_1000_and_10() {
        // Lin et al. 2024, Table 2 (1-based there).
        assert_eq!(
            timesteps(&linear(1000), 10, TimestepSpacing::Leading).unwrap(),
            [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
        assert_eq!(
            timesteps(&linear(1000), 10, TimestepSpacing::Trailing).unwrap(),
            [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            timesteps(&linear(1000), 10, TimestepSpacing::Linspace).unwrap(),
            [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
    }

    #[test]
    fn uneven_ratios_round_like_numpy() {
        // np.round(np.arange(1000, 0, -1000 / 3)) - 1 = [999, 666, 332]
        assert_eq!(
            timesteps(&linear(1000), 3, TimestepSpacing::Trailing).unwrap(),
            [999, 666, 332]
        );
        // np.linspace(0, 999, 3).round() = [0, 500, 999] (499.5 rounds to even)
        assert_eq!(
            timesteps(&linear(1000), 3, TimestepSpacing::Linspace).unwrap(),
            [999, 500, 0]
        );
        assert_eq!(
            timesteps(&linear(1000), 3, TimestepSpacing::Leading).unwrap(),
            [666, 333, 0]
        );
        for spacing in [
            TimestepSpacing::Leading,
            TimestepSpacing::Trailing,
            TimestepSpacing::Linspace,
        ] {
            let all = timesteps(&linear(50), 50, spacing).unwrap();
            assert_eq!(all, (0..50).rev().collect::<Vec<_>>(), "{spacing:?}");
            assert_eq!(timesteps(&linear(50), 1, spacing).unwrap().len(), 1);
        }
    }

    /// diffusers 0.42.1 `DPMSolverMultistepScheduler(beta_schedule=..., use_karras_sigmas=True)`,
    /// `set_timesteps(n)`, `.timesteps` (which keeps the duplicate 1 at 50 steps).
    #[test]
    fn karras_matches_diffusers_and_drops_duplicates() {
        let scaled = schedule(BetaSchedule::ScaledLinear, 1000, false);
        let karras = |s: &Schedule, n| timesteps(s, n, TimestepSpacing::Karras).unwrap();
        assert_eq!(
            karras(&scaled, 10),
            [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]
        );
        assert_eq!(
            karras(&scaled, 20),
            [
                999, 962, 921, 876, 827, 772, 710, 640, 561, 474, 380, 285, 197, 123, 69, 35, 15,
                6, 2, 0
            ]
        );
        let fifty = karras(&scaled, 50);
        assert_eq!(fifty.len(), 49);
        assert_eq!(fifty[..6], [999, 985, 970, 955, 940, 924]);
        assert_eq!(fifty[40..], [23, 17, 12, 8, 6, 4, 2, 1, 0]);
        assert_eq!(
            karras(&linear(1000), 10),
            [999, 937, 864, 775, 663, 511, 301, 102, 18, 0]
        );
        assert_eq!(karras(&scaled, 1), [999]);
        assert_eq!(karras(&scaled, 2), [999, 0]);
    }

    /// Where the floor of alpha_bar makes the top levels equal (cosine) or stands in for
    /// alphabar = 0 (zero terminal SNR), Karras still starts at T - 1, ends at 0, descends.
    #[test]
    fn karras_on_floored_schedules_starts_at_the_last_timestep() {
        for s in [
            schedule(BetaSchedule::Cosine, 1000, false),
            schedule(BetaSchedule::ScaledLinear, 1000, true),
            schedule(BetaSchedule::Linear, 50, false),
        ] {
            let sigmas = sigmas(&s);
            assert!(sigmas.iter().all(|x| x.is_finite()));
            for n in [1, 2, 10, 50] {
                let ts = timesteps(&s, n, TimestepSpacing::Karras).unwrap();
                assert_eq!(ts[0], s.num_timesteps() - 1, "{n}: {ts:?}");
                assert!(n == 1 || *ts.last().unwrap() == 0, "{n}: {ts:?}");
                assert!(ts.windows(2).all(|w| w[0] > w[1]), "{n}: {ts:?}");
                assert!(ts.len() <= n);
            }
        }
        // With T = 50, 50 Karras levels land on fewer distinct timesteps.
        let all = timesteps(&linear(50), 50, TimestepSpacing::Karras).unwrap();
        assert!(all.len() < 50, "{all:?}");
    }

    #[test]
    fn zero_and_too_many_steps_are_rejected_naming_the_range() {
        for steps in [0, 1001] {
            let e = timesteps(&linear(1000), steps, TimestepSpacing::Leading)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("steps = {steps}")) && e.contains("between 1 and the 1000"),
                "{e}"
            );
        }
    }

    #[test]
    fn strength_keeps_the_tail() {
        let ts = timesteps(&linear(1000), 10, TimestepSpacing::Trailing).unwrap();
        assert_eq!(for_strength(&ts, 0.35).unwrap(), [299, 199, 99]);
        assert_eq!(for_strength(&ts, 1.0).unwrap(), ts);
        for bad in [0.0, 0.05, 1.5, f64::NAN] {
            let e = for_strength(&ts, bad).unwrap_err().to_string();
            assert!(e.starts_with("strength = "), "{e}");
        }
    }
}
