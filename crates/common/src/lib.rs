//! Shared pieces of the three stages: data sets, images, checkpoints, devices and seeded noise.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod image_io;
pub mod nn;
pub mod precision;
pub mod rng;
pub mod tensor;
pub mod weights;

pub use error::{CommonError, Result};
