//! The tiny latent diffusion setup the integration tests share: one LDM config on the tiny
//! VAE's 8x8x2 latents, with the few keys the tests vary, and `train-ldm` in a [`TinyVae`]
//! folder.

use std::process::Output;

use super::{TinyVae, pipeline};

/// A tiny LDM config: a DiT with 2x2 patches (width 32, one block of 2 heads) on the tiny
/// VAE's 8x8x2 latents, a linear schedule, DDIM with 5 steps, batches of 8. The fields are the
/// keys in which the tests' configs differ; `toml()` writes the file.
#[derive(Debug, Clone, Copy)]
pub struct TinyLdmConfig<'a> {
    /// `diffusion.conditioning`: "class", "text" or "none".
    pub conditioning: &'a str,
    /// `schedule.num_timesteps`.
    pub timesteps: usize,
    /// Adds a `[text]` section: a text encoder of 6 tokens, width 16, one block of 2 heads.
    pub text_encoder: bool,
    /// `train.steps`.
    pub steps: u64,
    /// `train.lr`, as written in the file (tests replace the text `lr = 1e-3`).
    pub lr: &'a str,
    /// `train.sample_every`.
    pub sample_every: u64,
    /// `train.checkpoint_every`.
    pub checkpoint_every: u64,
    /// Lines appended to `[train]`.
    pub extra_train: &'a str,
}

impl Default for TinyLdmConfig<'_> {
    /// Class-conditional, T = 100, 4 training steps at lr 1e-3, samples and checkpoints every
    /// 2 steps.
    fn default() -> Self {
        Self {
            conditioning: "class",
            timesteps: 100,
            text_encoder: false,
            steps: 4,
            lr: "1e-3",
            sample_every: 2,
            checkpoint_every: 2,
            extra_train: "",
        }
    }
}

impl TinyLdmConfig<'_> {
    /// The config file's text.
    pub fn toml(&self) -> String {
        let Self {
            conditioning,
            timesteps,
            text_encoder,
            steps,
            lr,
            sample_every,
            checkpoint_every,
            extra_train,
        } = self;
        let text = if *text_encoder {
            "[text]\nmax_tokens = 6\ndim = 16\ndepth = 1\nheads = 2\n\n"
        } else {
            ""
        };
        format!(
            r#"
[schedule]
kind = "linear"
num_timesteps = {timesteps}

[diffusion]
conditioning = "{conditioning}"
ema_decay = 0.9

{text}[backbone]
kind = "dit"
patch_size = 2
hidden_size = 32
depth = 1
num_heads = 2

[sampler]
kind = "ddim"
steps = 5

[train]
steps = {steps}
batch_size = 8
lr = {lr}
warmup_steps = 1
log_every = 1
sample_every = {sample_every}
checkpoint_every = {checkpoint_every}
{extra_train}
"#
        )
    }
}

impl TinyVae {
    /// `pipeline train-ldm --config <config> --vae <vae> --out <out>` and `flags`, the three
    /// paths relative to this folder (`flags` pick the device).
    pub fn train_ldm_on(&self, config: &str, vae: &str, out: &str, flags: &[&str]) -> Output {
        let (config, vae, out) = (self.p(config), self.p(vae), self.p(out));
        let mut args = vec![
            "train-ldm",
            "--config",
            &config,
            "--vae",
            &vae,
            "--out",
            &out,
        ];
        args.extend_from_slice(flags);
        pipeline(&args)
    }

    /// `train-ldm` of `config` on the VAE in `vae/`, on the CPU, into `out`, plus `extra`.
    pub fn train_ldm(&self, config: &str, out: &str, extra: &[&str]) -> Output {
        let mut flags = vec!["--device", "cpu"];
        flags.extend_from_slice(extra);
        self.train_ldm_on(config, "vae", out, &flags)
    }
}
