//! Turning a trained model into images: conditioning, guidance, the sampler, and the VAE
//! decoder. One place for it, used by the training previews and by `generate`.

use anyhow::{Result, bail};
use burn::tensor::{Device, Int, Shape, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use ldm_common::rng::{randn, stream};
use ldm_diffusion::backbone::BackboneModel;
use ldm_diffusion::denoiser::{Conditioning, Denoiser};
use ldm_diffusion::guidance::{ClassifierFreeGuidance, ModelDenoiser};
use ldm_diffusion::parameterization::Parameterization;
use ldm_diffusion::sampler::{SampleHooks, SamplerOptions, sample};
use ldm_diffusion::schedule::Schedule;

use crate::vae_stage::VaeRun;

/// The `[guidance]` section: the classifier-free guidance scale of previews (and the default
/// of `generate --cfg`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuidanceConfig {
    /// w in eps = eps_uncond + w (eps_cond - eps_uncond); 1 = no guidance.
    #[serde(default = "d_cfg")]
    pub cfg: f64,
}

fn d_cfg() -> f64 {
    3.0
}

impl Default for GuidanceConfig {
    fn default() -> Self {
        Self { cfg: d_cfg() }
    }
}

impl GuidanceConfig {
    pub fn validate(&self) -> Result<()> {
        if !self.cfg.is_finite() || self.cfg < 0.0 {
            bail!("guidance.cfg = {}: expected a number >= 0", self.cfg);
        }
        Ok(())
    }
}

/// What to sample.
pub struct Request<'a> {
    pub sampler: &'a SamplerOptions,
    /// One class per image (a class-conditional model), or `None` (unconditional).
    pub labels: Option<&'a [usize]>,
    /// Classes the model knows; the id `num_classes` is its learned null class.
    pub num_classes: usize,
    /// `[channels, side, side]` of a latent.
    pub latent_shape: [usize; 3],
    /// Classifier-free guidance scale; 1 disables it (one forward pass per step).
    pub cfg: f64,
    pub n: usize,
    pub seed: u64,
}

fn class_tensor(ids: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), Shape::new([ids.len()])),
        device,
    )
}

/// Samples `request.n` latents (in the diffusion model's scaled latent space).
///
/// # Shapes
/// - result: `[n, latent_channels, side, side]`
pub fn sample_latents(
    model: &BackboneModel,
    schedule: &Schedule,
    parameterization: Parameterization,
    request: &Request,
    device: &Device,
    progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
) -> Result<Tensor<4>> {
    let [c, h, w] = request.latent_shape;
    let x_t = randn(
        &mut stream(request.seed, "sample-start", 0),
        [request.n, c, h, w],
        device,
    );
    let mut hooks = SampleHooks::seeded(request.seed, device.clone());
    if let Some(p) = progress {
        hooks = hooks.with_progress(p);
    }
    let plain = |cond| ModelDenoiser {
        backbone: model,
        parameterization,
        schedule,
        cond,
    };
    // The conditional model, and with a scale other than 1 its classifier-free guidance
    // against the learned null class.
    let denoiser: Box<dyn Denoiser + '_> = match request.labels {
        None => Box::new(plain(Conditioning::none())),
        Some(labels) => {
            let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
            let cond = Conditioning {
                class: Some(class_tensor(&ids, device)),
                text: None,
            };
            if request.cfg == 1.0 {
                Box::new(plain(cond))
            } else {
                let null = vec![request.num_classes as i64; ids.len()];
                let uncond = Conditioning {
                    class: Some(class_tensor(&null, device)),
                    text: None,
                };
                Box::new(ClassifierFreeGuidance::new(
                    model,
                    parameterization,
                    schedule,
                    &cond,
                    &uncond,
                    request.cfg,
                )?)
            }
        }
    };
    let latents = sample(
        denoiser.as_ref(),
        schedule,
        x_t,
        request.sampler,
        &mut hooks,
    )?;
    Ok(latents)
}

/// Decodes diffusion latents to images in [-1, 1]: x = decode(z / latent_scale).
pub fn decode(vae: &VaeRun, latents: Tensor<4>) -> Tensor<4> {
    vae.model
        .decode(latents / vae.info.latent_scale)
        .clamp(-1.0, 1.0)
}
