//! The variance schedule beta_1..beta_T of the forward process and every quantity derived from
//! it (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", sections 2 and 4).
//!
//! Index convention (as in diffusers and guided-diffusion): timestep index `t` runs over
//! `0..T` and stands for the paper's step `t + 1`, so `alphas_cumprod[t]` is
//! alphabar_{t+1} = prod_{s <= t} (1 - beta_s) and the clean data sits "before" index 0
//! (`alphas_cumprod_prev[0] = 1`).
//!
//! A schedule is plain `f64` data on the host: no module, no parameter, no device.

use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};

/// Lower bound applied to alphabar_t wherever a formula divides by sqrt(alphabar_t) (see
/// [`Schedule::alpha_bar`]). 2^-24 is the value diffusers substitutes for the zero terminal
/// alphabar of Lin et al. 2024; it caps the noise level at sigma = sqrt((1 - ab) / ab) ~ 4096.
pub const ALPHA_BAR_MIN: f64 = 1.0 / 16_777_216.0;

/// How beta_t grows with t.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// beta_t linear in t, 1e-4 to 0.02 by default (Ho et al. 2020, section 4).
    #[default]
    Linear,
    /// alphabar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008, beta clipped at 0.999
    /// (Nichol & Dhariwal 2021, eq. 17).
    Cosine,
    /// sqrt(beta_t) linear in t, 0.00085 to 0.012 by default (Rombach et al. 2022, Stable
    /// Diffusion's "scaled_linear").
    ScaledLinear,
}

impl BetaSchedule {
    /// The default (beta_start, beta_end) of the linear kinds; `None` for the cosine schedule.
    pub fn default_beta_range(self) -> Option<(f64, f64)> {
        match self {
            Self::Linear => Some((1e-4, 0.02)),
            Self::ScaledLinear => Some((0.00085, 0.012)),
            Self::Cosine => None,
        }
    }
}

/// The `[schedule]` config. TOML: `kind = "linear" | "cosine" | "scaled-linear"`,
/// `num_timesteps`, optional `beta_start` / `beta_end`, `rescale_zero_terminal_snr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: BetaSchedule,
    /// T, the number of forward steps.
    pub num_timesteps: usize,
    /// First beta of a linear kind (overrides the kind's default; not used by `cosine`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    /// Last beta of a linear kind (overrides the kind's default; not used by `cosine`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    /// Rescale so that alphabar_{T} = 0, i.e. the last step is pure noise (Lin et al. 2024,
    /// "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1). Pair it
    /// with v- or x0-prediction and trailing timestep spacing.
    pub rescale_zero_terminal_snr: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: BetaSchedule::Linear,
            num_timesteps: 1000,
            beta_start: None,
            beta_end: None,
            rescale_zero_terminal_snr: false,
        }
    }
}

/// beta_t and its derived quantities, one entry per timestep index `0..T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub betas: Vec<f64>,
    /// alpha_t = 1 - beta_t
    pub alphas: Vec<f64>,
    /// alphabar_t = prod_{s <= t} alpha_s
    pub alphas_cumprod: Vec<f64>,
    /// alphabar_{t-1}, with alphabar_{-1} = 1 (the data)
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// SNR(t) = alphabar_t / (1 - alphabar_t)  (Kingma et al. 2021, eq. 2; Luo eq. 107)
    pub snr: Vec<f64>,
    /// betatilde_t = (1 - alphabar_{t-1}) / (1 - alphabar_t) beta_t  (DDPM eq. 7); 0 at t = 0
    pub posterior_variance: Vec<f64>,
    /// log betatilde_t with the t = 0 entry replaced by betatilde_1, so it stays finite
    /// (Nichol & Dhariwal 2021, as in their code)
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of z_0 in the posterior mean: sqrt(alphabar_{t-1}) beta_t / (1 - alphabar_t)
    /// (DDPM eq. 7)
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of z_t in the posterior mean: sqrt(alpha_t) (1 - alphabar_{t-1}) /
    /// (1 - alphabar_t)  (DDPM eq. 7)
    pub posterior_mean_coef2: Vec<f64>,
}

