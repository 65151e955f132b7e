//! Turning a trained model into images: conditioning, guidance, the sampler, and the VAE
//! decoder. One place for it, used by the training previews and by `generate`.

use std::cell::RefCell;

use anyhow::{Result, bail};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use ldm_common::rng::{randn, stream};
use ldm_common::upload;
use ldm_diffusion::clip::ClipX0;
use ldm_diffusion::denoiser::{Conditioning, Denoiser, TextConditioning};
use ldm_diffusion::guidance::{ClassifierFreeGuidance, ClassifierGuidance, ModelDenoiser};
use ldm_diffusion::ldm_model::LdmModel;
use ldm_diffusion::noisy_classifier::NoisyClassifier;
use ldm_diffusion::parameterization::{Parameterization, eps_to_x0};
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
    /// The class of the unconditional branch of classifier-free guidance (a negative prompt
    /// naming a class); `None`: the learned null class.
    pub negative_class: Option<usize>,
    /// A text model's conditioning: the prompts' encodings and the unconditional branch's
    /// (the negative or the empty prompt), `n` of each; `labels` is then `None`.
    pub text: Option<(TextConditioning, TextConditioning)>,
    /// `[channels, side, side]` of a latent.
    pub latent_shape: [usize; 3],
    /// Classifier-free guidance scale; 1 disables it (one forward pass per step).
    pub cfg: f64,
    pub n: usize,
    pub seed: u64,
}

fn class_tensor(ids: &[i64], device: &Device) -> Tensor<1, Int> {
    upload::int(ids.to_vec(), [ids.len()], device)
}

/// Classifier guidance (Dhariwal & Nichol 2021): a noisy-latent classifier, the class of each
/// image, and the scale s in eps - s sqrt(1 - alphabar_t) grad log p(y | z_t).
#[derive(Clone, Copy)]
pub struct ClassifierGuide<'a> {
    pub classifier: &'a NoisyClassifier,
    pub labels: &'a [usize],
    pub scale: f64,
}

/// What may change a plain sampling run: an init latent to start from (image-to-image,
/// inpainting) and classifier guidance around the (classifier-free guided) model; or what it
/// may record: the clean-latent estimate of every step.
#[derive(Clone, Copy, Default)]
pub struct SampleExtras<'a> {
    pub init: Option<&'a crate::img2img::InitLatent>,
    pub classifier: Option<ClassifierGuide<'a>>,
    pub trajectory: Option<&'a Trajectory>,
}

/// The clean-latent estimates of a sampling run, one per sampler step (`generate
/// --trajectory`): after step i, the x0 = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) of the last
/// network answer the sampler used, with guidance, classifier guidance and clipping applied.
#[derive(Default)]
pub struct Trajectory {
    steps: RefCell<Vec<Tensor<4>>>,
}

impl Trajectory {
    /// The recorded estimates, in step order (`[n, c, h, w]` each).
    pub fn take(&self) -> Vec<Tensor<4>> {
        self.steps.take()
    }
}

/// A denoiser that keeps the x0 of its last answer.
struct Recording<'a> {
    inner: &'a dyn Denoiser,
    schedule: &'a Schedule,
    last: RefCell<Option<Tensor<4>>>,
}

impl Denoiser for Recording<'_> {
    fn predict_eps(&self, z_t: Tensor<4>, t: usize) -> Tensor<4> {
        let eps = self.inner.predict_eps(z_t.clone(), t);
        self.last
            .replace(Some(eps_to_x0(self.schedule, z_t, eps.clone(), t)));
        eps
    }
}

/// Samples `request.n` latents (in the diffusion model's scaled latent space).
///
/// # Shapes
/// - result: `[n, latent_channels, side, side]`
pub fn sample_latents(
    model: &LdmModel,
    schedule: &Schedule,
    parameterization: Parameterization,
    request: &Request,
    device: &Device,
    progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
) -> Result<Tensor<4>> {
    sample_latents_with(
        model,
        schedule,
        parameterization,
        request,
        SampleExtras::default(),
        device,
        progress,
    )
}

