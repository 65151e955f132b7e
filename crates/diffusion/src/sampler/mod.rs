//! Samplers: plain functions `sample_x(model, schedule, x, timesteps, ..., hooks)` over a
//! [`Denoiser`] that answers eps at an integer timestep (the k-diffusion shape).
//!
//! Conventions shared by every sampler:
//! - `x` lives at the noise level of `timesteps[0]`; the list is strictly descending and may
//!   start below T - 1 (image-to-image / SDEdit start from a partially noised latent).
//! - Step `i` moves from `timesteps[i]` to `timesteps[i + 1]`, the last step to the data
//!   (alphabar = 1), so the result is a clean latent.
//! - Every alphabar is read through [`Schedule::alpha_bar`] (floored at 2^-24 for
//!   zero-terminal-SNR schedules), the same value the parameterization conversions use.
//! - Randomness only comes from [`SampleHooks`]' noise source; guidance is a wrapper denoiser
//!   ([`crate::guidance`]), never a branch here.

mod ddim;
mod ddpm;
mod dpm_solver;
mod heun;
mod langevin;
mod plms;
mod unipc;

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use ldm_common::precision::Precision;
use serde::{Deserialize, Serialize};

pub use ddim::{ddim_sigma, sample_ddim};
pub use ddpm::{DdpmVariance, sample_ddpm};
pub use dpm_solver::sample_dpm_solver_pp;
pub use heun::sample_heun;
pub use langevin::sample_langevin;
pub use plms::sample_plms;
pub use unipc::sample_unipc;

use crate::denoiser::Denoiser;
use crate::error::{DiffusionError, Result, parse_name};
use crate::schedule::Schedule;
use crate::spacing::{TimestepSpacing, timesteps};

type NoiseFn<'a> = Box<dyn FnMut([usize; 4]) -> Tensor<4> + 'a>;
type AfterStepFn<'a> = Box<dyn FnMut(usize, Option<usize>, Tensor<4>) -> Tensor<4> + 'a>;
type ProgressFn<'a> = Box<dyn FnMut(usize, usize) -> bool + 'a>;

/// What a sampling loop asks of its caller: fresh noise, a chance to edit the latent after each
/// step, and progress reporting with cancellation.
pub struct SampleHooks<'a> {
    noise: NoiseFn<'a>,
    after_step: Option<AfterStepFn<'a>>,
    progress: Option<ProgressFn<'a>>,
}

impl<'a> SampleHooks<'a> {
    /// Hooks drawing N(0, I) noise of a requested shape from `noise`.
    pub fn new(noise: impl FnMut([usize; 4]) -> Tensor<4> + 'a) -> Self {
        Self {
            noise: Box::new(noise),
            after_step: None,
            progress: None,
        }
    }

    /// Hooks whose noise is drawn on the host from `seed` (one stream per draw, purpose
    /// `"sample-noise"`), so a seed gives the same samples on every backend.
    pub fn seeded(seed: u64, device: Device) -> Self {
        let mut draw = 0u64;
        Self::new(move |shape| {
            let mut rng = ldm_common::rng::stream(seed, "sample-noise", draw);
            draw += 1;
            ldm_common::rng::randn(&mut rng, shape, &device)
        })
    }

    /// `f(step, t_next, x) -> x` runs after every step; `t_next` is the timestep `x` now lives
    /// at (`None` after the last step: `x` is clean). Inpainting replaces the known region of
    /// `x` here with the known latent noised to `t_next`.
    pub fn with_after_step(
        mut self,
        f: impl FnMut(usize, Option<usize>, Tensor<4>) -> Tensor<4> + 'a,
    ) -> Self {
        self.after_step = Some(Box::new(f));
        self
    }

    /// `f(done, total) -> keep_going` runs after every step; `false` cancels the loop, which
    /// then returns [`DiffusionError::Cancelled`].
    pub fn with_progress(mut self, f: impl FnMut(usize, usize) -> bool + 'a) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// N(0, I) noise shaped like `x`.
    fn noise_like(&mut self, x: &Tensor<4>) -> Tensor<4> {
        (self.noise)(x.dims())
    }

    /// After step `i` of `total`, landing at `next`: the after-step edit, then progress.
    fn end_step(
        &mut self,
        i: usize,
        total: usize,
        next: Option<usize>,
        x: Tensor<4>,
    ) -> Result<Tensor<4>> {
        let x = match &mut self.after_step {
            Some(f) => f(i, next, x),
            None => x,
        };
        if let Some(progress) = &mut self.progress
            && !progress(i + 1, total)
        {
            return Err(DiffusionError::Cancelled { done: i + 1, total });
        }
        Ok(x)
    }
}

/// `(i, t_i, t_{i+1})` for every step, `None` for the step that lands on the data.
fn steps(timesteps: &[usize]) -> impl Iterator<Item = (usize, usize, Option<usize>)> + '_ {
    timesteps
        .iter()
        .enumerate()
        .map(|(i, &t)| (i, t, timesteps.get(i + 1).copied()))
}

