//! Which of the T training timesteps a sampler visits (diffusers' `timestep_spacing`; compared in
//! Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2).

use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result, parse_name};

/// How `steps` timesteps are picked from `0..T`. TOML: `"leading"`, `"trailing"`, `"linspace"`.
/// The default is `trailing`: it always starts at T - 1, the only spacing that reaches the pure
/// noise step of a zero-terminal-SNR schedule (Lin et al. 2024, section 3.3).
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
}

impl TimestepSpacing {
    pub const ALL: [Self; 3] = [Self::Leading, Self::Trailing, Self::Linspace];

    /// The config / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Leading => "leading",
            Self::Trailing => "trailing",
            Self::Linspace => "linspace",
        }
    }
}

impl std::str::FromStr for TimestepSpacing {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        parse_name("sampler.spacing", s, &Self::ALL, Self::name)
    }
}

/// The timesteps of a `steps`-step sampler over a `num_train`-step schedule, descending, as
/// diffusers computes them (numpy's round-half-to-even included).
pub fn timesteps(num_train: usize, steps: usize, spacing: TimestepSpacing) -> Result<Vec<usize>> {
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
    };
    ts.sort_unstable_by(|a, b| b.cmp(a));
    Ok(ts)
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

    #[test]
    fn diffusers_documented_values_for_1000_and_10() {
        // Lin et al. 2024, Table 2 (1-based there).
        assert_eq!(
            timesteps(1000, 10, TimestepSpacing::Leading).unwrap(),
            [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
        assert_eq!(
            timesteps(1000, 10, TimestepSpacing::Trailing).unwrap(),
            [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            timesteps(1000, 10, TimestepSpacing::Linspace).unwrap(),
            [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
    }

    #[test]
    fn uneven_ratios_round_like_numpy() {
        // np.round(np.arange(1000, 0, -1000 / 3)) - 1 = [999, 666, 332]
        assert_eq!(
            timesteps(1000, 3, TimestepSpacing::Trailing).unwrap(),
            [999, 666, 332]
        );
        // np.linspace(0, 999, 3).round() = [0, 500, 999] (499.5 rounds to even)
        assert_eq!(
            timesteps(1000, 3, TimestepSpacing::Linspace).unwrap(),
            [999, 500, 0]
        );
        assert_eq!(
            timesteps(1000, 3, TimestepSpacing::Leading).unwrap(),
            [666, 333, 0]
        );
        for spacing in [
            TimestepSpacing::Leading,
            TimestepSpacing::Trailing,
            TimestepSpacing::Linspace,
        ] {
            let all = timesteps(50, 50, spacing).unwrap();
            assert_eq!(all, (0..50).rev().collect::<Vec<_>>(), "{spacing:?}");
            assert_eq!(timesteps(50, 1, spacing).unwrap().len(), 1);
        }
    }

    #[test]
    fn zero_and_too_many_steps_are_rejected_naming_the_range() {
        for steps in [0, 1001] {
            let e = timesteps(1000, steps, TimestepSpacing::Leading)
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
        let ts = timesteps(1000, 10, TimestepSpacing::Trailing).unwrap();
        assert_eq!(for_strength(&ts, 0.35).unwrap(), [299, 199, 99]);
        assert_eq!(for_strength(&ts, 1.0).unwrap(), ts);
        for bad in [0.0, 0.05, 1.5, f64::NAN] {
            let e = for_strength(&ts, bad).unwrap_err().to_string();
            assert!(e.starts_with("strength = "), "{e}");
        }
    }
}
