//! Stage 3 and the `pipeline` command: wiring data, the VAE and the diffusion model together.

pub mod builtin;
pub mod cli;
pub mod config;
pub mod interrupt;
pub mod progress;
pub mod run_dir;
pub mod train;
pub mod vae_stage;
