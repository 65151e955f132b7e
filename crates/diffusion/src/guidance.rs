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
    /// phi of [`Self::with_rescale`]; 0: plain guidance.
    rescale: f64,
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
            rescale: 0.0,
        })
    }

    /// Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    /// are Flawed", section 3.4 and Algorithm 2; diffusers' `guidance_rescale`), on the
    /// v-prediction v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 of each branch, whatever the model
    /// predicts (as the paper, and as ComfyUI's RescaleCFG does for every model):
    ///
    /// v_cfg = v_u + w (v_c - v_u),  v = v_cfg (phi std(v_c) / std(v_cfg) + 1 - phi),
    ///
    /// std over each image's elements. Large scales inflate v_cfg's spread (over-saturated,
    /// over-exposed images); `phi = 1` gives it the conditional prediction's spread back, `phi =
    /// 0` is plain guidance (the default; bit for bit). The paper uses 0.7.
    pub fn with_rescale(mut self, phi: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&phi) {
            return Err(DiffusionError::InvalidConfig {
                key: "guidance_rescale".into(),
                value: phi.to_string(),
                expected: "a number in [0, 1] (0: plain guidance; 0.7 in Lin et al. 2024)".into(),
            });
        }
        self.rescale = phi;
        Ok(self)
    }

    /// uncond + w (cond - uncond) of both branches' `[2b, ...]` predictions (the unconditional
    /// half first, as `both` is ordered).
    fn combine(&self, pair: Tensor<4>) -> Tensor<4> {
        let b = pair.dims()[0] / 2;
        let uncond = pair.clone().narrow(0, 0, b);
        let cond = pair.narrow(0, b, b);
        uncond.clone() + (cond - uncond) * self.scale
    }

    /// [`Self::with_rescale`]: `guided` is eps_cfg; with v = (eps - sqrt(1 - ab_t) z_t) /
    /// sqrt(ab_t) linear in eps, eps' = eps_cfg + sqrt(ab_t) (factor - 1) v_cfg. v comes from
    /// eps and x0 (not by dividing by sqrt(ab_t)), so it stays exact where ab_t is tiny.
    /// `eps` is both branches' `[2b, ...]`.
    fn rescaled(
        &self,
        guided: Tensor<4>,
        eps: Tensor<4>,
        z2: Tensor<4>,
        output: Tensor<4>,
        t: usize,
    ) -> Tensor<4> {
        let [b2, c, h, w] = z2.dims();
        let b = b2 / 2;
        let ab = self.schedule.alpha_bar(t);
        let (alpha, sigma) = (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32);
        let x0 = self.parameterization.x0_at(self.schedule, z2, output, t);
        let v = eps * alpha - x0 * sigma;
        let v_c = v.clone().narrow(0, b, b);
        let v_cfg = self.combine(v);
        // Population variances (the ratio is the same with Bessel's correction), `[b, 1]`.
        let var_c = v_c.reshape([b, c * h * w]).var_bias(1);
        let var_cfg = v_cfg.clone().reshape([b, c * h * w]).var_bias(1);
        let ratio = (var_c / var_cfg.clamp_min(f32::MIN_POSITIVE)).sqrt();
        let phi = self.rescale as f32;
        // sqrt(ab_t) (factor - 1) with factor = phi ratio + 1 - phi, `[b, 1]`
        let coefficient = (ratio * phi - phi) * alpha;
        guided + v_cfg * coefficient.reshape([b, 1, 1, 1])
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
        if self.rescale == 0.0 {
            return self.combine(self.parameterization.eps_at(self.schedule, z2, output, t));
        }
        // The rescale needs the inputs again; plain guidance lets the conversion consume them.
        let eps = self
            .parameterization
            .eps_at(self.schedule, z2.clone(), output.clone(), t);
        let guided = self.combine(eps.clone());
        self.rescaled(guided, eps, z2, output, t)
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

    /// Guidance rescale against Lin et al.'s Algorithm 2 written out in f64 on the host: each
    /// branch's output converted to v in closed form, v_cfg, the per-image std ratio, and eps
    /// back from v (eps = sqrt(ab) v + sqrt(1 - ab) z).
    #[test]
    fn guidance_rescale_matches_the_closed_form() {
        /// output = z (class + 1) + class / 4: the branches differ in spread and in mean.
        struct Affine;
        impl Backbone for Affine {
            fn forward(&self, z_t: Tensor<4>, _t: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
                let [b, ..] = z_t.dims();
                let class = cond.class.clone().unwrap().float().reshape([b, 1, 1, 1]);
                z_t * (class.clone() + 1.0) + class * 0.25
            }
        }
        let device = Device::flex();
        let z_host = [0.3, -1.2, 0.8, 2.0, -0.5, 0.1, 1.5, -0.9];
        let z = Tensor::<4>::from_data(TensorData::new(z_host.to_vec(), [2, 1, 2, 2]), &device);
        let (cond_ids, uncond_ids) = ([1i64, 3], [0i64, 2]);
        for zero_snr in [false, true] {
            let schedule = Schedule::new(&ScheduleConfig {
                rescale_zero_terminal_snr: zero_snr,
                ..Default::default()
            })
            .unwrap();
            let kinds = if zero_snr {
                vec![Parameterization::Velocity, Parameterization::Sample]
            } else {
                vec![Parameterization::Epsilon, Parameterization::Velocity]
            };
            for parameterization in kinds {
                for (t, w, phi) in [(10, 5.0, 0.7), (500, 3.0, 1.0), (999, 7.5, 0.5)] {
                    let ab = schedule.alpha_bar(t);
                    let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
                    // v of one branch's output at one element, in closed form.
                    let v_of = |out: f64, z: f64| match parameterization {
                        Parameterization::Epsilon => (out - s * z) / a,
                        Parameterization::Velocity => out,
                        Parameterization::Sample => (a * z - out) / s,
                    };
                    let mut expected = vec![];
                    for i in 0..2 {
                        let zs = &z_host[4 * i..4 * i + 4];
                        let out = |k: i64, z: f64| z * (k as f64 + 1.0) + k as f64 * 0.25;
                        let v_c: Vec<f64> =
                            zs.iter().map(|&z| v_of(out(cond_ids[i], z), z)).collect();
                        let v_u: Vec<f64> =
                            zs.iter().map(|&z| v_of(out(uncond_ids[i], z), z)).collect();
                        let v_cfg: Vec<f64> =
                            v_u.iter().zip(&v_c).map(|(u, c)| u + w * (c - u)).collect();
                        let std = |x: &[f64]| {
                            let m = x.iter().sum::<f64>() / 4.0;
                            (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 3.0).sqrt()
                        };
                        let factor = phi * std(&v_c) / std(&v_cfg) + 1.0 - phi;
                        for (v, &z) in v_cfg.iter().zip(zs) {
                            expected.push(a * v * factor + s * z);
                        }
                    }
                    let backbone = Affine;
                    let guided = ClassifierFreeGuidance::new(
                        &backbone,
                        parameterization,
                        &schedule,
                        &classes(cond_ids, &device),
                        &classes(uncond_ids, &device),
                        w,
                    )
                    .unwrap()
                    .with_rescale(phi)
                    .unwrap();
                    let eps = to_vec_f32(guided.predict_eps(z.clone(), t));
                    for (got, want) in eps.iter().zip(&expected) {
                        assert!(
                            (*got as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
                            "{parameterization:?} zero-snr {zero_snr} t {t}: {eps:?} vs {expected:?}"
                        );
                    }
                }
            }
        }
    }

    /// Guidance at scale 4 of a v-predicting `backbone`, classes 1 and 3 against class 0.
    fn cfg_four<'a>(
        backbone: &'a Stub,
        schedule: &'a Schedule,
        device: &Device,
    ) -> ClassifierFreeGuidance<'a, Stub> {
        ClassifierFreeGuidance::new(
            backbone,
            Parameterization::Velocity,
            schedule,
            &classes([1, 3], device),
            &classes([0, 0], device),
            4.0,
        )
        .unwrap()
    }

    #[test]
    fn guidance_rescale_zero_is_plain_guidance_and_out_of_range_is_refused() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let backbone = stub();
        let make = || cfg_four(&backbone, &schedule, &device);
        let z = Tensor::<4>::from_floats([[[[1.0, -2.0]]], [[[0.5, 4.0]]]], &device);
        let plain = to_vec_f32(make().predict_eps(z.clone(), 300));
        let zero = to_vec_f32(
            make()
                .with_rescale(0.0)
                .unwrap()
                .predict_eps(z.clone(), 300),
        );
        assert_eq!(plain, zero);
        let rescaled = to_vec_f32(make().with_rescale(0.7).unwrap().predict_eps(z, 300));
        assert_ne!(plain, rescaled);
        for phi in [-0.1, 1.5, f64::NAN] {
            let e = make().with_rescale(phi).err().unwrap().to_string();
            assert!(e.starts_with("guidance_rescale = "), "{e}");
        }
    }

    #[test]
    fn cfg_in_a_sampling_loop_calls_the_backbone_once_per_step() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let backbone = stub();
        let cfg = cfg_four(&backbone, &schedule, &device);
        let ts = timesteps(&schedule, 7, TimestepSpacing::Trailing).unwrap();
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
