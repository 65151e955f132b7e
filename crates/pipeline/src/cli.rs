//! The command line: each subcommand parses its flags and calls one library function.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ldm_common::device::DeviceChoice;

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
    /// Generate images: encode -> diffuse -> decode, with class guidance.
    Generate(GenerateCliArgs),
    /// Run a whole recipe: train-vae, train-ldm, then a grid with one row per class.
    Run(RunArgs),
    /// Train the evaluation classifier on a data set's real training split.
    TrainEvaluator(TrainEvaluatorArgs),
    /// Score a class-conditional model: per-class accuracy, FID (with its floor), precision/recall.
    Eval(EvalArgs),
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
    /// Continue from `<out>/checkpoint`.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run folder written by `train-ldm` (default: the model of the README's first command).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A folder written by `train-evaluator`.
    #[arg(long, default_value = "runs/evaluator-animals")]
    pub evaluator: PathBuf,
    /// Images generated per class.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub n: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub cfg: f64,
    /// Sampler (default: the model's).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Denoising steps (default: the model's).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct EvalLdmArgs {
    /// A run folder written by `train-ldm`.
    #[arg(long, default_value = "runs/ldm")]
    pub model: PathBuf,
    /// Evaluate only the first N held-out latents (0 = all).
    #[arg(short = 'n', long, default_value_t = 0)]
    pub n: usize,
    /// Timesteps drawn per latent for the bound's Monte-Carlo estimate.
    #[arg(long, default_value_t = 4, value_parser = positive_usize, allow_negative_numbers = true)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0)]
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

#[derive(Debug, Args)]
pub struct GenerateCliArgs {
    /// What to draw: for a class-conditional model, a prompt naming a class ("cat", "a cat").
    #[arg(long)]
    pub prompt: Option<String>,
    /// The class to draw, by name.
    #[arg(long)]
    pub class: Option<String>,
    /// Classifier-free guidance scale w (1 = none; default: the model's `guidance.cfg`).
    #[arg(long, allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// A run folder written by `train-ldm` (default: the model of the README's first command).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sampler: ddpm, ddim, dpm-solver++, heun or langevin (default: the model's).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Denoising steps (default: the model's `sampler.steps`).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64))]
    pub steps: Option<i64>,
    /// DDIM eta: 0 deterministic, 1 ancestral.
    #[arg(long)]
    pub eta: Option<f64>,
    /// Number of images.
    #[arg(short = 'n', long, default_value_t = 16, allow_negative_numbers = true, value_parser = clap::value_parser!(i64))]
    pub n: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    #[command(flatten)]
    pub device: DeviceFlag,
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
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from `<out>/checkpoint` with the same optimizer state and data order.
    #[arg(long)]
    pub resume: bool,
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
    pub device: DeviceFlag,
}

#[derive(Debug, Args)]
pub struct EvalVaeArgs {
    /// A run folder written by `train-vae`.
    #[arg(long, default_value = "runs/vae")]
    pub vae: PathBuf,
    /// Evaluate only the first N held-out images (0 = all).
    #[arg(short = 'n', long, default_value_t = 0)]
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
    /// build and machine have it).
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
