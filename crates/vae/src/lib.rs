//! Stage 1: a convolutional VAE (Kingma & Welling 2014) compressing images to a spatial latent,
//! as the first stage of latent diffusion (Rombach et al. 2022).

pub mod blocks;
pub mod config;
pub mod error;
pub mod loss;
pub mod model;

pub use config::{Reconstruction, VaeConfig};
pub use error::VaeError;
pub use loss::VaeLoss;
pub use model::{Posterior, Vae};