/// alphabar at the level a step lands on: 1 for the data.
fn alpha_bar_to(schedule: &Schedule, next: Option<usize>) -> f64 {
    next.map_or(1.0, |s| schedule.alpha_bar(s))
}

/// Checks a timestep list: non-empty, strictly descending, below T.
pub fn check_timesteps(schedule: &Schedule, timesteps: &[usize]) -> Result<()> {
    let n = schedule.num_timesteps();
    let ok = !timesteps.is_empty() && timesteps[0] < n && timesteps.windows(2).all(|w| w[0] > w[1]);
    if ok {
        Ok(())
    } else {
        Err(DiffusionError::InvalidConfig {
            key: "timesteps".into(),
            value: format!("{timesteps:?}"),
            expected: format!("a non-empty, strictly descending list of indices below {n}"),
        })
    }
}

/// Which sampler runs. Config / CLI names: `ddpm`, `ddim`, `plms`, `dpm-solver++`, `unipc`,
/// `heun`, `langevin`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SamplerKind {
    #[serde(rename = "ddpm")]
    Ddpm,
    #[default]
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "plms")]
    Plms,
    #[serde(rename = "dpm-solver++")]
    DpmSolverPP,
    #[serde(rename = "unipc")]
    UniPc,
    #[serde(rename = "heun")]
    Heun,
    #[serde(rename = "langevin")]
    Langevin,
}

impl SamplerKind {
    pub const ALL: [Self; 7] = [
        Self::Ddpm,
        Self::Ddim,
        Self::Plms,
        Self::DpmSolverPP,
        Self::UniPc,
        Self::Heun,
        Self::Langevin,
    ];

    /// The config / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Plms => "plms",
            Self::DpmSolverPP => "dpm-solver++",
            Self::UniPc => "unipc",
            Self::Heun => "heun",
            Self::Langevin => "langevin",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        parse_name("sampler", s, &Self::ALL, Self::name).map_err(|e| match (e, known_as(s)) {
            (
                DiffusionError::InvalidConfig {
                    key,
                    value,
                    expected,
                },
                Some(hint),
            ) => DiffusionError::InvalidConfig {
                key,
                value,
                expected: format!("{expected} ({hint})"),
            },
            (e, _) => e,
        })
    }
}

/// Where a sampler name from diffusers, k-diffusion or the web UIs is found here.
fn known_as(name: &str) -> Option<&'static str> {
    let name = name.to_lowercase().replace(['_', ' '], "-");
    let name = name.strip_prefix("k-").unwrap_or(&name);
    Some(match name {
        "euler" => "Euler is `ddim` here: an Euler step of the probability-flow ODE is a DDIM step",
        "euler-a" | "euler-ancestral" | "eulera" => {
            "Euler ancestral is `ddim --eta 1` here: the same step and noise"
        }
        "pndm" => "diffusers' PNDM with skip_prk_steps is CompVis' PLMS: `plms`",
        "dpm++"
        | "dpmpp"
        | "dpmpp-2m"
        | "dpm++-2m"
        | "dpm-solver"
        | "dpmsolver++"
        | "dpm-solver-multistep" => "DPM-Solver++(2M) is `dpm-solver++`",
        "dpm++-2m-karras" | "dpmpp-2m-karras" => {
            "DPM++ 2M Karras is `dpm-solver++ --spacing karras`"
        }
        "uni-pc" | "unipcmultistep" => "`unipc`",
        _ => return None,
    })
}

/// Everything that picks and tunes a sampler. TOML (`[sampler]`): `kind`, `steps`, `eta`,
/// `spacing`, `ddpm_variance`, `langevin_snr`, `corrector_steps`, `clip_x0`, `guidance_rescale`,
/// `precision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerOptions {
    pub kind: SamplerKind,
    /// Number of denoising steps (timesteps visited).
    pub steps: usize,
    /// DDIM stochasticity: 0 deterministic, 1 the DDPM posterior variance (DDIM eq. 16).
    pub eta: f64,
    pub spacing: TimestepSpacing,
    /// Variance of the ancestral DDPM sampler.
    pub ddpm_variance: DdpmVariance,
    /// Langevin corrector signal-to-noise ratio r (Song et al. 2021, Algorithm 5).
    pub langevin_snr: f64,
    /// Langevin corrector steps M per timestep (0: predictor only).
    pub corrector_steps: usize,
    /// Clip every x0 estimate to `[-clip_x0, clip_x0]` ([`crate::clip::ClipX0`]); unset: no
    /// clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_x0: Option<f64>,
    /// Guidance rescale phi in [0, 1] (Lin et al. 2024, section 3.4; diffusers'
    /// `guidance_rescale`; [`crate::guidance::ClassifierFreeGuidance::with_rescale`]): 0 is plain
    /// classifier-free guidance; no effect without it (cfg 1). Written only when not 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub guidance_rescale: f64,
    /// The network's arithmetic while sampling: f32, or bf16 (the weights cast once; the
    /// sampler's updates, guidance and the VAE decode stay f32). Written only when bf16.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddim,
            steps: 50,
            eta: 0.0,
            spacing: TimestepSpacing::Trailing,
            ddpm_variance: DdpmVariance::Posterior,
            langevin_snr: 0.16,
            corrector_steps: 1,
            clip_x0: None,
            guidance_rescale: 0.0,
            precision: Precision::F32,
        }
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// What follows a guidance scale in a one-line summary (`generate`, `eval`, `plot-sweep`):
/// ` rescaled by PHI` for a guidance rescale, nothing for plain guidance.
pub fn rescale_suffix(guidance_rescale: f64) -> String {
    if guidance_rescale > 0.0 {
        format!(" rescaled by {guidance_rescale}")
    } else {
        String::new()
    }
}

