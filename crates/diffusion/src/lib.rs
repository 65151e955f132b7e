//! Stage 2: latent diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
//! Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").
//!
//! The math (schedules, q(z_t|z_0), posteriors, parameterizations, losses, samplers) never
//! imports a network; the networks never know which sampler runs them. They meet in
//! [`denoiser`]: a [`Backbone`](denoiser::Backbone) is a network `(z_t, t, cond) -> output`, a
//! [`Denoiser`](denoiser::Denoiser) is what samplers call.

pub mod denoiser;
pub mod error;

// -- math (schedules, parameterizations, losses, samplers) --
pub mod clip;
pub mod guidance;
pub mod loss;
pub mod parameterization;
pub mod process;
pub mod sampler;
pub mod schedule;
pub mod spacing;
pub mod training_table;

// -- networks (embeddings, U-Net, DiT, text encoder) --
pub mod attention;
pub mod backbone;
pub mod dit;
pub mod embedding;
pub mod flops;
pub mod ldm_model;
pub mod noisy_classifier;
pub mod text_encoder;
pub mod unet;
