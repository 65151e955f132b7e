//! The `[train]` section shared by every training command.

use ldm_common::adamw::{AdamW, Foreach, FusedAdamW};
use ldm_common::precision::Precision;
use serde::{Deserialize, Serialize};

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrDecay {
    Constant,
    /// Cosine from `lr` down to `lr / 10` at the last step.
    Cosine,
}

/// Optimisation and bookkeeping of one training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps in total (`--steps`).
    #[serde(default = "d_steps")]
    pub steps: u64,
    /// Images per step (`--batch-size`).
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Peak learning rate of AdamW (`--lr`).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Linear warm-up from 0 to `lr` over this many steps.
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    #[serde(default = "d_decay")]
    pub lr_decay: LrDecay,
    /// Decoupled weight decay of AdamW.
    #[serde(default)]
    pub weight_decay: f64,
    /// Per-parameter gradient-norm clipping (burn's `GradientClipping::Norm`); 0 disables it.
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// Seed of every random choice (`--seed`).
    #[serde(default)]
    pub seed: u64,
    /// Steps between metric rows (and progress-bar updates).
    #[serde(default = "d_log")]
    pub log_every: u64,
    /// Steps between sample grids.
    #[serde(default = "d_sample")]
    pub sample_every: u64,
    /// Steps between checkpoints.
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    /// Data-parallel training (`--devices`): devices such as `["cpu", "cpu"]` or
    /// `["cuda:0", "cuda:1"]`, each taking an equal share of every batch; empty: the one
    /// `--device`. See [`super::parallel`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Gradient accumulation (`--gradient-accumulation-steps`): each device computes its share
    /// of the batch in this many equal sequential parts, one backward pass each, and one
    /// optimizer step follows. `batch_size` stays the batch of one optimizer step (DeepSpeed's
    /// convention; in diffusers' scripts the batch is per part), so a recipe keeps its meaning
    /// and only the activation memory shrinks. See [`super::parallel`].
    #[serde(default = "d_one", skip_serializing_if = "is_one")]
    pub gradient_accumulation_steps: usize,
    /// A finished run of the same stage and architecture whose weights (`model.safetensors`;
    /// an LDM's are its EMA weights) this run starts from instead of a random initialisation
    /// (`--init-from`; diffusers' `--pretrained_model_name_or_path`): fine-tuning. The
    /// optimizer, the step count, the learning-rate schedule and the data order start afresh;
    /// an LDM's EMA starts from the same weights. For `train-vae` and `train-ldm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
    /// `"f32"`, or `"bf16"`: mixed precision, f32 weights and optimizer state with forward and
    /// backward in bf16 (`ldm_common::precision`). For the GPU, and for libtorch on a CPU with
    /// bf16 arithmetic (AVX512_BF16); elsewhere, and always on burn-flex, it is slower than f32
    /// (docs/PERFORMANCE.md).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// `"auto"` (on CUDA), `"on"` or `"off"`: AdamW and the EMA update every parameter at
    /// once, a few dozen libtorch calls in all instead of about 16 per parameter
    /// (`ldm_common::adamw::AdamW`; PyTorch's `foreach`). The same arithmetic and the same
    /// checkpoints either way; burn-flex parameters always take the per-parameter kernel.
    #[serde(default, skip_serializing_if = "Foreach::is_auto")]
    pub foreach: Foreach,
}

fn d_one() -> usize {
    1
}
fn is_one(k: &usize) -> bool {
    *k == 1
}
fn d_steps() -> u64 {
    2000
}
fn d_batch() -> usize {
    64
}
fn d_lr() -> f64 {
    1e-3
}
fn d_warmup() -> u64 {
    100
}
fn d_decay() -> LrDecay {
    LrDecay::Cosine
}
fn d_clip() -> f64 {
    1.0
}
fn d_log() -> u64 {
    10
}
fn d_sample() -> u64 {
    500
}
fn d_ckpt() -> u64 {
    500
}

impl Default for TrainConfig {
    fn default() -> Self {
        crate::config::parse_str("").expect("all keys have defaults")
    }
}

