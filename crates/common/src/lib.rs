//! Shared pieces of the three stages: data sets, images, checkpoints, devices and seeded noise.

pub mod activation;
pub mod adamw;
pub mod alloc;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod fast_math;
pub mod flex;
pub mod gemm_conv;
pub mod group_norm;
pub mod home;
pub mod image_io;
pub mod layers;
pub mod lerp;
pub mod linear;
pub mod matmul;
pub mod nn;
pub mod per_device;
pub mod precision;
pub mod rng;
pub mod tensor;
#[cfg(test)]
mod testing;
pub mod threads;
#[cfg(feature = "tch")]
pub mod torch_ops;
pub mod upload;
pub mod upsample;
pub mod weights;

pub use error::{CommonError, Result};
