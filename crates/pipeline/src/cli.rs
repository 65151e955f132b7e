//! The command line: each subcommand parses its flags and calls one library function.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ldm_common::device::DeviceChoice;
use ldm_common::precision::Precision;

/// Latent diffusion in Rust: train a VAE, train a diffusion model on its latents, generate.
#[derive(Debug, Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Latent diffusion in Rust: train a VAE, train a diffusion model on its latents, generate images.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the VAE (stage 1) and store its latent scale factor.
    TrainVae(TrainVaeArgs),
    /// Held-out reconstruction PSNR/SSIM and KL per latent dimension of a trained VAE.
    EvalVae(EvalVaeArgs),
    /// Train the latent diffusion model (stage 2) on a trained VAE's latents.
    TrainLdm(TrainLdmArgs),
    /// Held-out loss and variational bound (nats per latent dimension) of a trained LDM.
    EvalLdm(EvalLdmArgs),
    /// Print a noise schedule as CSV (t, beta, alphas_cumprod, snr, posterior terms).
    Schedule(ScheduleArgs),
    /// Generate images: encode -> diffuse -> decode, guided by a class or a text prompt.
    Generate(GenerateCliArgs),
    /// Run a whole recipe: train-vae, train-ldm, then a grid with one row per class.
    Run(RunArgs),
    /// Train the evaluation classifier on a data set's real training split.
    TrainEvaluator(TrainEvaluatorArgs),
    /// Score a class-conditional model (or a text model, prompted with each class name):
    /// per-class accuracy, FID (with its floor), precision/recall.
    Eval(EvalArgs),
    /// Train a noisy-latent classifier p(y | z_t, t) on a trained LDM's latents, for classifier
    /// guidance (`generate --classifier`).
    TrainClassifier(TrainClassifierArgs),
    /// Draw a run's metrics.csv as a PNG: every column against step, raw and smoothed.
    Plot(PlotArgs),
    /// Draw FID and accuracy against steps or guidance scale from `pipeline eval --json` files.
    PlotSweep(PlotSweepArgs),
    /// A local web page and JSON API for generating: the model stays loaded, one job runs at a time.
    Serve(ServeArgs),
    /// Time the VAE and LDM training steps and DDIM sampling on a device, with random weights
    /// and data (the PyTorch twin in scripts/bench/ builds the same networks).
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A recipe file (pipelines/*.toml) or a built-in recipe name (animals, fashion-mnist): the
    /// VAE config, the LDM config (latent shape, sampled backbone) and the grid's cfg.
    #[arg(long, default_value = "animals")]
    pub config: String,
    /// LDM config of the U-Net row (default: the recipe's LDM if a U-Net, else ldm-fmnist-unet).
    #[arg(long)]
    pub unet: Option<String>,
    /// LDM config of the DiT row (default: the recipe's LDM if a DiT, else ldm-animals).
    #[arg(long)]
    pub dit: Option<String>,
    /// Batch of every row (default: each config's train.batch_size).
    #[arg(long, value_parser = positive_usize, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    /// Timed training steps per row.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub iters: i64,
    /// Untimed training steps before them (and one untimed sampling run if > 0).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub warmup: i64,
    /// Timed sampling runs (DDIM 50 of one batch, then the VAE decode).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    pub sample_runs: i64,
    /// Classes of a class-conditional LDM (no data set is read).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub classes: i64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Also write the rows and every resolved setting (the twin's input) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Only these rows, comma-separated (vae-train, ldm-train-unet, ldm-train-dit,
    /// sample-ddim50; default all): to profile one step at a time. A sampled LDM whose
    /// training row is left out is sampled with its initial weights.
    #[arg(long, value_name = "LIST")]
    pub rows: Option<String>,
    /// f32 or bf16 (mixed precision: f32 weights, bf16 forward and backward) for every training
    /// row, and the sampling row's `sampler.precision` (default: each config's own, normally
    /// f32).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// auto, on or off: AdamW and the EMA stepping all parameters at once (`train.foreach`;
    /// default each config's own, auto: on for CUDA) for every training row.
    #[arg(long)]
    pub foreach: Option<ldm_common::adamw::Foreach>,
    /// Also time the parts of each training step (forward, backward, optimizer, EMA), syncing
    /// the device after each; the twin follows (`scripts/bench/torch_twin.py`)
    #[arg(long)]
    pub phases: bool,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A run folder written by `train-ldm` (default: the model of the README's first command).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A folder written by `train-classifier`: requests may then ask for classifier guidance
    /// with `classifier_scale`.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Address to listen on. Anything but loopback exposes the page, which has no
    /// authentication, to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Requests that may wait while one runs; past it the server answers 429.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    pub queue: usize,
    /// Most images in one request (`n`).
    #[arg(long, default_value_t = 16, value_parser = positive_usize, allow_negative_numbers = true)]
    pub max_images: usize,
    /// Largest request body in bytes (uploaded images travel base64-encoded inside it).
    #[arg(long, default_value_t = 8 << 20, value_parser = positive_usize, allow_negative_numbers = true)]
    pub max_body: usize,
    /// The network's arithmetic for every request: f32, or bf16 (its weights cast once at
    /// start; see `generate --precision`); default: the model's `sampler.precision`.
    #[arg(long)]
    pub precision: Option<Precision>,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct TrainEvaluatorArgs {
    /// A config file, or a built-in name (evaluator-animals, evaluator-fmnist).
    #[arg(long, default_value = "evaluator-animals")]
    pub config: String,
    /// Data set folder (overrides `data.dir`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "runs/evaluator-animals")]
    pub out: PathBuf,
    /// Override a config key: a dotted TOML path and a TOML value (a bare word is a string),
    /// e.g. `--set diffusion.parameterization=v`, `--set 'diffusion.loss={kind="min-snr"}'`.
    /// Repeatable, applied in order before the other flags; an inline table replaces the
    /// whole table.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from `<out>/checkpoint`.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A run folder with a metrics.csv (train-vae, train-ldm, train-evaluator, ...).
    pub run_dir: PathBuf,
    /// The PNG to write (default: RUN_DIR/metrics.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlotSweepArgs {
    /// JSON files written by `pipeline eval --json`, one per setting.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The swept setting on the x axis.
    #[arg(long, value_enum)]
    pub x: crate::plot_sweep::SweepAxis,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct TrainClassifierArgs {
    /// The LDM run folder whose latents (same VAE, same noise schedule) the classifier learns
    /// (default: the model of the README's first command).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A config file, or a built-in name (classifier-animals, classifier-fmnist).
    #[arg(long, default_value = "classifier-animals")]
    pub config: String,
    /// Output folder.
    #[arg(long, default_value = "runs/classifier")]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub device: DeviceFlag,
}

/// Classifier guidance (Dhariwal & Nichol 2021), for `generate` and `eval`.
#[derive(Debug, Args)]
pub struct ClassifierFlags {
    /// A folder written by `train-classifier`: adds its gradient toward the class to the score.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Classifier guidance scale s in eps - s sqrt(1 - alphabar_t) grad log p(y | z_t)
    /// (default 1 with --classifier).
    #[arg(long, allow_negative_numbers = true)]
    pub classifier_scale: Option<f64>,
}

/// Image-to-image (SDEdit) and inpainting flags of `generate`.
#[derive(Debug, Args)]
pub struct Img2ImgFlags {
    /// Start from this image (the model's resolution; grayscale or RGB) instead of pure noise.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// How far --init-image is noised, in (0, 1]: 1 = pure noise, near 0 = barely changed
    /// (default 0.6 with --init-image). Runs floor(steps * strength) sampler steps.
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Inpainting: a mask of --init-image's size; white = repaint, black = keep.
    #[arg(long)]
    pub mask: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run folder written by `train-ldm` (default: the model of the README's first command).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A folder written by `train-evaluator`.
    /// The evaluation classifier: `auto`, the reference evaluator compiled into `pipeline` for
    /// the model's data set (Animal-MNIST, Fashion-MNIST; frozen, so FIDs are comparable across
    /// versions and machines), or a folder written by `train-evaluator`.
    #[arg(long, default_value = "auto")]
    pub evaluator: PathBuf,
    /// Images generated per class.
    #[arg(
        short = 'n',
        long,
        default_value_t = 100,
        allow_negative_numbers = true
    )]
    pub n: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub cfg: f64,
    #[command(flatten)]
    pub sampler: SamplerFlags,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    #[command(flatten)]
    pub guidance: ClassifierFlags,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct TrainLdmArgs {
    /// A config file, or the name of a built-in one (ldm-fmnist, ldm-animals, ...).
    #[arg(long, default_value = "ldm-fmnist")]
    pub config: String,
    /// The VAE run folder whose latents are learned.
    #[arg(long, default_value = "runs/vae")]
    pub vae: PathBuf,
    /// Output run folder.
    #[arg(long, default_value = "runs/ldm")]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub split: BatchSplitFlags,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct EvalLdmArgs {
    /// A run folder written by `train-ldm`.
    #[arg(long, default_value = "runs/ldm")]
    pub model: PathBuf,
    /// Evaluate only the first N held-out latents (0 = all).
    #[arg(short = 'n', long, default_value_t = 0, allow_negative_numbers = true)]
    pub n: usize,
    /// Timesteps drawn per latent for the bound's Monte-Carlo estimate.
    #[arg(long, default_value_t = 4, value_parser = positive_usize, allow_negative_numbers = true)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// An LDM config (its `[schedule]` section is used), or a built-in name.
    #[arg(long, default_value = "ldm-fmnist")]
    pub config: String,
}

/// The sampler flags of `generate` and `eval`; each overrides the model's `[sampler]` key.
#[derive(Debug, Args, Default)]
pub struct SamplerFlags {
    /// Sampler: ddpm, ddim, plms, dpm-solver++, unipc, heun or langevin (default: the model's).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Denoising steps (default: the model's `sampler.steps`).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64))]
    pub steps: Option<i64>,
    /// DDIM eta: 0 deterministic, 1 ancestral (default: the model's `sampler.eta`).
    #[arg(long, allow_negative_numbers = true)]
    pub eta: Option<f64>,
    /// Which timesteps are visited: leading, trailing, linspace, or karras (the trained
    /// timesteps nearest Karras et al.'s noise levels, diffusers' use_karras_sigmas; default:
    /// the model's `sampler.spacing`).
    #[arg(long)]
    pub spacing: Option<String>,
    /// Clip every x0 estimate to [-C, C], as iDDPM does (default: the model's
    /// `sampler.clip_x0`, normally none).
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    pub clip_x0: Option<f64>,
    /// Guidance rescale phi in [0, 1] (Lin et al. 2024; diffusers' `guidance_rescale`): brings
    /// the classifier-free guided v-prediction's spread back toward the conditional one's, by
    /// the fraction phi (0.7 in the paper), against the over-saturation of large --cfg; no
    /// effect at --cfg 1 (default: the model's `sampler.guidance_rescale`, normally 0).
    #[arg(long, value_name = "PHI", allow_negative_numbers = true)]
    pub guidance_rescale: Option<f64>,
    /// The network's arithmetic: f32, or bf16 (its weights cast once; the sampler's updates,
    /// guidance and the VAE decode stay f32). Faster where the device has bf16 arithmetic (GPU
    /// tensor cores, CPUs with AVX512_BF16, through libtorch); default: the model's
    /// `sampler.precision`, normally f32.
    #[arg(long)]
    pub precision: Option<Precision>,
}

#[derive(Debug, Args)]
pub struct GenerateCliArgs {
    /// What to draw: any prompt for a text model; for a class-conditional model, a prompt
    /// naming a class ("cat", "a cat").
    #[arg(long)]
    pub prompt: Option<String>,
    /// What guidance steers away from: a prompt for a text model (instead of the empty
    /// prompt); for a class model, a prompt naming a class (instead of the null class).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// The class to draw, by name.
    #[arg(long)]
    pub class: Option<String>,
    /// Classifier-free guidance scale w (1 = none; default: the model's `guidance.cfg`).
    #[arg(long, allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// A run folder written by `train-ldm` (default: the model of the README's first command).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub sampler: SamplerFlags,
    /// Number of images.
    #[arg(short = 'n', long, default_value_t = 16, allow_negative_numbers = true, value_parser = clap::value_parser!(i64))]
    pub n: i64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    #[command(flatten)]
    pub img2img: Img2ImgFlags,
    #[command(flatten)]
    pub guidance: ClassifierFlags,
    /// Also write trajectory.png: how the clean-image estimate forms over the steps (one row
    /// per image, the first 8; one column per step shown, up to 10 from first to last).
    #[arg(long)]
    pub trajectory: bool,
    /// Output folder.
    #[arg(long, default_value = "generated")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A recipe file (pipelines/*.toml) or the name of a built-in one (animals, fashion-mnist).
    pub recipe: String,
    /// Steps of the VAE stage (overrides the VAE config).
    #[arg(long, value_parser = positive_u64, allow_negative_numbers = true)]
    pub vae_steps: Option<u64>,
    /// Steps of the LDM stage (overrides the LDM config).
    #[arg(long, value_parser = positive_u64, allow_negative_numbers = true)]
    pub ldm_steps: Option<u64>,
    /// Output folder (overrides the recipe's `out`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a key of a stage's config: `vae.` or `ldm.` and the key, e.g.
    /// `--set ldm.schedule.kind=cosine` (see `train-ldm --help`). Repeatable.
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub device: DeviceFlag,
}

/// How the batch of each step is computed (`train-vae`, `train-ldm`): over several devices,
/// in several sequential parts, or both.
#[derive(Debug, Args)]
pub struct BatchSplitFlags {
    /// Data-parallel training: a comma-separated list of devices of one kind (`cpu,cpu`,
    /// `cuda:0,cuda:1`), each taking an equal share of every batch (overrides `train.devices`).
    #[arg(long, value_name = "LIST", conflicts_with = "device")]
    pub devices: Option<String>,
    /// Gradient accumulation: each device computes its share of the batch in K sequential
    /// parts, one backward pass each, before the one optimizer step; the batch (and the
    /// result, up to float rounding) stays that of `--batch-size`, the activation memory is
    /// that of a K-th of it (overrides `train.gradient_accumulation_steps`).
    #[arg(long, value_name = "K", value_parser = positive_usize, allow_negative_numbers = true)]
    pub gradient_accumulation_steps: Option<usize>,
}

/// Flags shared by every training command.
#[derive(Debug, Args)]
pub struct TrainFlags {
    /// Training steps (overrides `train.steps`).
    #[arg(long, value_parser = positive_u64, allow_negative_numbers = true)]
    pub steps: Option<u64>,
    /// Images per step (overrides `train.batch_size`).
    #[arg(long, value_parser = positive_usize, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (overrides `train.lr`).
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Seed of every random choice (overrides `train.seed`).
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Override a config key: a dotted TOML path and a TOML value (a bare word is a string),
    /// e.g. `--set diffusion.parameterization=v`, `--set 'diffusion.loss={kind="min-snr"}'`.
    /// Repeatable, applied in order before the other flags; an inline table replaces the
    /// whole table.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from `<out>/checkpoint` with the same optimizer state and data order.
    #[arg(long)]
    pub resume: bool,
    /// Fine-tune: start from the weights of this finished run of the same stage and
    /// architecture (an LDM's on the same VAE) instead of a random initialisation; optimizer,
    /// steps and data order start afresh (overrides `train.init_from`; train-vae, train-ldm).
    #[arg(long, value_name = "RUN_DIR")]
    pub init_from: Option<PathBuf>,
}

impl TrainFlags {
    /// The `[train]` overrides these flags give, with `--devices LIST` and
    /// `--gradient-accumulation-steps K` where the command has them.
    pub fn overrides(&self, split: Option<&BatchSplitFlags>) -> crate::train::TrainOverrides {
        crate::train::TrainOverrides {
            sets: self.set.clone(),
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            seed: self.seed,
            devices: split
                .and_then(|s| s.devices.as_deref())
                .map(crate::train::parallel::split_list),
            gradient_accumulation_steps: split.and_then(|s| s.gradient_accumulation_steps),
            init_from: self.init_from.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainVaeArgs {
    /// A config file, or the name of a built-in one (vae-fmnist, vae-fmnist-full, vae-animals).
    #[arg(long, default_value = "vae-fmnist")]
    pub config: String,
    /// Data set folder (overrides `data.dir`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output run folder.
    #[arg(long, default_value = "runs/vae")]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub split: BatchSplitFlags,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct EvalVaeArgs {
    /// A run folder written by `train-vae`.
    #[arg(long, default_value = "runs/vae")]
    pub vae: PathBuf,
    /// Evaluate only the first N held-out images (0 = all).
    #[arg(short = 'n', long, default_value_t = 0, allow_negative_numbers = true)]
    pub n: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct DeviceFlag {
    /// cpu (burn-flex), libtorch (CPU via libtorch), cuda, cuda:N, or auto (CUDA when this
    /// build and machine have it, else libtorch's CPU in a `tch` build, else burn-flex).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

fn positive_u64(s: &str) -> Result<u64, String> {
    match s.parse::<i128>() {
        Ok(v) if v >= 1 && v <= u64::MAX as i128 => Ok(v as u64),
        _ => Err("expected a positive integer".into()),
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    positive_u64(s).map(|v| v as usize)
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("expected a positive number".into()),
    }
}
