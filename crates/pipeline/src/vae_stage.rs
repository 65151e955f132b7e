//! Stage 1 wired to data and disk: `pipeline train-vae` and `pipeline eval-vae`, and
//! [`VaeRun`], a trained VAE loaded from its run folder.
//!
//! A VAE run folder holds `config.toml` (the resolved config), `model.safetensors`,
//! `vae.json` (latent scale factor, shapes, class names, checksum), `metrics.csv`,
//! `samples/step-*.png` and `checkpoint/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{ensure_writable_dir, read_json, sha256_file, write_json};
use ldm_common::data::{self, BatchOrder, DataConfig, ImageSet, Splits};
use ldm_common::image_io::write_grid;
use ldm_common::rng::{randn, stream};
use ldm_common::tensor::to_vec_f32;
use ldm_common::weights::{load_safetensors, save_safetensors};
use ldm_vae::{Vae, VaeConfig};

use crate::run_dir::InitFrom;
use crate::train::parallel::take_rows;
use crate::train::{self, Outcome, ShardedTask, TrainConfig, TrainTask};

/// A `train-vae` config file: `[data]`, `[vae]`, `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeRunConfig {
    pub data: DataConfig,
    #[serde(default)]
    pub vae: VaeConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// What `vae.json` records about a trained VAE.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeInfo {
    /// 1 / std of encoded training latents: the diffusion stage sees z * latent_scale.
    pub latent_scale: f64,
    /// `[channels, side, side]` of a latent.
    pub latent_shape: [usize; 3],
    /// `[channels, side, side]` of an image.
    pub image_shape: [usize; 3],
    pub class_names: Vec<String>,
    pub steps: u64,
    /// SHA-256 of `model.safetensors`.
    pub weights_sha256: String,
    /// The run whose weights training started from (`--init-from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
}

/// A trained VAE and what is known about it.
pub struct VaeRun {
    pub dir: PathBuf,
    pub config: VaeRunConfig,
    pub info: VaeInfo,
    pub model: Vae,
}

impl VaeRun {
    /// Loads a run folder written by `train-vae`, saying what is missing if it is incomplete.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let how = format!("pipeline train-vae --out {}", dir.display());
        crate::run_dir::require(
            dir,
            "VAE run",
            &["config.toml", "vae.json", "model.safetensors"],
            &how,
        )?;
        let config: VaeRunConfig = crate::config::read(&dir.join("config.toml"))?;
        let mut info: VaeInfo = read_json(&dir.join("vae.json"))?;
        info.weights_sha256 =
            crate::run_dir::weights_sha256(dir, "vae.json", &info.weights_sha256)?;
        let model = Vae::new(&config.vae, info.image_shape[0], device);
        let model = load_safetensors(model, &dir.join("model.safetensors"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            info,
            model,
        })
    }
}

/// Flags of `train-vae` that override config keys: `--data`, and those of every training
/// command.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data: Option<PathBuf>,
    pub train: crate::train::TrainOverrides,
}

impl Overrides {
    /// Applies the flags to `[data]` and `[train]`.
    pub fn apply(&self, data: &mut DataConfig, train: &mut TrainConfig) {
        if let Some(dir) = &self.data {
            data.dir = Some(dir.clone());
        }
        self.train.apply(train);
    }
}

struct VaeTask {
    config: VaeConfig,
    train: ImageSet,
    order: BatchOrder,
    seed: u64,
    device: Device,
    latent_shape: [usize; 3],
    /// Fixed held-out images shown in every sample grid.
    preview: Tensor<4>,
    run_dir: PathBuf,
}

impl TrainTask for VaeTask {
    type Model = Vae;