impl TrainConfig {
    /// AdamW as training uses it: the run's decoupled weight decay and per-parameter
    /// gradient-norm clipping (`grad_clip` > 0); burn's defaults beta = (0.9, 0.999), eps = 1e-5.
    /// Each parameter's step is one fused operation ([`FusedAdamW`]: burn's `AdamW` +
    /// `GradientClipping::Norm` step, with the same state, so checkpoints written before it
    /// resume), or with [`TrainConfig::foreach_on`] all parameters' steps are one.
    pub fn optimizer(&self, device: &burn::tensor::Device) -> AdamW {
        FusedAdamW::new(self.weight_decay as f32, self.grad_clip as f32)
            .module(self.foreach_on(device))
    }

    /// Whether a model on `device` takes the all-at-once optimizer step and EMA update.
    pub fn foreach_on(&self, device: &burn::tensor::Device) -> bool {
        self.foreach.enabled(device)
    }

    /// Checks values; messages name the key and its flag.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("steps", "--steps", self.steps),
            ("batch_size", "--batch-size", self.batch_size as u64),
            ("log_every", "", self.log_every),
            ("sample_every", "", self.sample_every),
            ("checkpoint_every", "", self.checkpoint_every),
            (
                "gradient_accumulation_steps",
                "--gradient-accumulation-steps",
                self.gradient_accumulation_steps as u64,
            ),
        ];
        for (key, flag, value) in positive {
            if value == 0 {
                let via = if flag.is_empty() {
                    String::new()
                } else {
                    format!(" ({flag})")
                };
                return Err(format!("train.{key} = 0{via}: expected at least 1"));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!(
                "train.lr = {} (--lr): expected a positive number",
                self.lr
            ));
        }
        if !(self.weight_decay >= 0.0 && self.grad_clip >= 0.0) {
            return Err("train.weight_decay and train.grad_clip must be >= 0".into());
        }
        super::parallel::check_split(
            &self.devices,
            self.batch_size,
            self.gradient_accumulation_steps,
        )
    }

    /// Refuses mixed precision for a stage that trains in f32 only.
    pub fn require_f32(&self, command: &str) -> Result<(), String> {
        if self.precision.is_f32() {
            Ok(())
        } else {
            Err(format!(
                "train.precision = \"bf16\": {command} trains in f32 only (mixed precision is for train-vae and train-ldm); remove the key"
            ))
        }
    }

    /// Learning rate at `step` (0-based): linear warm-up, then constant or cosine decay.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.lr_decay {
            LrDecay::Constant => self.lr,
            LrDecay::Cosine => {
                let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let min = self.lr / 10.0;
                min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let c = TrainConfig {
            steps: 1100,
            warmup_steps: 100,
            lr: 1.0,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(0) - 0.01).abs() < 1e-12);
        assert!((c.lr_at(99) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(100) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(600) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(1100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn zero_steps_is_refused() {
        let c = TrainConfig {
            steps: 0,
            ..TrainConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err(),
            "train.steps = 0 (--steps): expected at least 1"
        );
    }
}

/// Flags of a training command that override `[train]` keys (`--steps`, `--batch-size`,
/// `--lr`, `--seed`).
#[derive(Debug, Clone, Default)]
pub struct TrainOverrides {
    /// `--set KEY=VALUE` flags, applied to the config file before the flags below.
    pub sets: Vec<String>,
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub lr: Option<f64>,
    pub seed: Option<u64>,
    /// `--devices LIST`, split at commas (`train.devices`).
    pub devices: Option<Vec<String>>,
    /// `--gradient-accumulation-steps K`.
    pub gradient_accumulation_steps: Option<usize>,
    /// `--init-from DIR`.
    pub init_from: Option<std::path::PathBuf>,
}

impl TrainOverrides {
    /// Writes every given flag into `train`.
    pub fn apply(&self, train: &mut TrainConfig) {
        if let Some(v) = self.steps {
            train.steps = v;
        }
        if let Some(v) = self.batch_size {
            train.batch_size = v;
        }
        if let Some(v) = self.lr {
            train.lr = v;
        }
        if let Some(v) = self.seed {
            train.seed = v;
        }
        if let Some(v) = &self.devices {
            train.devices = v.clone();
        }
        if let Some(v) = self.gradient_accumulation_steps {
            train.gradient_accumulation_steps = v;
        }
        if let Some(v) = &self.init_from {
            train.init_from = Some(v.clone());
        }
    }
}
