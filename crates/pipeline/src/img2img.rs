//! Image-to-image (SDEdit, Meng et al. 2022) and inpainting.
//!
//! The init image is encoded with the VAE (posterior mean times the latent scale factor), noised
//! to the first of the sampler's last `floor(steps * strength)` timesteps with q(z_t | z_0), and
//! denoised from there by the chosen sampler and guidance. With a mask (white = repaint,
//! black = keep, as in diffusers), after every step the kept part of the latent is replaced by
//! the init latent noised to the level the sampler now stands at (the diffusers "legacy"
//! inpainting scheme; the last step restores it exactly).

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use image::DynamicImage;

use ldm_common::checkpoint::sha256_hex;
use ldm_common::image_io::decode_image;
use ldm_common::rng::{randn, stream};
use ldm_diffusion::denoiser::Denoiser;
use ldm_diffusion::process::q_sample;
use ldm_diffusion::sampler::{SampleHooks, sample_from};
use ldm_diffusion::schedule::Schedule;
use ldm_diffusion::spacing::for_strength;

use crate::sampling::Request;
use crate::vae_stage::VaeRun;

/// `--strength` when `--init-image` is given without it.
pub const DEFAULT_STRENGTH: f64 = 0.6;

/// An image supplied by the user: a file (`generate`) or bytes (an upload to `serve`).
#[derive(Debug, Clone)]
pub enum ImageInput {
    File { flag: String, path: PathBuf },
    Bytes { name: String, bytes: Vec<u8> },
}

impl ImageInput {
    /// How errors name it: `--init-image a.png`, or the upload's name.
    pub fn label(&self) -> String {
        match self {
            Self::File { flag, path } => format!("{flag} {}", path.display()),
            Self::Bytes { name, .. } => name.clone(),
        }
    }

    /// The raw bytes (a file is read whole; images are small next to the decoder's limits).
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Self::File { path, .. } => std::fs::read(path)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.label())),
            Self::Bytes { bytes, .. } => Ok(std::borrow::Cow::Borrowed(bytes)),
        }
    }
}

/// What the user asked for: `--init-image`, `--strength`, `--mask`.
#[derive(Debug, Clone)]
pub struct Img2ImgArgs {
    pub init: ImageInput,
    /// In (0, 1]: the fraction of the sampler's steps that run (1 = from pure noise).
    pub strength: f64,
    pub mask: Option<ImageInput>,
}

/// The img2img flags of `generate`, checked together: `--strength` and `--mask` need
/// `--init-image`, and the strength lies in (0, 1].
pub fn from_flags(
    init_image: Option<PathBuf>,
    strength: Option<f64>,
    mask: Option<PathBuf>,
) -> Result<Option<Img2ImgArgs>> {
    let Some(path) = init_image else {
        if mask.is_some() {
            bail!("--mask needs --init-image: inpainting repaints the white part of an init image");
        }
        if let Some(s) = strength {
            bail!("--strength {s} needs --init-image: it says how far that image is noised");
        }
        return Ok(None);
    };
    let strength = strength.unwrap_or(DEFAULT_STRENGTH);
    check_strength(strength)?;
    Ok(Some(Img2ImgArgs {
        init: ImageInput::File {
            flag: "--init-image".into(),
            path,
        },
        strength,
        mask: mask.map(|path| ImageInput::File {
            flag: "--mask".into(),
            path,
        }),
    }))
}

/// Strength must lie in (0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        bail!(
            "--strength {strength}: expected a number in (0, 1] (1 = start from pure noise, near 0 = stay close to --init-image)"
        );
    }
    Ok(())
}

/// The init image in latent space, and the kept region of inpainting.
pub struct InitLatent {
    /// z_0 = latent_scale * mean of q(z | x). Shape `[1, c, h, w]`.
    pub z0: Tensor<4>,
    /// 1 where the latent is kept from the init image, 0 where it is repainted; `None` repaints
    /// everything. Shape `[1, 1, h, w]`.
    pub keep: Option<Tensor<4>>,
    pub strength: f64,
    pub init_sha256: String,
    pub mask_sha256: Option<String>,
}

/// Pixels of `img` as `channels` channels (1 = luma, 3 = RGB) in `[c, h, w]` order.
fn planar(img: &DynamicImage, channels: usize) -> Vec<u8> {
    if channels == 1 {
        return img.to_luma8().into_raw();
    }
    let rgb = img.to_rgb8().into_raw();
    let hw = rgb.len() / 3;
    (0..3 * hw).map(|i| rgb[(i % hw) * 3 + i / hw]).collect()
}