    fn metric_names(&self) -> Vec<&'static str> {
        vec!["recon", "kl", "loss"]
    }

    fn forward(&mut self, model: &Vae, step: u64) -> (Tensor<1>, Vec<Tensor<1>>) {
        let indices = self.order.batch(step);
        let device = self.device.clone();
        self.forward_rows(model, step, &indices, 0..indices.len(), &device)
    }

    fn write_samples(&mut self, model: &Vae, step: u64) -> Result<()> {
        let device = self.preview.device();
        let preview = self.preview.clone().to_device(&device);
        let n = preview.dims()[0];
        let reconstruction = model.decode(model.encode(preview.clone()).mean);
        let [c, h, w] = self.latent_shape;
        let z = randn(
            &mut stream(self.seed, "vae-prior-samples", 0),
            [n, c, h, w],
            &device,
        );
        let samples = model.decode(z);
        let grid = Tensor::cat(vec![preview, reconstruction, samples], 0);
        let path = self
            .run_dir
            .join("samples")
            .join(format!("step-{step:06}.png"));
        write_grid(&path, grid, n)?;
        Ok(())
    }
}

impl ShardedTask for VaeTask {
    fn batch_indices(&mut self, step: u64) -> Vec<usize> {
        self.order.batch(step)
    }

    fn forward_rows(
        &self,
        model: &Vae,
        step: u64,
        indices: &[usize],
        rows: std::ops::Range<usize>,
        device: &Device,
    ) -> (Tensor<1>, Vec<Tensor<1>>) {
        let x = self.train.batch(&indices[rows.clone()], device);
        let [c, h, w] = self.latent_shape;
        let eps = randn(
            &mut stream(self.seed, "vae-eps", step),
            [indices.len(), c, h, w],
            device,
        );
        let out = model.loss(x, take_rows(eps, &rows), &self.config);
        (out.loss.clone(), vec![out.recon, out.kl, out.loss])
    }
}

/// The latent scale factor 1 / std(z) over posterior samples of up to 2048 training images
/// (Rombach et al. 2022, section G: "rescale the latent to unit standard deviation").
pub fn latent_scale(model: &Vae, images: &ImageSet, seed: u64, device: &Device) -> f64 {
    let n = images.labels.len().min(2048);
    let mut order = BatchOrder::new(seed, images.labels.len(), n);
    let indices = order.batch(0);
    let mut values = Vec::new();
    for (k, chunk) in indices.chunks(256).enumerate() {
        let q = model.encode(images.batch(chunk, device));
        let eps = randn(
            &mut stream(seed, "latent-scale", k as u64),
            q.mean.dims(),
            device,
        );
        values.extend(to_vec_f32(q.sample(eps)));
    }
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / values.len() as f64;
    1.0 / var.sqrt().max(1e-8)
}

/// What `train-vae` reports when it finishes.
pub struct VaeSummary {
    pub out: PathBuf,
    pub latent_scale: f64,
    pub steps: u64,
}

