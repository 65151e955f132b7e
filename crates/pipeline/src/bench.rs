//! `pipeline bench`: how fast training and sampling run on a device, with random weights and
//! random data (no data set, no trained model: it runs on a fresh machine).
//!
//! Four rows, each timed after warm-up:
//! - `vae-train`: one VAE training step of the recipe's VAE config (forward, loss, backward,
//!   AdamW step), as `train-vae` does it;
//! - `ldm-train-unet`, `ldm-train-dit`: one LDM training step (q_sample, forward, loss,
//!   backward, AdamW step, EMA update), as `train-ldm` does it, for a U-Net and a DiT on the
//!   recipe's latent shape;
//! - `sample-ddim50`: classifier-free guided DDIM with 50 steps and the VAE decode, as
//!   `generate` does it, with the recipe LDM's backbone.
//!
//! The JSON (`--json`) also records every resolved hyper-parameter (`spec`), which
//! `scripts/bench/torch_twin.py` reads to build the same networks in PyTorch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor};
use rand::RngExt;
use serde::Serialize;

use ldm_common::device::SelectedDevice;
use ldm_common::rng::{randn, stream};
use ldm_common::tensor::scalar;
use ldm_common::upload;
use ldm_diffusion::backbone::{BackboneConfig, ConditioningSpec};
use ldm_diffusion::denoiser::Conditioning;
use ldm_diffusion::ldm_model::LdmModel;
use ldm_diffusion::sampler::{SamplerKind, SamplerOptions};
use ldm_diffusion::schedule::Schedule;
use ldm_diffusion::training_table::TrainingTable;
use ldm_vae::Vae;

use crate::ldm_stage::{ConditioningKind, DiffusionSettings, LdmRunConfig, ldm_loss};
use crate::recipe::Recipe;
use crate::train::TrainConfig;
use crate::vae_stage::{VaeInfo, VaeRun, VaeRunConfig};
use crate::{builtin, ema, progress, sampling};
use ldm_common::adamw::Foreach;
use ldm_common::precision::Precision;

/// Denoising steps of the sampling row (DDIM, eta 0).
pub const SAMPLE_STEPS: usize = 50;

/// What `pipeline bench` was asked.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A recipe file or built-in recipe name: the VAE config, the LDM config and the grid's cfg.
    pub config: String,
    /// An LDM config whose `[backbone]` is a U-Net (default: the recipe's LDM if it is one,
    /// else `ldm-fmnist-unet`).
    pub unet: Option<String>,
    /// An LDM config whose `[backbone]` is a DiT (default: the recipe's LDM if it is one, else
    /// `ldm-animals`).
    pub dit: Option<String>,
    /// Batch of every row (default: each config's `train.batch_size`; sampling: the sampled
    /// LDM's).
    pub batch_size: Option<usize>,
    /// Timed training steps per row.
    pub iters: usize,
    /// Untimed steps before them (sampling: one untimed run when > 0).
    pub warmup: usize,
    /// Timed sampling runs.
    pub sample_runs: usize,
    /// Classes of a class-conditional LDM (the data set is not read).
    pub classes: usize,
    pub seed: u64,
    /// The rows to time ([`ROWS`]); empty: all.
    pub rows: Vec<String>,
    /// `train.precision` of every training row (default: each config's own).
    pub precision: Option<Precision>,
    /// `train.foreach` of every training row (default: each config's own, `auto`).
    pub foreach: Option<Foreach>,
    /// Also time each part of a training step ([`Phases`]), with a device fence after each.
    pub phases: bool,
}