/// Keep-mask on the latent grid from a full-resolution repaint mask (`true` = repaint): a
/// latent cell is repainted when any pixel of its `factor x factor` block is (max pooling), so
/// everything marked white is repainted. Returns `(height / factor) * (width / factor)` values,
/// 1 = keep, 0 = repaint.
pub fn latent_keep_mask(repaint: &[bool], height: usize, width: usize, factor: usize) -> Vec<f32> {
    let (lh, lw) = (height / factor, width / factor);
    (0..lh * lw)
        .map(|cell| {
            let (cy, cx) = (cell / lw, cell % lw);
            let any = (0..factor).any(|dy| {
                (0..factor).any(|dx| repaint[(cy * factor + dy) * width + cx * factor + dx])
            });
            if any { 0.0 } else { 1.0 }
        })
        .collect()
}

/// Encodes the init image (and the mask) for a model whose images are `vae.info.image_shape`.
/// An image of another size is an error naming both sizes; grayscale and RGB are converted to
/// the model's channel count.
pub fn prepare(vae: &VaeRun, args: &Img2ImgArgs, device: &Device) -> Result<InitLatent> {
    check_strength(args.strength)?;
    let [c, h, w] = vae.info.image_shape;
    let bytes = args.init.bytes()?;
    let img = decode_image(&bytes, &args.init.label())?;
    if (img.width() as usize, img.height() as usize) != (w, h) {
        bail!(
            "{}: {}x{} pixels, but the model makes {w}x{h} images; resize it to {w}x{h}",
            args.init.label(),
            img.width(),
            img.height()
        );
    }
    let init_sha256 = sha256_hex(&bytes);
    let values: Vec<f32> = planar(&img, c)
        .iter()
        .map(|&p| f32::from(p) / 127.5 - 1.0)
        .collect();
    let x = Tensor::<4>::from_data(TensorData::new(values, [1, c, h, w]), device);
    let z0 = vae.model.encode(x).mean * vae.info.latent_scale;
    let [_, _, lh, lw] = z0.dims();
    let (keep, mask_sha256) = match &args.mask {
        None => (None, None),
        Some(mask) => {
            let bytes = mask.bytes()?;
            let m = decode_image(&bytes, &mask.label())?;
            if (m.width(), m.height()) != (img.width(), img.height()) {
                bail!(
                    "{}: {}x{} pixels, but {} is {w}x{h}; the mask must have the init image's size",
                    mask.label(),
                    m.width(),
                    m.height(),
                    args.init.label()
                );
            }
            let repaint: Vec<bool> = m.to_luma8().into_raw().iter().map(|&p| p >= 128).collect();
            let keep = latent_keep_mask(&repaint, h, w, h / lh);
            let keep = Tensor::<4>::from_data(TensorData::new(keep, [1, 1, lh, lw]), device);
            (Some(keep), Some(sha256_hex(&bytes)))
        }
    };
    Ok(InitLatent {
        z0,
        keep,
        strength: args.strength,
        init_sha256,
        mask_sha256,
    })
}

/// The known latent at the level the sampler stands at: q_sample(z_0, t, eps) at `t`, or z_0
/// itself after the last step (`None`).
pub fn known_at(
    schedule: &Schedule,
    z0: Tensor<4>,
    noise: Tensor<4>,
    t: Option<usize>,
) -> Tensor<4> {
    match t {
        Some(t) => {
            let [n, ..] = z0.dims();
            q_sample(schedule, z0, &vec![t; n], noise)
        }
        None => z0,
    }
}

/// The inpainting step: x <- keep * known + (1 - keep) * x, `keep` broadcast over batch and
/// channels.
///
/// # Shapes
/// - `x`, `known`: `[n, c, h, w]`; `keep`: `[1, 1, h, w]`
pub fn replace_known(x: Tensor<4>, known: Tensor<4>, keep: Tensor<4>) -> Tensor<4> {
    let repaint = keep.clone().neg() + 1.0;
    x * repaint + known * keep
}