impl Schedule {
    /// Builds the schedule of a config, validating every key.
    pub fn new(config: &ScheduleConfig) -> Result<Self> {
        let t = config.num_timesteps;
        if t < 2 {
            return Err(invalid("schedule.num_timesteps", t, "at least 2 timesteps"));
        }
        let betas = match config.kind.default_beta_range() {
            Some((default_start, default_end)) => {
                let start = config.beta_start.unwrap_or(default_start);
                let end = config.beta_end.unwrap_or(default_end);
                for (key, beta) in [("schedule.beta_start", start), ("schedule.beta_end", end)] {
                    if !(beta > 0.0 && beta < 1.0) {
                        return Err(invalid(key, beta, "a number with 0 < beta < 1"));
                    }
                }
                if start > end {
                    return Err(invalid(
                        "schedule.beta_start",
                        start,
                        &format!("at most schedule.beta_end = {end}"),
                    ));
                }
                if config.kind == BetaSchedule::ScaledLinear {
                    scaled_linear_betas(start, end, t)
                } else {
                    linear_betas(start, end, t)
                }
            }
            None => {
                for (key, value) in [
                    ("schedule.beta_start", config.beta_start),
                    ("schedule.beta_end", config.beta_end),
                ] {
                    if let Some(v) = value {
                        return Err(invalid(
                            key,
                            v,
                            "not used by kind = \"cosine\" (remove the key)",
                        ));
                    }
                }
                cosine_betas(t)
            }
        };
        let betas = if config.rescale_zero_terminal_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        Ok(Self::from_betas(betas))
    }

    /// Derives every quantity from beta_0..beta_{T-1} (each in (0, 1], the last may be 1).
    fn from_betas(betas: Vec<f64>) -> Self {
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..alphas_cumprod.len() - 1].iter().copied())
            .collect();
        let sqrt_alphas_cumprod = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let sqrt_one_minus_alphas_cumprod =
            alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect();
        // 1 - alphabar_t >= beta_0 > 0, so none of these divide by zero.
        let snr = alphas_cumprod.iter().map(|a| a / (1.0 - a)).collect();
        let n = betas.len();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t]))
            .collect();
        let posterior_log_variance_clipped =
            (0..n).map(|t| posterior_variance[t.max(1)].ln()).collect();
        let posterior_mean_coef1 = (0..n)
            .map(|t| betas[t] * alphas_cumprod_prev[t].sqrt() / (1.0 - alphas_cumprod[t]))
            .collect();
        let posterior_mean_coef2 = (0..n)
            .map(|t| (1.0 - alphas_cumprod_prev[t]) * alphas[t].sqrt() / (1.0 - alphas_cumprod[t]))
            .collect();
        Self {
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
            snr,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        }
    }

    /// T, the number of timesteps.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// alphabar_t floored at [`ALPHA_BAR_MIN`]: the value every conversion between eps, x0, v
    /// and score, and every sampler, uses. It differs from `alphas_cumprod[t]` only where that is
    /// below 2^-24: the last step of a zero-terminal-SNR schedule (exactly 0, where
    /// x0 = (z - sqrt(1 - ab) eps) / sqrt(ab) would divide by zero) and the last step or two of
    /// steep schedules (cosine: ~2.4e-9). The forward process ([`crate::process`]) and the
    /// variational bound use the exact values.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t].max(ALPHA_BAR_MIN)
    }

    /// The table as CSV, one row per timestep index. `log_snr` is `-inf` where alphabar is 0.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "t,beta,alpha,alphas_cumprod,sqrt_alphas_cumprod,sqrt_one_minus_alphas_cumprod,snr,\
             log_snr,posterior_variance,posterior_mean_coef1,posterior_mean_coef2\n",
        );
        for t in 0..self.num_timesteps() {
            out.push_str(&format!(
                "{t},{},{},{},{},{},{},{},{},{},{}\n",
                self.betas[t],
                self.alphas[t],
                self.alphas_cumprod[t],
                self.sqrt_alphas_cumprod[t],
                self.sqrt_one_minus_alphas_cumprod[t],
                self.snr[t],
                self.snr[t].ln(),
                self.posterior_variance[t],
                self.posterior_mean_coef1[t],
                self.posterior_mean_coef2[t],
            ));
        }
        out
    }
}