/// Milliseconds per timed training step spent in each part of it (`pipeline bench --phases`).
///
/// The device is fenced (`Device::sync`) after every part, so on an asynchronous device each
/// part's kernels are charged to it, and the step loses the overlap of one part's host work
/// with the previous part's kernels: the parts add up to a little more than an unfenced step.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Phases {
    /// Batch upload, noise draws, q_sample, the forward pass and the loss.
    pub forward_ms: f64,
    /// `loss.backward()` and the collection of the gradients.
    pub backward_ms: f64,
    /// Gradient clipping and the AdamW step.
    pub optimizer_ms: f64,
    /// The EMA update (LDM rows; for the VAE, which keeps none, the time of an empty call).
    pub ema_ms: f64,
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// `vae-train`, `ldm-train-unet`, `ldm-train-dit` or `sample-ddim50`.
    pub name: String,
    /// The network and the config it comes from.
    pub model: String,
    /// Images (VAE, sampling) or latents (LDM) per iteration.
    pub batch: usize,
    /// Parameters of the network (sampling: backbone plus VAE decoder).
    pub params: usize,
    /// Timed iterations (training steps or sampling runs).
    pub iters: usize,
    /// Wall time of the timed iterations.
    pub seconds: f64,
    /// Milliseconds per training step, or per denoising step of a sampling run (the run,
    /// decode included, divided by its steps).
    pub ms_per_step: f64,
    /// Images or latents per second.
    pub items_per_s: f64,
    /// `images` or `latents`.
    pub unit: String,
    /// The last loss (training rows): a finite number shows the step did real work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// DiT rows: matrix-product FLOPs of one item's forward pass
    /// ([`ldm_diffusion::flops`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_flops: Option<u64>,
    /// DiT training row: achieved TFLOP/s, counting a training step as 3 forward passes of
    /// the batch (the backward's two products per forward product).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tflops: Option<f64>,
    /// Training rows with `--phases`: the step's time by part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
}

/// What `pipeline bench --json` writes.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub tool: String,
    pub device: String,
    pub config: String,
    pub iters: usize,
    pub warmup: usize,
    pub rows: Vec<BenchRow>,
    /// On libtorch CUDA: whether attention's memory-efficient kernel was called directly
    /// (with its backward) or, failing the check against torch's autograd, why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<String>,
    /// On libtorch CUDA: whether uploads went through page-locked memory without waiting for
    /// the device or, failing their check (or with `LDM_UPLOADS=pageable`), why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads: Option<String>,
    /// Everything the PyTorch twin needs to build the same networks and steps.
    pub spec: BenchSpec,
}

/// The resolved settings of every row.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSpec {
    pub seed: u64,
    pub iters: usize,
    pub warmup: usize,
    pub sample_runs: usize,
    /// `--phases`: the twin times the parts of its steps too.
    pub phases: bool,
    pub vae: VaeSpec,
    pub ldm: Vec<LdmSpec>,
    pub sample: SampleSpec,
}

