//! What `GET /api/model` says about the loaded model, and what the request checks need of it
//! (kept apart from the weights, which live on the worker thread).

use std::path::PathBuf;

use serde::Serialize;

use ldm_diffusion::sampler::{SamplerKind, SamplerOptions};
use ldm_diffusion::schedule::Schedule;
use ldm_diffusion::spacing::TimestepSpacing;

use crate::ldm_stage::{LdmRun, LdmRunConfig};

/// How the model was made: its LDM config and training length, and its VAE.
#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub ldm_config: LdmRunConfig,
    pub ldm_steps: u64,
    pub vae: PathBuf,
    pub vae_steps: u64,
    pub latent_scale: f64,
}

/// The server's limits, as flags set them.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Most images per request.
    pub max_images: usize,
    /// Requests that may wait while one runs.
    pub queue: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

/// The body of `GET /api/model`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub model: PathBuf,
    pub model_sha256: String,
    pub vae_sha256: String,
    pub device: String,
    pub recipe: Recipe,
    /// What the model follows: `"class"`, `"none"` (as its config says).
    pub conditioning: String,
    pub classes: Vec<String>,
    pub samplers: Vec<&'static str>,
    /// The timestep spacings a request may name (`spacing`).
    pub spacings: Vec<&'static str>,
    pub default_sampler: SamplerOptions,
    /// The classifier-free guidance scale used when a request gives none.
    pub default_cfg: f64,
    /// T: steps may be 1 to T.
    pub timesteps: usize,
    /// `[channels, height, width]` of a generated image.
    pub image_shape: [usize; 3],
    pub latent_shape: [usize; 3],
    /// The noisy-latent classifier behind `classifier_scale` (`serve --classifier`), if any.
    pub classifier: Option<PathBuf>,
    /// The fields `POST /api/generate` accepts.
    pub fields: &'static [&'static str],
    pub limits: Limits,
    #[serde(skip)]
    pub schedule: Schedule,
}

impl ModelInfo {
    /// Describes a loaded run (limits are filled in by the server).
    pub fn of(run: &LdmRun, device: &str) -> Self {
        Self {
            model: std::path::absolute(&run.dir).unwrap_or_else(|_| run.dir.clone()),
            model_sha256: run.info.weights_sha256.clone(),
            vae_sha256: run.info.vae_sha256.clone(),
            device: device.to_string(),
            recipe: Recipe {
                ldm_config: run.config.clone(),
                ldm_steps: run.info.steps,
                vae: std::path::absolute(&run.vae.dir).unwrap_or_else(|_| run.vae.dir.clone()),
                vae_steps: run.vae.info.steps,
                latent_scale: run.vae.info.latent_scale,
            },
            conditioning: serde_json::to_value(run.config.diffusion.conditioning)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            classes: run.info.class_names.clone(),
            samplers: SamplerKind::ALL.iter().map(|k| k.name()).collect(),
            spacings: TimestepSpacing::ALL.iter().map(|s| s.name()).collect(),
            default_sampler: run.config.sampler.clone(),
            default_cfg: run.config.guidance.cfg,
            timesteps: run.schedule.num_timesteps(),
            image_shape: run.vae.info.image_shape,
            latent_shape: run.info.latent_shape,
            classifier: None,
            fields: super::request::FIELDS,
            limits: Limits {
                max_images: 0,
                queue: 0,
                max_body_bytes: 0,
            },
            schedule: run.schedule.clone(),
        }
    }

    pub fn class_conditional(&self) -> bool {
        self.conditioning == "class"
    }
}