/// Samples `request.n` latents from the init latent: z_{t_0} = q_sample(z_0, t_0, eps) with
/// eps from the seed, then the sampler over the truncated timesteps, replacing the kept region
/// after every step when there is a mask.
pub fn sample<'a>(
    model: &dyn Denoiser,
    schedule: &'a Schedule,
    init: &'a InitLatent,
    request: &Request,
    hooks: SampleHooks<'a>,
    device: &Device,
) -> Result<Tensor<4>> {
    let all = request.sampler.timesteps(schedule)?;
    let timesteps = for_strength(&all, init.strength).map_err(|_| {
        anyhow::anyhow!(
            "--strength {} keeps no step of the {}-step sampler (steps x strength < 1); raise --strength or --steps",
            init.strength,
            all.len()
        )
    })?;
    let [c, h, w] = request.latent_shape;
    let n = request.n;
    let z0 = init.z0.clone().expand([n, c, h, w]);
    let noise = randn(
        &mut stream(request.seed, "img2img-noise", 0),
        [n, c, h, w],
        device,
    );
    let x = known_at(schedule, z0.clone(), noise.clone(), Some(timesteps[0]));
    let mut hooks = match &init.keep {
        None => hooks,
        Some(keep) => hooks.with_after_step(move |_step, t_next, x| {
            let known = known_at(schedule, z0.clone(), noise.clone(), t_next);
            replace_known(x, known, keep.clone())
        }),
    };
    Ok(sample_from(
        model,
        schedule,
        x,
        &timesteps,
        request.sampler,
        &mut hooks,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldm_common::tensor::to_vec_f32;
    use ldm_diffusion::schedule::ScheduleConfig;

    #[test]
    fn any_white_pixel_repaints_its_latent_cell() {
        // 8x8 image, factor 4 -> 2x2 latent; one white pixel in the top-right block, a full
        // bottom row of white in the bottom-left block.
        let mut repaint = vec![false; 64];
        repaint[2 * 8 + 6] = true;
        for x in 0..4 {
            repaint[7 * 8 + x] = true;
        }
        assert_eq!(latent_keep_mask(&repaint, 8, 8, 4), [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(latent_keep_mask(&[false; 64], 8, 8, 2), vec![1.0; 16]);
        assert_eq!(latent_keep_mask(&[true; 64], 8, 8, 8), [0.0]);
    }

    #[test]
    fn replace_keeps_the_known_region_at_the_current_noise_level() {
        let device = Device::flex();
        let schedule = Schedule::new(&ScheduleConfig::default()).unwrap();
        let z0 =
            Tensor::<4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device).expand([2, 1, 2, 2]);
        let noise = Tensor::<4>::from_floats(
            [[[[0.5, -0.5], [1.0, 0.0]]], [[[-1.0, 2.0], [0.25, 0.75]]]],
            &device,
        );
        let x = Tensor::<4>::full([2, 1, 2, 2], 9.0, &device);
        // keep the left column, repaint the right one
        let keep = Tensor::<4>::from_floats([[[[1.0, 0.0], [1.0, 0.0]]]], &device);
        let t = 600;
        let known = known_at(&schedule, z0.clone(), noise.clone(), Some(t));
        let out = to_vec_f32(replace_known(x.clone(), known, keep.clone()));
        let (a, s) = (
            schedule.sqrt_alphas_cumprod[t],
            schedule.sqrt_one_minus_alphas_cumprod[t],
        );
        let z = [1.0, 2.0, 3.0, 4.0];
        let e = to_vec_f32(noise.clone());
        for i in 0..8 {
            let expected = if i % 2 == 0 {
                a * z[i % 4] + s * f64::from(e[i])
            } else {
                9.0
            };
            assert!((f64::from(out[i]) - expected).abs() < 1e-5, "{i}: {out:?}");
        }
        // After the last step the kept region is the init latent exactly.
        let known = known_at(&schedule, z0, noise, None);
        let out = to_vec_f32(replace_known(x, known, keep));
        assert_eq!(out, [1.0, 9.0, 3.0, 9.0, 1.0, 9.0, 3.0, 9.0]);
    }

    #[test]
    fn flags_are_checked_together() {
        let p = || Some(PathBuf::from("a.png"));
        let e = |r: Result<Option<Img2ImgArgs>>| r.unwrap_err().to_string();
        assert!(e(from_flags(None, None, p())).starts_with("--mask needs --init-image"));
        assert!(e(from_flags(None, Some(0.5), None)).starts_with("--strength 0.5 needs"));
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(
                e(from_flags(p(), Some(bad), None)).contains("expected a number in (0, 1]"),
                "{bad}"
            );
        }
        assert_eq!(
            from_flags(p(), None, None).unwrap().unwrap().strength,
            DEFAULT_STRENGTH
        );
        assert!(from_flags(None, None, None).unwrap().is_none());
    }

    #[test]
    fn rgb_pixels_are_planar() {
        let img = DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap(),
        );
        assert_eq!(planar(&img, 3), [1, 4, 2, 5, 3, 6]);
        assert_eq!(planar(&img, 1).len(), 2);
    }
}