#[derive(Debug, Clone, Serialize)]
pub struct VaeSpec {
    pub row: String,
    pub source: String,
    pub config: ldm_vae::VaeConfig,
    /// `[channels, side, side]`.
    pub image_shape: [usize; 3],
    pub latent_shape: [usize; 3],
    pub batch_size: usize,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct LdmSpec {
    pub row: String,
    /// The table's description of the network.
    pub label: String,
    pub source: String,
    pub backbone: BackboneConfig,
    pub latent_shape: [usize; 3],
    /// `None`: unconditional.
    pub num_classes: Option<usize>,
    pub diffusion: DiffusionSettings,
    /// alphabar_t as the forward process uses it.
    pub alphas_cumprod: Vec<f64>,
    /// alphabar_t floored as the samplers and conversions use it.
    pub alpha_bar: Vec<f64>,
    pub batch_size: usize,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct SampleSpec {
    pub row: String,
    /// The LDM row whose trained network is sampled.
    pub ldm_row: String,
    pub n: usize,
    pub cfg: f64,
    /// DDIM timesteps, descending.
    pub timesteps: Vec<usize>,
    /// The network's arithmetic while sampling (`sampler.precision`; `--precision`).
    pub precision: Precision,
}

/// An LDM row's config, resolved.
struct LdmSetup {
    row: &'static str,
    label: String,
    source: String,
    config: LdmRunConfig,
    schedule: Schedule,
    num_classes: Option<usize>,
    batch: usize,
}

/// Reads a config file or built-in name; errors start with `source` (the flag or recipe key)
/// and the value.
fn read_config<T: serde::de::DeserializeOwned>(source: &str, arg: &str, what: &str) -> Result<T> {
    let path = builtin::resolve(arg).map_err(|e| {
        let e = format!("{e:#}");
        let reason = e.strip_prefix(&format!("--config {arg}: ")).unwrap_or(&e);
        anyhow::anyhow!("{source} {arg}: {reason}")
    })?;
    crate::config::read(&path).with_context(|| format!("{source} {arg}: expected {what}"))
}

/// The name of a backbone for the table (`DiT-M/2`-like for a DiT).
fn backbone_label(b: &BackboneConfig) -> String {
    match b {
        BackboneConfig::UNet(u) => format!(
            "U-Net {} ch, mult {:?}, {} res/level, attn levels {:?}",
            u.base_channels, u.channel_mult, u.num_res_blocks, u.attention_levels
        ),
        BackboneConfig::DiT(d) => {
            let preset = ldm_diffusion::dit::DIT_SIZES.iter().find(|s| {
                (s.hidden_size, s.depth, s.num_heads) == (d.hidden_size, d.depth, d.num_heads)
                    && d.mlp_ratio == 4.0
            });
            match preset {
                Some(s) => format!("DiT-{}/{}", s.name, d.patch_size),
                None => format!(
                    "DiT {} wide, {} blocks, {} heads, patch {}",
                    d.hidden_size, d.depth, d.num_heads, d.patch_size
                ),
            }
        }
    }
}

fn is_unet(b: &BackboneConfig) -> bool {
    matches!(b, BackboneConfig::UNet(_))
}

/// Resolves one LDM row: its config must have the wanted backbone kind and class or no
/// conditioning (the text encoder is not benchmarked).
fn ldm_setup(
    row: &'static str,
    flag: &str,
    arg: &str,
    want_unet: bool,
    latent: [usize; 3],
    o: &BenchOptions,
) -> Result<LdmSetup> {
    let mut config: LdmRunConfig = read_config(flag, arg, "an LDM config")?;
    config.validate().with_context(|| format!("{flag} {arg}"))?;
    if let Some(precision) = o.precision {
        config.train.precision = precision;
    }
    if let Some(foreach) = o.foreach {
        config.train.foreach = foreach;
    }
    let kind = if want_unet { "unet" } else { "dit" };
    if is_unet(&config.backbone) != want_unet {
        bail!("{flag} {arg}: its [backbone] is not kind = \"{kind}\"");
    }
    let num_classes = match config.diffusion.conditioning {
        ConditioningKind::Class => Some(o.classes),
        ConditioningKind::None => None,
        ConditioningKind::Text => bail!(
            "{flag} {arg}: diffusion.conditioning = \"text\" is not benchmarked; expected \"class\" or \"none\""
        ),
    };
    let [c, s, _] = latent;
    let spec = ConditioningSpec {
        num_classes,
        text_dim: None,
    };
    config
        .backbone
        .validate(c, s, &spec)
        .with_context(|| format!("{flag} {arg} on {c}x{s}x{s} latents"))?;
    let schedule = Schedule::new(&config.schedule)?;
    Ok(LdmSetup {
        row,
        label: format!("{} ({arg})", backbone_label(&config.backbone)),
        source: arg.to_string(),
        batch: o.batch_size.unwrap_or(config.train.batch_size),
        config,
        schedule,
        num_classes,
    })
}

/// Waits until the device has finished all queued work, then returns the loss as f64.
///
/// Backends may run asynchronously (libtorch on CUDA queues kernels and returns at once), so a
/// clock read right after the last step would time the queueing, not the work. Copying a value
/// back to the host is enqueued behind every kernel of the step (one stream, in order) and
/// blocks until they have all run, on every backend; `Device::sync` is called as well (a
/// `cudaDeviceSynchronize` on libtorch CUDA, nothing on the eager CPU backends).
fn fence(loss: Tensor<1>, device: &Device) -> Result<f64> {
    let value = scalar(loss);
    sync(device)?;
    Ok(value)
}

/// `Device::sync`, its failure as an error.
fn sync(device: &Device) -> Result<()> {
    device
        .sync()
        .map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
}

/// What [`time_training`] measured.
struct Timed<M> {
    model: M,
    /// Wall time of the timed steps.
    seconds: f64,
    /// The last step's loss.
    loss: f64,
    /// With `--phases`: the timed steps' mean time per part.
    phases: Option<Phases>,
}

/// Runs `warmup` untimed then `iters` timed optimizer steps of `loss_of(model, step)` at a
/// constant learning rate, calling `after(model, step)` after each (the EMA). With
/// `o.phases`, the device is synced after each part of a step and the parts are clocked.
fn time_training<M: Module + 'static>(
    mut model: M,
    device: &Device,
    train: &TrainConfig,
    o: &BenchOptions,
    bar: &indicatif::ProgressBar,
    mut loss_of: impl FnMut(&M, u64) -> Tensor<1>,
    mut after: impl FnMut(&M, u64),
) -> Result<Timed<M>> {
    let mut optim = train.optimizer(device);
    let mut start = Instant::now();
    let mut last = None;
    // seconds per part, summed over the timed steps
    let mut parts = [0.0f64; 4];
    let lap = |mark: &mut Instant| -> Result<f64> {
        sync(device)?;
        let now = Instant::now();
        let seconds = (now - *mark).as_secs_f64();
        *mark = now;
        Ok(seconds)
    };
    for step in 0..(o.warmup + o.iters) as u64 {
        if step == o.warmup as u64 {
            if let Some(loss) = last.take() {
                fence(loss, device)?;
            }
            start = Instant::now();
        }
        let timed = o.phases && step >= o.warmup as u64;
        let mut mark = Instant::now();
        let loss = loss_of(&train.precision.compute_copy(&model), step);
        if timed {
            parts[0] += lap(&mut mark)?;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if timed {
            parts[1] += lap(&mut mark)?;
        }
        model = optim.step(train.lr, model, grads);
        if timed {
            parts[2] += lap(&mut mark)?;
        }
        after(&model, step);
        if timed {
            parts[3] += lap(&mut mark)?;
        }
        last = Some(loss);
        bar.inc(1);
    }
    let last = fence(last.expect("at least one step"), device)?;
    let seconds = start.elapsed().as_secs_f64();
    if !last.is_finite() {
        bail!(
            "the loss became non-finite in the benchmark (lr {})",
            train.lr
        );
    }
    let ms = |s: f64| 1000.0 * s / o.iters as f64;
    let phases = o.phases.then(|| Phases {
        forward_ms: ms(parts[0]),
        backward_ms: ms(parts[1]),
        optimizer_ms: ms(parts[2]),
        ema_ms: ms(parts[3]),
    });
    Ok(Timed {
        model,
        seconds,
        loss: last,
        phases,
    })
}

/// `n` uniform values in [-1, 1) from the seed (the stand-in for a batch of images or
/// latents, kept on the host and uploaded every step as training does).
fn host_batch(seed: u64, purpose: &str, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = stream(seed, purpose, 0);
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Class labels of a batch with a fraction `p_uncond` replaced by the null class, as in
/// training.
fn labels(
    num_classes: Option<usize>,
    p_uncond: f64,
    b: usize,
    seed: u64,
    step: u64,
    device: &Device,
) -> Option<Tensor<1, Int>> {
    let n = num_classes?;
    let mut rng = stream(seed, "bench-ldm-cfg-drop", step);
    let ids: Vec<i64> = (0..b)
        .map(|i| {
            if rng.random::<f64>() < p_uncond {
                n as i64
            } else {
                (i % n) as i64
            }
        })
        .collect();
    Some(upload::int(ids, [b], device))
}

/// `pipeline bench`: resolves the recipe, measures every row, returns the report.
pub fn bench(o: &BenchOptions, device: &SelectedDevice) -> Result<BenchReport> {
    if o.iters == 0 {
        bail!("--iters 0: expected at least 1");
    }
    if o.sample_runs == 0 {
        bail!("--sample-runs 0: expected at least 1");
    }
    if o.classes == 0 {
        bail!("--classes 0: expected at least 1");
    }
    let recipe: Recipe = read_config(
        "--config",
        &o.config,
        "a recipe (pipelines/*.toml: out, vae, ldm, [grid])",
    )?;
    let recipe_path = Path::new(&o.config);
    let (vae_arg, ldm_arg) = (
        builtin::beside(recipe_path, &recipe.vae),
        builtin::beside(recipe_path, &recipe.ldm),
    );
    let mut vae_cfg: VaeRunConfig =
        read_config(&format!("{}: vae =", o.config), &vae_arg, "a VAE config")?;
    if let Some(precision) = o.precision {
        vae_cfg.train.precision = precision;
    }
    if let Some(foreach) = o.foreach {
        vae_cfg.train.foreach = foreach;
    }
    let resolution = vae_cfg.data.resolution;
    vae_cfg
        .vae
        .validate(resolution)
        .with_context(|| format!("{}: vae = {vae_arg}", o.config))?;
    let channels = vae_cfg.data.channels;
    let side = vae_cfg.vae.latent_size(resolution);
    let latent = [vae_cfg.vae.latent_channels, side, side];
    let recipe_ldm: LdmRunConfig =
        read_config(&format!("{}: ldm =", o.config), &ldm_arg, "an LDM config")?;
    let recipe_is_unet = is_unet(&recipe_ldm.backbone);
    let unet_arg = o.unet.clone().unwrap_or_else(|| {
        if recipe_is_unet {
            ldm_arg.clone()
        } else {
            "ldm-fmnist-unet".into()
        }
    });
    let dit_arg = o.dit.clone().unwrap_or_else(|| {
        if recipe_is_unet {
            "ldm-animals".into()
        } else {
            ldm_arg.clone()
        }
    });
    let unet = ldm_setup("ldm-train-unet", "--unet", &unet_arg, true, latent, o)?;
    let dit = ldm_setup("ldm-train-dit", "--dit", &dit_arg, false, latent, o)?;
    let sampled_row = if recipe_is_unet { unet.row } else { dit.row };
    let sampler = SamplerOptions {
        kind: SamplerKind::Ddim,
        steps: SAMPLE_STEPS,
        eta: 0.0,
        spacing: recipe_ldm.sampler.spacing,
        precision: o.precision.unwrap_or(recipe_ldm.sampler.precision),
        ..SamplerOptions::default()
    };
    let sampled = if recipe_is_unet { &unet } else { &dit };
    let timesteps = sampler
        .timesteps(&sampled.schedule)
        .with_context(|| format!("DDIM {SAMPLE_STEPS} steps on {}", sampled.source))?;
    let vae_batch = o.batch_size.unwrap_or(vae_cfg.train.batch_size);
    let sample_n = o.batch_size.unwrap_or(sampled.batch);

    let want = |row: &str| o.rows.is_empty() || o.rows.iter().any(|r| r == row);
    let trained_rows = ROWS[..3].iter().filter(|r| want(r)).count();
    let sampling = want("sample-ddim50");
    // training steps of the training rows, then the sampling runs (and one untimed run)
    let total = trained_rows * (o.warmup + o.iters)
        + usize::from(sampling) * (o.sample_runs + usize::from(o.warmup > 0));
    let bar = progress::bar(total as u64, "iter");
    let plain = device.device.clone();
    let ad = plain.clone().autodiff();
    ad.seed(o.seed);
    let mut rows = Vec::new();

    // (a) the VAE training step
    bar.set_message("vae-train");
    let vae = Vae::new(&vae_cfg.vae, channels, &ad);
    let vae_params = vae.num_params();
    let [lc, ls, _] = latent;
    let vae = if !want("vae-train") {
        vae
    } else {
        let images = host_batch(
            o.seed,
            "bench-images",
            vae_batch * channels * resolution * resolution,
            1.0,
        );
        let image_shape = [vae_batch, channels, resolution, resolution];
        let timed = time_training(
            vae,
            &ad,
            &vae_cfg.train,
            o,
            &bar,
            |model: &Vae, step| {
                let x = upload::float(images.clone(), image_shape, &ad);
                let eps = randn(
                    &mut stream(o.seed, "bench-vae-eps", step),
                    [vae_batch, lc, ls, ls],
                    &ad,
                );
                model.loss(x, eps, &vae_cfg.vae).loss
            },
            |_, _| {},
        )?;
        let mut row = training_row(
            "vae-train",
            format!("VAE ({})", recipe.vae),
            vae_batch,
            vae_params,
            o.iters,
            timed.seconds,
            "images",
            timed.loss,
        );
        row.phases = timed.phases;
        rows.push(row);
        timed.model
    };

    // (b) the LDM training steps
    let mut trained = Vec::new();
    for setup in [&unet, &dit] {
        bar.set_message(setup.row);
        let model = LdmModel::init(&setup.config.backbone, lc, ls, setup.num_classes, None, &ad)?;
        if !want(setup.row) {
            // sampled untrained: the sampling speed does not depend on the weights
            if sampling && setup.row == sampled_row {
                trained.push((setup.row, model.valid()));
            }
            continue;
        }
        let params = model.num_params();
        let b = setup.batch;
        let latents = host_batch(o.seed, "bench-latents", b * lc * ls * ls, 1.0);
        let settings = &setup.config.diffusion;
        let big_t = setup.schedule.num_timesteps();
        let table = TrainingTable::new(&setup.schedule, settings.parameterization, &settings.loss);
        let mut ema_model = model.valid();
        let foreach = setup.config.train.foreach_on(&ad);
        let timed = time_training(
            model,
            &ad,
            &setup.config.train,
            o,
            &bar,
            |model: &LdmModel, step| {
                let z0 = upload::float(latents.clone(), [b, lc, ls, ls], &ad);
                let mut rng = stream(o.seed, "bench-ldm-t", step);
                let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..big_t)).collect();
                let eps = randn(
                    &mut stream(o.seed, "bench-ldm-eps", step),
                    [b, lc, ls, ls],
                    &ad,
                );
                let cond = Conditioning {
                    class: labels(setup.num_classes, settings.p_uncond, b, o.seed, step, &ad),
                    text: None,
                };
                ldm_loss(model, &table, z0, &t, eps, &cond)
            },
            |model, step| {
                let decay = ema::warmed_decay(settings.ema_decay, step);
                ema::update(&mut ema_model, model, decay, foreach);
            },
        )?;
        let seconds = timed.seconds;
        drop(timed.model);
        let mut row = training_row(
            setup.row,
            setup.label.clone(),
            b,
            params,
            o.iters,
            seconds,
            "latents",
            timed.loss,
        );
        row.phases = timed.phases;
        if let BackboneConfig::DiT(dit) = &setup.config.backbone {
            let cond = ConditioningSpec {
                num_classes: setup.num_classes,
                text_dim: None,
            };
            let forward = dit.forward_flops(lc, ls, &cond, 0);
            row.forward_flops = Some(forward);
            row.tflops =
                Some(3.0 * (forward * b as u64) as f64 / (seconds / o.iters as f64) / 1e12);
        }
        rows.push(row);
        trained.push((setup.row, ema_model));
    }

    // (c) sampling: DDIM 50 with classifier-free guidance, then the VAE decode
    let cfg = if sampled.num_classes.is_some() {
        recipe.grid.cfg
    } else {
        1.0
    };
    if sampling {
        bar.set_message("sample-ddim50");
        let ldm = trained
            .into_iter()
            .find(|(row, _)| *row == sampled_row)
            .map(|(_, m)| m)
            .expect("the sampled row was trained");
        let vae_run = VaeRun {
            dir: PathBuf::new(),
            config: vae_cfg.clone(),
            info: VaeInfo {
                latent_scale: 1.0,
                latent_shape: latent,
                image_shape: [channels, resolution, resolution],
                class_names: Vec::new(),
                steps: 0,
                weights_sha256: String::new(),
                init_from: None,
            },
            model: vae.valid(),
        };
        let sample_labels: Option<Vec<usize>> = sampled
            .num_classes
            .map(|n| (0..sample_n).map(|i| i % n).collect());
        let sample_params = ldm.num_params() + vae_run.model.decoder.num_params();
        // bf16: the weights cast once, outside the clock
        let sample_model = sampler.precision.compute_copy(&ldm);
        let run_once = |run: u64| -> Result<f64> {
            let request = sampling::Request {
                sampler: &sampler,
                labels: sample_labels.as_deref(),
                num_classes: sampled.num_classes.unwrap_or(0),
                negative_class: None,
                text: None,
                latent_shape: latent,
                cfg,
                n: sample_n,
                seed: o.seed.wrapping_add(run),
            };
            let z = sampling::sample_latents(
                &sample_model,
                &sampled.schedule,
                sampled.config.diffusion.parameterization,
                &request,
                &plain,
                None,
            )?;
            let images = sampling::decode(&vae_run, z);
            fence(images.sum(), &plain)
        };
        if o.warmup > 0 {
            run_once(u64::MAX)?;
            bar.inc(1);
        }
        let start = Instant::now();
        for run in 0..o.sample_runs {
            run_once(run as u64)?;
            bar.inc(1);
        }
        let seconds = start.elapsed().as_secs_f64();
        let per_run = seconds / o.sample_runs as f64;
        rows.push(BenchRow {
            name: "sample-ddim50".into(),
            model: format!(
                "{} DDIM {SAMPLE_STEPS}, cfg {cfg}, + VAE decode",
                if recipe_is_unet { "U-Net" } else { "DiT" }
            ),
            batch: sample_n,
            params: sample_params,
            iters: o.sample_runs,
            seconds,
            ms_per_step: 1000.0 * per_run / SAMPLE_STEPS as f64,
            items_per_s: sample_n as f64 / per_run,
            unit: "images".into(),
            last_loss: None,
            forward_flops: None,
            tflops: None,
            phases: None,
        });
    }
    bar.finish_and_clear();

    let ldm_spec = |s: &LdmSetup| LdmSpec {
        row: s.row.into(),
        label: s.label.clone(),
        source: s.source.clone(),
        backbone: s.config.backbone.clone(),
        latent_shape: latent,
        num_classes: s.num_classes,
        diffusion: s.config.diffusion.clone(),
        alphas_cumprod: s.schedule.alphas_cumprod.clone(),
        alpha_bar: (0..s.schedule.num_timesteps())
            .map(|t| s.schedule.alpha_bar(t))
            .collect(),
        batch_size: s.batch,
        train: s.config.train.clone(),
    };
    Ok(BenchReport {
        tool: format!("pipeline {} (burn 0.22.1)", env!("CARGO_PKG_VERSION")),
        device: device.description.clone(),
        config: o.config.clone(),
        iters: o.iters,
        warmup: o.warmup,
        rows,
        attention: attention_path(),
        uploads: upload_path(),
        spec: BenchSpec {
            seed: o.seed,
            iters: o.iters,
            warmup: o.warmup,
            sample_runs: o.sample_runs,
            phases: o.phases,
            vae: VaeSpec {
                row: "vae-train".into(),
                source: recipe.vae.clone(),
                config: vae_cfg.vae.clone(),
                image_shape: [channels, resolution, resolution],
                latent_shape: latent,
                batch_size: vae_batch,
                train: vae_cfg.train.clone(),
            },
            ldm: vec![ldm_spec(&unet), ldm_spec(&dit)],
            sample: SampleSpec {
                row: "sample-ddim50".into(),
                ldm_row: sampled_row.into(),
                n: sample_n,
                cfg,
                timesteps,
                precision: sampler.precision,
            },
        },
    })
}

/// Every row, in the order they run.
pub const ROWS: [&str; 4] = [
    "vae-train",
    "ldm-train-unet",
    "ldm-train-dit",
    "sample-ddim50",
];

/// `--rows a,b`: names from [`ROWS`], at least one; `None`: all.
fn parse_rows(list: Option<&str>) -> Result<Vec<String>> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let rows: Vec<String> = list.split(',').map(|r| r.trim().to_string()).collect();
    if let Some(bad) = rows.iter().find(|r| !ROWS.contains(&r.as_str())) {
        bail!(
            "--rows {list}: unknown row '{bad}'; expected some of {}",
            ROWS.join(", ")
        );
    }
    Ok(rows)
}

