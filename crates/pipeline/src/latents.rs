//! The latent cache: training images are encoded once by the trained VAE, scaled by its latent
//! scale factor, and kept on disk beside the LDM run with the checksum of the VAE they came
//! from. A cache made by another VAE is refused rather than silently reused.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{atomic_write, read_json, write_json};
use ldm_common::data::ImageSet;
use ldm_common::rng::{randn, stream};
use ldm_common::tensor::to_vec_f32;
use ldm_common::upload;

use crate::vae_stage::VaeRun;

/// Which latent of q(z|x) is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentSource {
    /// The posterior mean (deterministic; the usual choice for small VAEs).
    Mean,
    /// One posterior sample z = mu + sigma * eps, drawn once from the seed.
    Sample,
}

/// `meta.json` of a cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheMeta {
    pub vae_sha256: String,
    pub source: LatentSource,
    pub seed: u64,
    pub count: usize,
    /// `[channels, side, side]`.
    pub shape: [usize; 3],
    pub latent_scale: f64,
}

/// Scaled latents of a whole split, in host memory.
pub struct LatentSet {
    pub meta: CacheMeta,
    /// `count * c * h * w` values, already multiplied by the latent scale.
    pub values: Vec<f32>,
    pub labels: Vec<usize>,
}

impl LatentSet {
    /// The latents at `indices`. Shape `[indices.len(), c, h, w]`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Tensor<4> {
        let [c, h, w] = self.meta.shape;
        let per = c * h * w;
        let mut out = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            out.extend_from_slice(&self.values[i * per..(i + 1) * per]);
        }
        upload::float(out, [indices.len(), c, h, w], device)
    }
}

fn files(dir: &Path, split: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{split}.meta.json")),
        dir.join(format!("{split}.f32")),
    )
}

/// Loads the cache of `split` from `dir`, or encodes `images` with the VAE and writes it.
/// A cache written by another VAE (checksum mismatch) is an error naming both.
pub fn load_or_encode(
    dir: &Path,
    split: &str,
    vae: &VaeRun,
    images: &ImageSet,
    source: LatentSource,
    seed: u64,
    device: &Device,
) -> Result<LatentSet> {
    let (meta_path, data_path) = files(dir, split);
    let [c, h, w] = vae.info.latent_shape;
    let wanted = CacheMeta {
        vae_sha256: vae.info.weights_sha256.clone(),
        source,
        seed,
        count: images.labels.len(),
        shape: [c, h, w],
        latent_scale: vae.info.latent_scale,
    };
    if meta_path.exists() {
        let meta: CacheMeta = read_json(&meta_path)?;
        if meta.vae_sha256 != wanted.vae_sha256 {
            bail!(
                "{}: this latent cache was encoded by another VAE (sha256 {}…), not {} (sha256 {}…); delete the cache folder or use another --out",
                meta_path.display(),
                &meta.vae_sha256[..12.min(meta.vae_sha256.len())],
                vae.dir.display(),
                &wanted.vae_sha256[..12]
            );
        }
        if meta == wanted {
            let bytes = std::fs::read(&data_path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", data_path.display()))?;
            if bytes.len() == meta.count * c * h * w * 4 {
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                return Ok(LatentSet {
                    meta,
                    values,
                    labels: images.labels.clone(),
                });
            }
        }
    }
    let scale = vae.info.latent_scale as f32;
    let mut values = Vec::with_capacity(images.labels.len() * c * h * w);
    let indices: Vec<usize> = (0..images.labels.len()).collect();
    for (k, chunk) in indices.chunks(500).enumerate() {
        let q = vae.model.encode(images.batch(chunk, device));
        let z = match source {
            LatentSource::Mean => q.mean,
            LatentSource::Sample => {
                let eps = randn(
                    &mut stream(seed, &format!("latent-cache-{split}"), k as u64),
                    q.mean.dims(),
                    device,
                );
                q.sample(eps)
            }
        };
        values.extend(to_vec_f32(z * scale));
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    atomic_write(&data_path, &bytes)?;
    write_json(&meta_path, &wanted)?;
    Ok(LatentSet {
        meta: wanted,
        values,
        labels: images.labels.clone(),
    })
}
