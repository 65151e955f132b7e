//! What the network predicts: the noise eps (Ho et al. 2020), the clean latent x0, or the
//! velocity v = sqrt(alphabar) eps - sqrt(1 - alphabar) x0 (Salimans & Ho 2022, "Progressive
//! Distillation", section 4), and the exact conversions between them and the score (Luo 2022,
//! eqs. 131-151).
//!
//! With z_t = a z_0 + s eps, a = sqrt(alphabar_t), s = sqrt(1 - alphabar_t):
//!
//! | output | eps                | x0                 |
//! |--------|--------------------|--------------------|
//! | eps    | eps                | (z_t - s eps) / a  |
//! | x0     | (z_t - a x0) / s   | x0                 |
//! | v      | s z_t + a v        | a z_t - s v        |
//!
//! All conversions read alphabar_t through [`Schedule::alpha_bar`] (floored at 2^-24), so they
//! stay finite on a zero-terminal-SNR schedule; x0 from eps is still ill-conditioned there, which
//! is why [`Parameterization::check_schedule`] rejects epsilon prediction with it.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};
use crate::process::per_sample;
use crate::schedule::{Schedule, ScheduleConfig};

/// The quantity a backbone is trained to output. TOML: `"epsilon"`, `"sample"` (alias `"x0"`)
/// or `"v"` (alias `"v_prediction"`), diffusers' `prediction_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Parameterization {
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "sample", alias = "x0")]
    Sample,
    #[serde(rename = "v", alias = "v_prediction")]
    Velocity,
}

/// sqrt(alphabar_t) and sqrt(1 - alphabar_t) per sample, `[batch, 1, 1, 1]` each.
fn coefficients(schedule: &Schedule, t: &[usize], device: &Device) -> (Tensor<4>, Tensor<4>) {
    let a = per_sample(t, device, |t| schedule.alpha_bar(t).sqrt());
    let s = per_sample(t, device, |t| (1.0 - schedule.alpha_bar(t)).sqrt());
    (a, s)
}

/// sqrt(alphabar_t) and sqrt(1 - alphabar_t) for a whole batch at one t: the f32 values
/// [`coefficients`] would upload for every sample.
fn scalars(schedule: &Schedule, t: usize) -> (f32, f32) {
    let ab = schedule.alpha_bar(t);
    (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32)
}

/// A conversion coefficient: one per sample (a `[batch, 1, 1, 1]` tensor, uploaded), or one for
/// the whole batch (a scalar, which the kernel takes as an argument: nothing is uploaded, so a
/// sampler's step makes no host-to-device copy for its conversions).
trait Coefficient {
    fn times(&self, x: Tensor<4>) -> Tensor<4>;
    fn divides(&self, x: Tensor<4>) -> Tensor<4>;
}

impl Coefficient for Tensor<4> {
    fn times(&self, x: Tensor<4>) -> Tensor<4> {
        x * self.clone()
    }
    fn divides(&self, x: Tensor<4>) -> Tensor<4> {
        x / self.clone()
    }
}

impl Coefficient for f32 {
    fn times(&self, x: Tensor<4>) -> Tensor<4> {
        x * *self
    }
    fn divides(&self, x: Tensor<4>) -> Tensor<4> {
        x / *self
    }
}

impl Parameterization {
    /// Rejects epsilon prediction on a zero-terminal-SNR schedule: at alphabar_T = 0 the
    /// network output carries no information about x0 (Lin et al. 2024, section 3.2).
    pub fn check_schedule(self, schedule: &ScheduleConfig) -> Result<()> {
        if self == Self::Epsilon && schedule.rescale_zero_terminal_snr {
            return Err(DiffusionError::InvalidConfig {
                key: "parameterization".into(),
                value: "epsilon".into(),
                expected: "\"v\" or \"sample\" with schedule.rescale_zero_terminal_snr = true"
                    .into(),
            });
        }
        Ok(())
    }