impl SamplerOptions {
    /// Checks the options against a schedule; messages name the key.
    pub fn validate(&self, schedule: &Schedule) -> Result<()> {
        self.check_values()?;
        self.timesteps(schedule).map(|_| ())
    }

    /// Checks everything but `steps` (which [`sample_from`] does not use).
    fn check_values(&self) -> Result<()> {
        let invalid = |key: &str, value: f64, expected: &str| {
            Err(DiffusionError::InvalidConfig {
                key: key.into(),
                value: value.to_string(),
                expected: expected.into(),
            })
        };
        if !(0.0..=1.0).contains(&self.eta) {
            return invalid("sampler.eta", self.eta, "a number in [0, 1]");
        }
        if !(self.langevin_snr > 0.0 && self.langevin_snr.is_finite()) {
            return invalid(
                "sampler.langevin_snr",
                self.langevin_snr,
                "a positive number (0.16 in Song et al. 2021)",
            );
        }
        if let Some(c) = self.clip_x0
            && !(c > 0.0 && c.is_finite())
        {
            return invalid(
                "sampler.clip_x0",
                c,
                "a positive number (the range of the latents, such as 3)",
            );
        }
        if !(0.0..=1.0).contains(&self.guidance_rescale) {
            return invalid(
                "sampler.guidance_rescale",
                self.guidance_rescale,
                "a number in [0, 1] (0: plain guidance; 0.7 in Lin et al. 2024)",
            );
        }
        Ok(())
    }

    /// The descending timesteps these options visit on `schedule`.
    pub fn timesteps(&self, schedule: &Schedule) -> Result<Vec<usize>> {
        timesteps(schedule, self.steps, self.spacing)
    }

    /// A one-line note when the options visit fewer timesteps than `steps` (Karras levels that
    /// round to the same trained timestep, [`crate::spacing::karras`]); `None` otherwise.
    pub fn fewer_steps_note(&self, schedule: &Schedule) -> Option<String> {
        let visited = self.timesteps(schedule).ok()?.len();
        (visited < self.steps).then(|| {
            format!(
                "note: sampler.spacing = {}: the {} noise levels fall on {visited} distinct trained timesteps (they crowd near the lowest level), so {visited} steps run",
                self.spacing.name(),
                self.steps
            )
        })
    }
}

/// Runs the sampler of `options` from `x` at `options.timesteps(schedule)[0]`.
pub fn sample(
    model: &dyn Denoiser,
    schedule: &Schedule,
    x: Tensor<4>,
    options: &SamplerOptions,
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    let ts = options.timesteps(schedule)?;
    sample_from(model, schedule, x, &ts, options, hooks)
}

/// Runs the sampler of `options` over explicit `timesteps` (e.g. the tail of the list from
/// [`crate::spacing::for_strength`] for image-to-image); `options.steps` and `spacing` are
/// ignored.
pub fn sample_from(
    model: &dyn Denoiser,
    schedule: &Schedule,
    x: Tensor<4>,
    timesteps: &[usize],
    options: &SamplerOptions,
    hooks: &mut SampleHooks,
) -> Result<Tensor<4>> {
    options.check_values()?;
    match options.kind {
        SamplerKind::Ddpm => {
            sample_ddpm(model, schedule, x, timesteps, options.ddpm_variance, hooks)
        }
        SamplerKind::Ddim => sample_ddim(model, schedule, x, timesteps, options.eta, hooks),
        SamplerKind::Plms => sample_plms(model, schedule, x, timesteps, hooks),
        SamplerKind::DpmSolverPP => sample_dpm_solver_pp(model, schedule, x, timesteps, hooks),
        SamplerKind::UniPc => sample_unipc(model, schedule, x, timesteps, hooks),
        SamplerKind::Heun => sample_heun(model, schedule, x, timesteps, hooks),
        SamplerKind::Langevin => sample_langevin(
            model,
            schedule,
            x,
            timesteps,
            options.langevin_snr,
            options.corrector_steps,
            hooks,
        ),
    }
}

#[cfg(test)]
mod tests;
