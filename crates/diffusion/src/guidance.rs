//! Denoisers built around a backbone or another denoiser: the parameterization conversion,
//! classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol
//! 2021). Samplers only ever see the resulting eps (Luo 2022, eqs. 163-170).

use burn::prelude::*;

use crate::denoiser::{Backbone, Conditioning, Denoiser};
use crate::error::{DiffusionError, Result};
use crate::parameterization::Parameterization;
use crate::schedule::Schedule;

/// The timestep `t` as the backbone's `[batch]` float input.
fn timestep_input(t: usize, batch: usize, device: &Device) -> Tensor<1> {
    Tensor::full([batch], t as f32, device)
}

/// A backbone with its parameterization and conditioning, answering eps.
pub struct ModelDenoiser<'a, B: Backbone + ?Sized> {
    pub backbone: &'a B,
    pub parameterization: Parameterization,
    pub schedule: &'a Schedule,
    /// Conditioning for the whole batch (its batch size must match the latents').
    pub cond: Conditioning,
}

impl<B: Backbone + ?Sized> Denoiser for ModelDenoiser<'_, B> {
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4> {
        let [b, ..] = z_t.dims();
        let output =
            self.backbone
                .forward(z_t.clone(), timestep_input(t, b, &z_t.device()), &self.cond);
        self.parameterization.eps_at(self.schedule, z_t, output, t)
    }
}

/// Classifier-free guidance (Ho & Salimans 2022, eq. 6; Luo 2022, eq. 168):
/// eps = eps_uncond + w (eps_cond - eps_uncond). `w` is diffusers' `guidance_scale` (Ho &
/// Salimans' 1 + w; Luo's gamma): `w = 1` is the plain conditional model, `w = 0` the
/// unconditional one. Both branches run in one batched forward pass of `2 * batch` latents.
pub struct ClassifierFreeGuidance<'a, B: Backbone + ?Sized> {
    backbone: &'a B,
    parameterization: Parameterization,
    schedule: &'a Schedule,
    /// `[uncond; cond]` along the batch axis.
    both: Conditioning,
    scale: f64,
}

impl<'a, B: Backbone + ?Sized> ClassifierFreeGuidance<'a, B> {
    /// `cond` and `uncond` (e.g. the null class, or the empty prompt's embeddings) must carry the
    /// same kinds of conditioning, each with the latents' batch size.
    pub fn new(
        backbone: &'a B,
        parameterization: Parameterization,
        schedule: &'a Schedule,
        cond: &Conditioning,
        uncond: &Conditioning,
        scale: f64,
    ) -> Result<Self> {
        let kinds = |c: &Conditioning| (c.class.is_some(), c.text.is_some());
        if kinds(cond) != kinds(uncond) || kinds(cond) == (false, false) {
            return Err(DiffusionError::InvalidConfig {
                key: "guidance".into(),
                value: format!(
                    "cond (class, text) = {:?}, uncond = {:?}",
                    kinds(cond),
                    kinds(uncond)
                ),
                expected: "conditional and unconditional inputs of the same, non-empty kind".into(),
            });
        }
        if !scale.is_finite() {
            return Err(DiffusionError::InvalidConfig {
                key: "guidance_scale".into(),
                value: scale.to_string(),
                expected: "a finite number".into(),
            });
        }
        Ok(Self {
            backbone,
            parameterization,
            schedule,
            both: Conditioning::cat(uncond, cond),
            scale,
        })
    }
}

impl<B: Backbone + ?Sized> Denoiser for ClassifierFreeGuidance<'_, B> {
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4> {
        let [b, ..] = z_t.dims();
        // [2b, c, h, w]: the unconditional half first, as `both` is ordered.
        let z2 = Tensor::cat(vec![z_t.clone(), z_t], 0);
        let output = self.backbone.forward(
            z2.clone(),
            timestep_input(t, 2 * b, &z2.device()),
            &self.both,
        );
        let eps = self.parameterization.eps_at(self.schedule, z2, output, t);
        let uncond = eps.clone().narrow(0, 0, b);
        let cond = eps.narrow(0, b, b);
        uncond.clone() + (cond - uncond) * self.scale
    }
}

/// Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 and eq. 14; Luo 2022, eq. 166):
/// eps' = eps - s sqrt(1 - alphabar_t) grad_z log p(y | z_t), i.e. the score plus s times the
/// classifier's gradient. `grad_log_prob(z_t, t)` returns that gradient (typically through an
/// autodiff pass of a noisy-latent classifier).
pub struct ClassifierGuidance<'a, D: Denoiser + ?Sized, G: Fn(Tensor<4>, usize) -> Tensor<4>> {
    pub inner: &'a D,
    pub schedule: &'a Schedule,
    pub grad_log_prob: G,
    pub scale: f64,
}