/// [`sample_latents`] from an init latent and/or with classifier guidance.
pub fn sample_latents_with(
    model: &LdmModel,
    schedule: &Schedule,
    parameterization: Parameterization,
    request: &Request,
    extras: SampleExtras,
    device: &Device,
    progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
) -> Result<Tensor<4>> {
    let plain = |cond| ModelDenoiser {
        backbone: model,
        parameterization,
        schedule,
        cond,
    };
    // The conditional model, and with a scale other than 1 its classifier-free guidance
    // against the learned null class (or the negative class), or against the empty (or
    // negative) prompt.
    let pair = match (request.labels, &request.text) {
        (Some(labels), _) => {
            let ids: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
            let null = request.negative_class.unwrap_or(request.num_classes) as i64;
            let class = |ids: &[i64]| Conditioning {
                class: Some(class_tensor(ids, device)),
                text: None,
            };
            Some((class(&ids), class(&vec![null; ids.len()])))
        }
        (None, Some((cond, uncond))) => {
            let text = |t: &TextConditioning| Conditioning {
                class: None,
                text: Some(t.clone()),
            };
            Some((text(cond), text(uncond)))
        }
        (None, None) => None,
    };
    let denoiser: Box<dyn Denoiser + '_> = match pair {
        None => Box::new(plain(Conditioning::none())),
        Some((cond, _)) if request.cfg == 1.0 => Box::new(plain(cond)),
        Some((cond, uncond)) => Box::new(
            ClassifierFreeGuidance::new(
                model,
                parameterization,
                schedule,
                &cond,
                &uncond,
                request.cfg,
            )?
            .with_rescale(request.sampler.guidance_rescale)?,
        ),
    };
    // Classifier guidance wraps whatever the model answers (cfg 1: the classifier alone).
    let guided;
    let denoiser: &dyn Denoiser = match extras.classifier {
        None => denoiser.as_ref(),
        Some(g) => {
            if g.labels.len() != request.n {
                bail!(
                    "classifier guidance: {} labels for {} images",
                    g.labels.len(),
                    request.n
                );
            }
            guided = ClassifierGuidance {
                inner: denoiser.as_ref(),
                schedule,
                grad_log_prob: move |z: Tensor<4>, t: usize| {
                    g.classifier.grad_log_prob(z, t, g.labels)
                },
                scale: g.scale,
            };
            &guided
        }
    };
    // x0 clipping wraps everything, as diffusers clips after guidance.
    let clipped;
    let denoiser: &dyn Denoiser = match request.sampler.clip_x0 {
        None => denoiser,
        Some(range) => {
            clipped = ClipX0 {
                inner: denoiser,
                schedule,
                range,
            };
            &clipped
        }
    };
    // The trajectory records the outermost answer, after every step.
    let recording = extras.trajectory.map(|_| Recording {
        inner: denoiser,
        schedule,
        last: RefCell::new(None),
    });
    let denoiser: &dyn Denoiser = match &recording {
        Some(r) => r,
        None => denoiser,
    };
    let mut progress = progress;
    let mut hooks = SampleHooks::seeded(request.seed, device.clone());
    if progress.is_some() || recording.is_some() {
        hooks = hooks.with_progress(|done, total| {
            if let (Some(r), Some(t)) = (&recording, extras.trajectory)
                && let Some(x0) = r.last.borrow().clone()
            {
                t.steps.borrow_mut().push(x0);
            }
            progress.as_mut().is_none_or(|p| p(done, total))
        });
    }
    if let Some(init) = extras.init {
        return crate::img2img::sample(denoiser, schedule, init, request, hooks, device);
    }
    let [c, h, w] = request.latent_shape;
    let x_t = randn(
        &mut stream(request.seed, "sample-start", 0),
        [request.n, c, h, w],
        device,
    );
    let latents = sample(denoiser, schedule, x_t, request.sampler, &mut hooks)?;
    Ok(latents)
}

/// Decodes diffusion latents to images in [-1, 1]: x = decode(z / latent_scale).
pub fn decode(vae: &VaeRun, latents: Tensor<4>) -> Tensor<4> {
    vae.model
        .decode(latents / vae.info.latent_scale)
        .clamp(-1.0, 1.0)
}
