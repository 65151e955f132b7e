//! Stage 3 and the `pipeline` command: wiring data, the VAE and the diffusion model together.

pub mod builtin;
pub mod cli;
pub mod config;
pub mod ema;
pub mod generate;
pub mod latents;
pub mod interrupt;
pub mod progress;
pub mod recipe;
pub mod run_dir;
pub mod ldm_stage;
pub mod sampling;
pub mod train;
pub mod vae_stage;