    /// The training target from z_0 and the noise: eps, z_0, or
    /// v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) z_0  (Salimans & Ho 2022, section 4)
    ///
    /// # Shapes
    /// - `z0`, `eps` and the result: `[batch, channels, height, width]`; `t`: `batch` indices
    pub fn target(
        self,
        schedule: &Schedule,
        z0: Tensor<4>,
        eps: Tensor<4>,
        t: &[usize],
    ) -> Tensor<4> {
        let device = z0.device();
        self.target_with(z0, eps, || coefficients(schedule, t, &device))
    }

    /// [`Self::target`] with the per-sample sqrt(alphabar_t) and sqrt(1 - alphabar_t) from
    /// `coefficients`, called only for v.
    pub fn target_with(
        self,
        z0: Tensor<4>,
        eps: Tensor<4>,
        coefficients: impl FnOnce() -> (Tensor<4>, Tensor<4>),
    ) -> Tensor<4> {
        match self {
            Self::Epsilon => eps,
            Self::Sample => z0,
            Self::Velocity => {
                let (a, s) = coefficients();
                eps * a - z0 * s
            }
        }
    }

    /// The noise eps implied by a network output at z_t (table in the module doc).
    pub fn eps(
        self,
        schedule: &Schedule,
        z_t: Tensor<4>,
        output: Tensor<4>,
        t: &[usize],
    ) -> Tensor<4> {
        let device = z_t.device();
        self.eps_with(z_t, output, || coefficients(schedule, t, &device))
    }

    /// The eps row of the module doc's table, with (sqrt(alphabar_t), sqrt(1 - alphabar_t))
    /// from `coefficients`, called only where the output is not eps.
    fn eps_with<C: Coefficient>(
        self,
        z_t: Tensor<4>,
        output: Tensor<4>,
        coefficients: impl FnOnce() -> (C, C),
    ) -> Tensor<4> {
        match self {
            Self::Epsilon => output,
            Self::Sample => {
                let (a, s) = coefficients();
                s.divides(z_t - a.times(output))
            }
            Self::Velocity => {
                let (a, s) = coefficients();
                s.times(z_t) + a.times(output)
            }
        }
    }

    /// The clean latent x0 implied by a network output at z_t (table in the module doc).
    pub fn x0(
        self,
        schedule: &Schedule,
        z_t: Tensor<4>,
        output: Tensor<4>,
        t: &[usize],
    ) -> Tensor<4> {
        let device = z_t.device();
        self.x0_with(z_t, output, || coefficients(schedule, t, &device))
    }

    /// The x0 row of the module doc's table, with (sqrt(alphabar_t), sqrt(1 - alphabar_t))
    /// from `coefficients`, called only where the output is not x0.
    fn x0_with<C: Coefficient>(
        self,
        z_t: Tensor<4>,
        output: Tensor<4>,
        coefficients: impl FnOnce() -> (C, C),
    ) -> Tensor<4> {
        match self {
            Self::Epsilon => {
                let (a, s) = coefficients();
                a.divides(z_t - s.times(output))
            }
            Self::Sample => output,
            Self::Velocity => {
                let (a, s) = coefficients();
                a.times(z_t) - s.times(output)
            }
        }
    }

    /// [`Self::eps`] with one timestep for the whole batch (what samplers use); the
    /// coefficients are scalars, so nothing is uploaded.
    pub fn eps_at(
        self,
        schedule: &Schedule,
        z_t: Tensor<4>,
        output: Tensor<4>,
        t: usize,
    ) -> Tensor<4> {
        self.eps_with(z_t, output, || scalars(schedule, t))
    }

    /// [`Self::x0`] with one timestep for the whole batch (what samplers use); the
    /// coefficients are scalars, so nothing is uploaded.
    pub fn x0_at(
        self,
        schedule: &Schedule,
        z_t: Tensor<4>,
        output: Tensor<4>,
        t: usize,
    ) -> Tensor<4> {
        self.x0_with(z_t, output, || scalars(schedule, t))
    }
}

/// x0 = (z_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)  (DDPM eq. 4 solved for x0; DDIM
/// eq. 12's "predicted x0")
pub fn eps_to_x0(schedule: &Schedule, z_t: Tensor<4>, eps: Tensor<4>, t: usize) -> Tensor<4> {
    Parameterization::Epsilon.x0_at(schedule, z_t, eps, t)
}