impl<D: Denoiser + ?Sized, G: Fn(Tensor<4>, usize) -> Tensor<4>> Denoiser
    for ClassifierGuidance<'_, D, G>
{
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4> {
        let eps = self.inner.predict_eps(z_t.clone(), t);
        let grad = (self.grad_log_prob)(z_t, t);
        eps - grad * (self.scale * self.schedule.sqrt_one_minus_alphas_cumprod[t])
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::parameterization::eps_to_score_at;
    use crate::sampler::{SampleHooks, sample_ddim};
    use crate::schedule::ScheduleConfig;
    use crate::spacing::{TimestepSpacing, timesteps};
    use ldm_common::tensor::to_vec_f32;

    /// output = z * (class + 1) * t-independent factor; counts forward calls and batch sizes.
    struct Stub {
        calls: Cell<usize>,
        batch: Cell<usize>,
    }

    impl Backbone for Stub {
        fn forward(&self, z_t: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
            let [b, ..] = z_t.dims();
            assert_eq!(t.dims(), [b]);
            self.calls.set(self.calls.get() + 1);
            self.batch.set(b);
            let class = cond.class.clone().expect("class-conditional stub");
            let factor = (class.float() + 1.0).reshape([b, 1, 1, 1]);
            z_t * factor
        }
    }

    fn stub() -> Stub {
        Stub {
            calls: Cell::new(0),
            batch: Cell::new(0),
        }
    }

    fn classes(ids: [i64; 2], device: &Device) -> Conditioning {
        Conditioning {
            class: Some(Tensor::from_data(
                TensorData::new(ids.to_vec(), [2]),
                device,
            )),
            text: None,
        }
    }

    #[test]
    fn cfg_interpolates_conditional_and_unconditional_eps() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let backbone = stub();
        let z = Tensor::<4>::from_floats([[[[1.0, -2.0]]], [[[0.5, 4.0]]]], &device);
        // cond class 2 -> eps = 3 z; uncond class 0 -> eps = z (epsilon parameterization).
        let cond = classes([2, 2], &device);
        let uncond = classes([0, 0], &device);
        for (scale, factor) in [(1.0, 3.0), (0.0, 1.0), (2.5, 6.0)] {
            let cfg = ClassifierFreeGuidance::new(
                &backbone,
                Parameterization::Epsilon,
                &schedule,
                &cond,
                &uncond,
                scale,
            )
            .unwrap();
            let calls = backbone.calls.get();
            let eps = to_vec_f32(cfg.predict_eps(z.clone(), 10));
            assert_eq!(backbone.calls.get(), calls + 1, "one batched forward");
            assert_eq!(backbone.batch.get(), 4);
            let expected = to_vec_f32(z.clone() * factor);
            for (a, e) in eps.iter().zip(&expected) {
                assert!(
                    (a - e).abs() < 1e-6,
                    "scale {scale}: {eps:?} vs {expected:?}"
                );
            }
        }
        // Scale 1 equals the plain conditional model.
        let plain = ModelDenoiser {
            backbone: &backbone,
            parameterization: Parameterization::Epsilon,
            schedule: &schedule,
            cond: cond.clone(),
        };
        let expected = to_vec_f32(plain.predict_eps(z.clone(), 10));
        assert_eq!(expected, to_vec_f32(z * 3.0));
    }

    #[test]
    fn cfg_in_a_sampling_loop_calls_the_backbone_once_per_step() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let backbone = stub();
        let cfg = ClassifierFreeGuidance::new(
            &backbone,
            Parameterization::Velocity,
            &schedule,
            &classes([1, 3], &device),
            &classes([0, 0], &device),
            4.0,
        )
        .unwrap();
        let ts = timesteps(1000, 7, TimestepSpacing::Trailing).unwrap();
        let x = Tensor::<4>::ones([2, 1, 2, 2], &device) * 0.1;
        let mut hooks = SampleHooks::seeded(0, device);
        sample_ddim(&cfg, &schedule, x, &ts, 0.0, &mut hooks).unwrap();
        assert_eq!(backbone.calls.get(), 7);
    }

    #[test]
    fn cfg_rejects_mismatched_conditioning() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let backbone = stub();
        let result = ClassifierFreeGuidance::new(
            &backbone,
            Parameterization::Epsilon,
            &schedule,
            &classes([1, 1], &device),
            &Conditioning::none(),
            3.0,
        );
        let e = result.err().unwrap().to_string();
        assert!(e.starts_with("guidance = "), "{e}");
    }

    #[test]
    fn classifier_guidance_adds_the_scaled_gradient_to_the_score() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let inner = |z: Tensor<4>, _t: usize| z * 0.5;
        let target = Tensor::<4>::from_floats([[[[1.0, 2.0]]]], &device);
        // log p(y | z) = -|z - target|^2 / 2: gradient target - z.
        let guided = ClassifierGuidance {
            inner: &inner,
            schedule: &schedule,
            grad_log_prob: |z: Tensor<4>, _t: usize| target.clone() - z,
            scale: 3.0,
        };
        let z = Tensor::<4>::from_floats([[[[0.0, 1.0]]]], &device);
        let t = 400;
        let score = eps_to_score_at(&schedule, guided.predict_eps(z.clone(), t), t);
        let plain = eps_to_score_at(&schedule, inner(z.clone(), t), t);
        // score' = score + s grad
        let expected = plain + (target - z) * 3.0;
        let (a, e) = (to_vec_f32(score), to_vec_f32(expected));
        for (a, e) in a.iter().zip(&e) {
            assert!((a - e).abs() < 1e-4, "{a} vs {e}");
        }
    }
}