/// A count flag that must be at least `min`, as a one-line error naming the flag.
fn count(flag: &str, value: i64, min: i64) -> Result<usize> {
    if value < min {
        bail!("{flag} {value}: expected at least {min}");
    }
    Ok(value as usize)
}

/// `pipeline bench`: flags to options, the measurement, the table on stdout, the JSON file.
pub fn run_cli(a: crate::cli::BenchArgs) -> Result<std::process::ExitCode> {
    let o = BenchOptions {
        config: a.config,
        unet: a.unet,
        dit: a.dit,
        batch_size: a.batch_size,
        iters: count("--iters", a.iters, 1)?,
        warmup: count("--warmup", a.warmup, 0)?,
        sample_runs: count("--sample-runs", a.sample_runs, 1)?,
        classes: count("--classes", a.classes, 1)?,
        seed: a.seed,
        rows: parse_rows(a.rows.as_deref())?,
        precision: a.precision,
        foreach: a.foreach,
        phases: a.phases,
    };
    if let Some(path) = &a.json {
        ldm_common::checkpoint::ensure_writable_dir(
            path.parent().unwrap_or(std::path::Path::new(".")),
        )
        .with_context(|| format!("--json {}", path.display()))?;
    }
    let device = ldm_common::device::select(a.device.device)?;
    eprintln!("bench {} on {}", o.config, device.description);
    let report = bench(&o, &device)?;
    print!("{}", table(&report));
    if let Some(path) = &a.json {
        ldm_common::checkpoint::write_json(path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn training_row(
    name: &str,
    model: String,
    batch: usize,
    params: usize,
    iters: usize,
    seconds: f64,
    unit: &str,
    loss: f64,
) -> BenchRow {
    BenchRow {
        name: name.into(),
        model,
        batch,
        params,
        iters,
        seconds,
        ms_per_step: 1000.0 * seconds / iters as f64,
        items_per_s: (batch * iters) as f64 / seconds,
        unit: unit.into(),
        last_loss: Some(loss),
        forward_flops: None,
        tflops: None,
        phases: None,
    }
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// What became of the direct memory-efficient attention path in this process, if it was
/// considered (libtorch on CUDA, f32; `ldm_common::torch_ops`).
fn attention_path() -> Option<String> {
    #[cfg(feature = "tch")]
    {
        ldm_common::torch_ops::efficient_attention_check().map(|check| match check {
            Ok(worst) => format!(
                "memory-efficient kernel and its backward called directly (checked against \
                 torch's autograd: largest relative difference {worst:.1e})"
            ),
            Err(why) => format!("through torch's autograd ({why})"),
        })
    }
    #[cfg(not(feature = "tch"))]
    {
        None
    }
}

/// How this process uploaded to CUDA, if it did (`ldm_common::torch_ops::upload`).
fn upload_path() -> Option<String> {
    #[cfg(feature = "tch")]
    {
        ldm_common::torch_ops::upload::pinned_upload_check().map(|check| match check {
            Ok(()) => "page-locked, without waiting for the device (checked)".to_owned(),
            Err(why) => format!("pageable, each waits for the device ({why})"),
        })
    }
    #[cfg(not(feature = "tch"))]
    {
        None
    }
}

/// The table `pipeline bench` prints.
pub fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "pipeline bench: {} on {}; {} timed iterations after {} warm-up (sampling: {} runs)\n",
        r.config, r.device, r.iters, r.warmup, r.spec.sample_runs
    );
    out += &format!(
        "{:<15} {:>6} {:>11} {:>10} {:>10}  {:<8} {}\n",
        "row", "batch", "params", "ms/step", "items/s", "unit", "model"
    );
    for row in &r.rows {
        out += &format!(
            "{:<15} {:>6} {:>11} {:>10.2} {:>10.1}  {:<8} {}\n",
            row.name,
            row.batch,
            thousands(row.params),
            row.ms_per_step,
            row.items_per_s,
            row.unit,
            row.model
        );
    }
    out += "ms/step of sample-ddim50: one DDIM step of the batch (the whole run, VAE decode included, / 50)\n";
    for row in &r.rows {
        if let (Some(forward), Some(tflops)) = (row.forward_flops, row.tflops) {
            out += &format!(
                "{}: {:.3} TFLOP/s achieved ({:.4} GFLOP per forward pass of one latent in matrix products, x 3 for a training step, x {} latents)\n",
                row.name,
                tflops,
                forward as f64 / 1e9,
                row.batch
            );
        }
    }
    if let Some(attention) = &r.attention {
        out += &format!("attention on libtorch: {attention}\n");
    }
    if let Some(uploads) = &r.uploads {
        out += &format!("uploads to CUDA: {uploads}\n");
    }
    if r.rows.iter().any(|row| row.phases.is_some()) {
        out += &phase_table(r);
    }
    out
}

/// The `--phases` block: each training row's step by part, in ms and as a share of their sum.
fn phase_table(r: &BenchReport) -> String {
    let mut out = String::from(
        "parts of a training step (--phases: ms per step, the device synced after each part)\n",
    );
    out += &format!(
        "{:<15} {:>16} {:>16} {:>16} {:>16} {:>9}\n",
        "row", "forward", "backward", "optimizer", "ema", "sum"
    );
    for row in &r.rows {
        let Some(p) = row.phases else { continue };
        let sum = p.forward_ms + p.backward_ms + p.optimizer_ms + p.ema_ms;
        let cell = |ms: f64| format!("{ms:.2} ({:.0}%)", 100.0 * ms / sum.max(f64::MIN_POSITIVE));
        out += &format!(
            "{:<15} {:>16} {:>16} {:>16} {:>16} {:>9.2}\n",
            row.name,
            cell(p.forward_ms),
            cell(p.backward_ms),
            cell(p.optimizer_ms),
            cell(p.ema_ms),
            sum
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_837_776), "2,837,776");
    }
}