fn invalid(key: &str, value: impl ToString, expected: &str) -> DiffusionError {
    DiffusionError::InvalidConfig {
        key: key.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// beta_t = beta_start + (beta_end - beta_start) t / (T - 1)  (Ho et al. 2020, section 4)
fn linear_betas(start: f64, end: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| start + (end - start) * i as f64 / (n - 1) as f64)
        .collect()
}

/// beta_t = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) t / (T - 1))^2
/// (Stable Diffusion's "scaled_linear")
fn scaled_linear_betas(start: f64, end: f64, n: usize) -> Vec<f64> {
    linear_betas(start.sqrt(), end.sqrt(), n)
        .into_iter()
        .map(|b| b * b)
        .collect()
}

/// beta_t = min(1 - f((t + 1) / T) / f(t / T), 0.999), f(u) = cos^2((u + s) / (1 + s) pi / 2),
/// s = 0.008  (Nichol & Dhariwal 2021, eq. 17 and the clipping of section 3.2)
fn cosine_betas(n: usize) -> Vec<f64> {
    const S: f64 = 0.008;
    const MAX_BETA: f64 = 0.999;
    let f = |u: f64| {
        ((u + S) / (1.0 + S) * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (u1, u2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - f(u2) / f(u1)).min(MAX_BETA)
        })
        .collect()
}

/// Shifts and scales sqrt(alphabar) so that sqrt(alphabar_T) = 0 while sqrt(alphabar_1) is kept
/// (Lin et al. 2024, Algorithm 1). The last beta becomes exactly 1.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut sqrt_ab: Vec<f64> = betas
        .iter()
        .scan(1.0, |acc, b| {
            *acc *= 1.0 - b;
            Some(acc.sqrt())
        })
        .collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    for v in &mut sqrt_ab {
        *v = (*v - last) * first / (first - last);
    }
    let ab: Vec<f64> = sqrt_ab.iter().map(|v| v * v).collect();
    std::iter::once(1.0 - ab[0])
        .chain(ab.windows(2).map(|w| 1.0 - w[1] / w[0]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldm_common::config::parse_toml;

    fn schedule(kind: BetaSchedule, zero_snr: bool) -> Schedule {
        Schedule::new(&ScheduleConfig {
            kind,
            rescale_zero_terminal_snr: zero_snr,
            ..ScheduleConfig::default()
        })
        .unwrap()
    }

    fn assert_close(actual: f64, expected: f64, rel: f64, what: &str) {
        let tol = rel * expected.abs().max(1e-300);
        assert!(
            (actual - expected).abs() <= tol,
            "{what}: {actual:e} vs {expected:e} (rel tol {rel:e})"
        );
    }

    // Reference values: `python3 scripts/fixtures/schedule_reference.py` (plain `math`).
    const REFERENCE_T: [usize; 5] = [0, 1, 250, 500, 999];

    #[test]
    fn alphas_cumprod_match_the_reference_script() {
        let cases: [(BetaSchedule, bool, [f64; 5]); 4] = [
            (
                BetaSchedule::Linear,
                false,
                [
                    0.9999,
                    0.9997800920720721,
                    0.5214230306185275,
                    0.07779665836502389,
                    4.035829765375676e-05,
                ],
            ),
            (
                BetaSchedule::ScaledLinear,
                false,
                [
                    0.99915,
                    0.9982960278384514,
                    0.6737926252333215,
                    0.2763326838229746,
                    0.004660098513077238,
                ],
            ),
            (
                BetaSchedule::Cosine,
                false,
                [
                    0.999958715775178,
                    0.9999125759273678,
                    0.8458879864968832,
                    0.49228517244880304,
                    2.4287669070348567e-09,
                ],
            ),
            (
                BetaSchedule::Linear,
                true,
                [
                    0.9999,
                    0.9997793254331531,
                    0.5188605367916812,
                    0.0752462157043267,
                    0.0,
                ],
            ),
        ];
        for (kind, zero_snr, expected) in cases {
            let s = schedule(kind, zero_snr);
            for (&t, &e) in REFERENCE_T.iter().zip(&expected) {
                let what = format!("{kind:?} zero_snr={zero_snr} alphas_cumprod[{t}]");
                if e == 0.0 {
                    assert_eq!(s.alphas_cumprod[t], 0.0, "{what}");
                } else {
                    assert_close(s.alphas_cumprod[t], e, 1e-12, &what);
                }
            }
        }
    }

    #[test]
    fn posterior_quantities_match_the_reference_script() {
        let s = schedule(BetaSchedule::Linear, false);
        // t = 1, 500, 999
        let variance = [
            5.4531876613021935e-05,
            0.010051335778909593,
            0.01999998352656061,
        ];
        let coef1 = [
            0.5452914995102903,
            0.003058057075629619,
            0.00012835148717224682,
        ];
        let coef2 = [0.4547084989905303, 0.9941043507567258, 0.9899486782675173];
        for (i, t) in [1, 500, 999].into_iter().enumerate() {
            assert_close(s.posterior_variance[t], variance[i], 1e-12, "variance");
            assert_close(s.posterior_mean_coef1[t], coef1[i], 1e-12, "coef1");
            assert_close(s.posterior_mean_coef2[t], coef2[i], 1e-12, "coef2");
        }
    }

    #[test]
    fn invariants_hold_for_every_kind() {
        for kind in [
            BetaSchedule::Linear,
            BetaSchedule::Cosine,
            BetaSchedule::ScaledLinear,
        ] {
            for zero_snr in [false, true] {
                let s = schedule(kind, zero_snr);
                let what = format!("{kind:?} zero_snr={zero_snr}");
                assert_eq!(s.num_timesteps(), 1000);
                assert!(s.alphas_cumprod[0] < 1.0, "{what}");
                for t in 1..1000 {
                    assert!(
                        s.alphas_cumprod[t] < s.alphas_cumprod[t - 1],
                        "{what} t={t}"
                    );
                    assert!(s.posterior_variance[t] > 0.0, "{what} t={t}");
                    assert!(s.posterior_log_variance_clipped[t].is_finite(), "{what}");
                    assert!(s.snr[t] < s.snr[t - 1], "{what} t={t}");
                }
                assert_eq!(s.posterior_variance[0], 0.0, "{what}");
                assert!(s.posterior_log_variance_clipped[0].is_finite());
                for t in 0..1000 {
                    assert!(s.betas[t] > 0.0 && s.betas[t] <= 1.0, "{what} t={t}");
                    let ab = s.alphas_cumprod[t];
                    assert_close(s.sqrt_alphas_cumprod[t].powi(2), ab, 1e-12, &what);
                    assert_close(
                        s.sqrt_one_minus_alphas_cumprod[t].powi(2),
                        1.0 - ab,
                        1e-12,
                        &what,
                    );
                    assert!(s.alpha_bar(t) >= ALPHA_BAR_MIN);
                }
            }
        }
    }

    #[test]
    fn zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_step() {
        for kind in [
            BetaSchedule::Linear,
            BetaSchedule::Cosine,
            BetaSchedule::ScaledLinear,
        ] {
            let plain = schedule(kind, false);
            let zero = schedule(kind, true);
            assert_eq!(zero.alphas_cumprod[999], 0.0);
            assert_eq!(zero.sqrt_alphas_cumprod[999], 0.0);
            assert_eq!(zero.snr[999], 0.0);
            assert_eq!(zero.betas[999], 1.0);
            assert_eq!(zero.alpha_bar(999), ALPHA_BAR_MIN);
            assert_close(
                zero.sqrt_alphas_cumprod[0],
                plain.sqrt_alphas_cumprod[0],
                1e-14,
                "sqrt_alphas_cumprod[0]",
            );
            assert!(zero.to_csv().lines().last().unwrap().contains("-inf"));
        }
    }

    #[test]
    fn posterior_coefficients_are_the_product_of_gaussians() {
        // q(z_{t-1} | z_t, z_0) ∝ q(z_t | z_{t-1}) q(z_{t-1} | z_0): a product of
        // N(z_t; sqrt(a_t) z_{t-1}, b_t) and N(z_{t-1}; sqrt(ab_{t-1}) z_0, 1 - ab_{t-1}).
        let s = schedule(BetaSchedule::Cosine, false);
        let (z0, zt) = (0.7, -1.3);
        for t in [1, 10, 400, 998] {
            let (a, b, abp) = (s.alphas[t], s.betas[t], s.alphas_cumprod_prev[t]);
            let precision = a / b + 1.0 / (1.0 - abp);
            let mean = (a.sqrt() * zt / b + abp.sqrt() * z0 / (1.0 - abp)) / precision;
            let from_coefs = s.posterior_mean_coef1[t] * z0 + s.posterior_mean_coef2[t] * zt;
            assert_close(from_coefs, mean, 1e-10, "posterior mean");
            assert_close(
                s.posterior_variance[t],
                1.0 / precision,
                1e-10,
                "posterior var",
            );
        }
    }

    #[test]
    fn csv_has_the_documented_header_and_one_row_per_step() {
        let s = Schedule::new(&ScheduleConfig {
            num_timesteps: 4,
            ..ScheduleConfig::default()
        })
        .unwrap();
        let csv = s.to_csv();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next().unwrap(),
            "t,beta,alpha,alphas_cumprod,sqrt_alphas_cumprod,sqrt_one_minus_alphas_cumprod,snr,\
             log_snr,posterior_variance,posterior_mean_coef1,posterior_mean_coef2"
        );
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), 4);
        assert!(rows[0].starts_with("0,0.0001,0.9999,0.9999,"));
        assert_eq!(rows[3].split(',').count(), 11);
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let err = |cfg: ScheduleConfig| Schedule::new(&cfg).unwrap_err().to_string();
        let base = ScheduleConfig::default();
        let e = err(ScheduleConfig {
            num_timesteps: 1,
            ..base.clone()
        });
        assert!(e.contains("schedule.num_timesteps = 1"), "{e}");
        let e = err(ScheduleConfig {
            beta_end: Some(1.5),
            ..base.clone()
        });
        assert!(e.contains("schedule.beta_end = 1.5"), "{e}");
        let e = err(ScheduleConfig {
            beta_start: Some(0.0),
            ..base.clone()
        });
        assert!(e.contains("schedule.beta_start = 0"), "{e}");
        let e = err(ScheduleConfig {
            beta_start: Some(0.1),
            beta_end: Some(0.01),
            ..base.clone()
        });
        assert!(
            e.contains("schedule.beta_start") && e.contains("beta_end"),
            "{e}"
        );
        let e = err(ScheduleConfig {
            kind: BetaSchedule::Cosine,
            beta_start: Some(0.001),
            ..base
        });
        assert!(
            e.contains("schedule.beta_start") && e.contains("cosine"),
            "{e}"
        );
    }

    #[test]
    fn config_reads_from_toml_with_defaults() {
        let c: ScheduleConfig = parse_toml("kind = \"scaled-linear\"\nbeta_end = 0.015").unwrap();
        assert_eq!(c.kind, BetaSchedule::ScaledLinear);
        assert_eq!(c.num_timesteps, 1000);
        assert_eq!(c.beta_end, Some(0.015));
        assert!(!c.rescale_zero_terminal_snr);
        let e = parse_toml::<ScheduleConfig>("kind = \"quadratic\"").unwrap_err();
        assert!(
            e.contains("linear") && e.contains("cosine") && e.contains("scaled-linear"),
            "{e}"
        );
        let e = parse_toml::<ScheduleConfig>("num_timestep = 10").unwrap_err();
        assert!(e.contains("num_timestep"), "{e}");
        let round_trip: ScheduleConfig = parse_toml(&ldm_common::config::to_toml(&c)).unwrap();
        assert_eq!(round_trip, c);
    }
}