/// score = grad log p(z_t) = -eps / sqrt(1 - alphabar_t)  (Luo 2022, eqs. 149-151)
pub fn eps_to_score(schedule: &Schedule, eps: Tensor<4>, t: &[usize]) -> Tensor<4> {
    let s = per_sample(t, &eps.device(), |t| (1.0 - schedule.alpha_bar(t)).sqrt());
    s.divides(-eps)
}

/// [`eps_to_score`] with one timestep for the whole batch (a scalar: nothing is uploaded).
pub fn eps_to_score_at(schedule: &Schedule, eps: Tensor<4>, t: usize) -> Tensor<4> {
    scalars(schedule, t).1.divides(-eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::q_sample;
    use crate::schedule::BetaSchedule;
    use ldm_common::config::parse_toml;
    use ldm_common::rng::{randn, stream};
    use ldm_common::tensor::to_vec_f32;

    fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        to_vec_f32((a - b).abs().max())[0]
    }

    fn setup(zero_snr: bool) -> (Schedule, Tensor<4>, Tensor<4>, Vec<usize>) {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig {
            kind: BetaSchedule::ScaledLinear,
            rescale_zero_terminal_snr: zero_snr,
            ..ScheduleConfig::default()
        })
        .unwrap();
        let mut rng = stream(1, "parameterization-test", 0);
        let z0 = randn(&mut rng, [6, 2, 3, 3], &device);
        let eps = randn(&mut rng, [6, 2, 3, 3], &device);
        (schedule, z0, eps, vec![0, 1, 100, 500, 900, 998])
    }

    #[test]
    fn target_converts_back_to_eps_and_x0_for_each_parameterization() {
        let (schedule, z0, eps, t) = setup(false);
        let z_t = q_sample(&schedule, z0.clone(), &t, eps.clone());
        for p in [
            Parameterization::Epsilon,
            Parameterization::Sample,
            Parameterization::Velocity,
        ] {
            let out = p.target(&schedule, z0.clone(), eps.clone(), &t);
            let eps_back = p.eps(&schedule, z_t.clone(), out.clone(), &t);
            let x0_back = p.x0(&schedule, z_t.clone(), out, &t);
            // x0 from eps divides by sqrt(alphabar_998) ~ 0.07: f32 rounding grows to ~1e-5.
            assert!(max_abs_diff(eps_back, eps.clone()) < 1e-4, "{p:?} eps");
            assert!(max_abs_diff(x0_back, z0.clone()) < 1e-4, "{p:?} x0");
        }
    }

    #[test]
    fn eps_to_x0_to_eps_and_eps_to_v_to_eps_round_trip() {
        let (schedule, _, eps, t) = setup(false);
        let mut rng = stream(2, "parameterization-test", 0);
        let z_t = randn(&mut rng, [6, 2, 3, 3], &Device::flex());
        let x0 = Parameterization::Epsilon.x0(&schedule, z_t.clone(), eps.clone(), &t);
        let back = Parameterization::Sample.eps(&schedule, z_t.clone(), x0.clone(), &t);
        assert!(max_abs_diff(back, eps.clone()) < 1e-4);
        let v = Parameterization::Velocity.target(&schedule, x0, eps.clone(), &t);
        let back = Parameterization::Velocity.eps(&schedule, z_t, v, &t);
        assert!(max_abs_diff(back, eps) < 1e-4);
    }

    #[test]
    fn v_prediction_recovers_x0_at_zero_terminal_snr() {
        // At alphabar = 0 z_T is pure noise and v = -x0 (up to the 2^-24 floor): no division.
        let (schedule, z0, eps, _) = setup(true);
        let t = vec![999; 6];
        let z_t = q_sample(&schedule, z0.clone(), &t, eps.clone());
        let v = Parameterization::Velocity.target(&schedule, z0.clone(), eps.clone(), &t);
        let x0 = Parameterization::Velocity.x0(&schedule, z_t.clone(), v.clone(), &t);
        assert!(max_abs_diff(x0, z0.clone()) < 1e-3);
        // Through eps (what samplers see) and back: the floored alphabar is used both ways.
        let eps_hat = Parameterization::Velocity.eps(&schedule, z_t.clone(), v, &t);
        let x0 = eps_to_x0(&schedule, z_t, eps_hat, 999);
        assert!(max_abs_diff(x0, z0) < 2e-3);
    }

    /// The samplers' one-timestep conversions take scalar coefficients instead of uploading one
    /// per sample; the numbers are bit for bit the per-sample ones, also where the floored
    /// alphabar of a zero-terminal-SNR schedule is used.
    #[test]
    fn one_timestep_conversions_equal_the_per_sample_ones_bit_for_bit() {
        let bits =
            |x: Tensor<4>| -> Vec<u32> { to_vec_f32(x).iter().map(|v| v.to_bits()).collect() };
        for zero_snr in [false, true] {
            let (schedule, z_t, output, _) = setup(zero_snr);
            for t in [0, 1, 500, 998, 999] {
                let ts = vec![t; 6];
                for p in [
                    Parameterization::Epsilon,
                    Parameterization::Sample,
                    Parameterization::Velocity,
                ] {
                    let at = p.eps_at(&schedule, z_t.clone(), output.clone(), t);
                    let each = p.eps(&schedule, z_t.clone(), output.clone(), &ts);
                    assert_eq!(
                        bits(at),
                        bits(each),
                        "{p:?} eps, t = {t}, zero SNR {zero_snr}"
                    );
                    let at = p.x0_at(&schedule, z_t.clone(), output.clone(), t);
                    let each = p.x0(&schedule, z_t.clone(), output.clone(), &ts);
                    assert_eq!(
                        bits(at),
                        bits(each),
                        "{p:?} x0, t = {t}, zero SNR {zero_snr}"
                    );
                }
                assert_eq!(
                    bits(eps_to_score_at(&schedule, output.clone(), t)),
                    bits(eps_to_score(&schedule, output.clone(), &ts)),
                    "score, t = {t}, zero SNR {zero_snr}"
                );
            }
        }
    }

    #[test]
    fn score_is_minus_eps_over_sigma() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let eps = Tensor::<4>::from_floats([[[[1.0, -2.0]]]], &device);
        let score = to_vec_f32(eps_to_score_at(&schedule, eps, 250));
        let s = schedule.sqrt_one_minus_alphas_cumprod[250];
        assert!((f64::from(score[0]) + 1.0 / s).abs() < 1e-6);
        assert!((f64::from(score[1]) - 2.0 / s).abs() < 1e-6);
    }

    #[test]
    fn serde_names_and_aliases() {
        #[derive(Deserialize)]
        struct C {
            p: Parameterization,
        }
        let read = |s: &str| parse_toml::<C>(&format!("p = \"{s}\"")).map(|c| c.p);
        assert_eq!(read("epsilon").unwrap(), Parameterization::Epsilon);
        assert_eq!(read("sample").unwrap(), Parameterization::Sample);
        assert_eq!(read("x0").unwrap(), Parameterization::Sample);
        assert_eq!(read("v").unwrap(), Parameterization::Velocity);
        assert_eq!(read("v_prediction").unwrap(), Parameterization::Velocity);
        let e = read("noise").unwrap_err();
        assert!(
            e.contains("epsilon") && e.contains("sample") && e.contains('v'),
            "{e}"
        );
    }

    #[test]
    fn epsilon_prediction_is_rejected_with_zero_terminal_snr() {
        let cfg = ScheduleConfig {
            rescale_zero_terminal_snr: true,
            ..ScheduleConfig::default()
        };
        let e = Parameterization::Epsilon
            .check_schedule(&cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameterization = epsilon"), "{e}");
        assert!(Parameterization::Velocity.check_schedule(&cfg).is_ok());
        assert!(
            Parameterization::Epsilon
                .check_schedule(&ScheduleConfig::default())
                .is_ok()
        );
    }
}
