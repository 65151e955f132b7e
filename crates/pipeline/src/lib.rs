//! Stage 3 and the `pipeline` command: wiring data, the VAE and the diffusion model together.

pub mod bench;
pub mod builtin;
pub mod chart;
pub mod classifier_stage;
pub mod cli;
pub mod config;
pub mod ema;
pub mod evaluator_stage;
pub mod generate;
pub mod img2img;
pub mod interrupt;
pub mod latents;
pub mod ldm_stage;
pub mod overrides;
pub mod plot;
pub mod plot_sweep;
pub mod progress;
pub mod recipe;
pub mod reference_evaluator;
pub mod resume_check;
pub mod run_dir;
pub mod sampling;
pub mod serve;
pub mod text;
pub mod train;
pub mod vae_stage;