/// `pipeline train-vae`: trains, writes the run folder, and returns its summary, or `None`
/// when Ctrl-C stopped it after saving a checkpoint.
pub fn train_vae(
    config_path: &Path,
    overrides: &Overrides,
    out: &Path,
    device: &Device,
    resume: bool,
) -> Result<Option<VaeSummary>> {
    let mut config: VaeRunConfig = crate::overrides::read(config_path, &overrides.train.sets)?;
    overrides.apply(&mut config.data, &mut config.train);
    config.train.validate().map_err(anyhow::Error::msg)?;
    config.vae.validate(config.data.resolution)?;
    let device = &train::parallel::main_device(&config.train, device)?;
    ensure_writable_dir(out)?;
    let Splits { train, held_out } = data::load(&config.data)?;
    let resolution = config.data.resolution;
    let latent_side = config.vae.latent_size(resolution);
    let latent_shape = [config.vae.latent_channels, latent_side, latent_side];
    let channels = config.data.channels;

    crate::resume_check::check(out, &config, resume)?;
    crate::run_dir::write_config(out, &config)?;
    let ad = device.clone().autodiff();
    ad.seed(config.train.seed);
    let model = Vae::new(&config.vae, channels, &ad);
    let source = config.train.init_from.as_deref();
    let model = InitFrom::start(out, source, resume, model, |model, src| {
        crate::run_dir::require(
            src,
            "VAE run",
            &["vae.json", "model.safetensors"],
            &format!("pipeline train-vae --out {}", src.display()),
        )?;
        load_safetensors(model, &src.join("model.safetensors"))
            .with_context(|| format!("--init-from {}", src.display()))
    })?;
    let preview_set = if held_out.labels.is_empty() {
        &train
    } else {
        &held_out
    };
    let preview_idx: Vec<usize> = (0..preview_set.labels.len().min(8)).collect();
    let mut task = VaeTask {
        config: config.vae.clone(),
        order: BatchOrder::new(
            config.train.seed,
            train.labels.len(),
            config.train.batch_size,
        ),
        seed: config.train.seed,
        device: ad.clone(),
        latent_shape,
        preview: preview_set.batch(&preview_idx, device),
        run_dir: out.to_path_buf(),
        train,
    };
    let architecture = format!(
        "{:?} channels={channels} resolution={resolution}",
        config.vae
    );
    let model =
        match train::train_sharded(&mut task, model, &config.train, architecture, out, resume)? {
            Outcome::Finished(model) => model.valid(),
            Outcome::Interrupted(_) => return Ok(None),
        };
    let scale = latent_scale(&model, &task.train, config.train.seed, device);
    let weights = out.join("model.safetensors");
    save_safetensors(&model, &weights, &[("stage", "vae")])?;
    let info = VaeInfo {
        latent_scale: scale,
        latent_shape,
        image_shape: [channels, resolution, resolution],
        class_names: task.train.class_names.clone(),
        steps: config.train.steps,
        weights_sha256: sha256_file(&weights)?,
        init_from: InitFrom::recall(out)?,
    };
    write_json(&out.join("vae.json"), &info).context("writing vae.json")?;
    Ok(Some(VaeSummary {
        out: out.to_path_buf(),
        latent_scale: scale,
        steps: config.train.steps,
    }))
}

/// Held-out quality of a trained VAE.
#[derive(Debug, Clone, Serialize)]
pub struct VaeEval {
    pub images: usize,
    /// Mean PSNR in dB of decode(mean of q(z|x)) against x, pixels in [0, 1].
    pub psnr_db: f64,
    /// Mean SSIM over the same reconstructions.
    pub ssim: f64,
    /// Mean KL(q(z|x) || N(0, I)) per latent dimension, in nats.
    pub kl_per_dim: f64,
}

/// `pipeline eval-vae`: reconstruction quality on the held-out split.
pub fn eval_vae(run: &VaeRun, limit: usize, device: &Device) -> Result<VaeEval> {
    let Splits { held_out, .. } = data::load(&run.config.data)?;
    if held_out.labels.is_empty() {
        bail!("the data set has no held-out images (data.held_out_fraction is 0)");
    }
    let n = if limit == 0 {
        held_out.labels.len()
    } else {
        limit.min(held_out.labels.len())
    };
    let (mut psnr, mut ssim, mut kl) = (0.0, 0.0, 0.0);
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(250) {
        let x = held_out.batch(chunk, device);
        let q = run.model.encode(x.clone());
        kl += ldm_common::tensor::scalar(ldm_vae::loss::kl_to_standard_normal(&q).mean())
            * chunk.len() as f64;
        let x_hat = run.model.decode(q.mean);
        let to_unit = |t: Tensor<4>| ((t + 1.0) * 0.5).clamp(0.0, 1.0);
        let (a, b) = (to_unit(x), to_unit(x_hat));
        psnr += ldm_eval::psnr::psnr_per_image(a.clone(), b.clone())?
            .iter()
            .sum::<f64>();
        ssim += ldm_eval::ssim::ssim_per_image(a, b)?.iter().sum::<f64>();
    }
    Ok(VaeEval {
        images: n,
        psnr_db: psnr / n as f64,
        ssim: ssim / n as f64,
        kl_per_dim: kl / n as f64,
    })
}
