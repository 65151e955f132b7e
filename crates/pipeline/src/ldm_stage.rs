//! Stage 2 wired to the VAE and disk: `pipeline train-ldm`, `pipeline eval-ldm`, and
//! [`LdmRun`], a trained latent diffusion model loaded from its run folder.
//!
//! An LDM run folder holds `config.toml`, `model.safetensors` (the EMA weights, used for
//! sampling), `ldm.json` (the VAE it belongs to, by path and checksum; shapes; classes),
//! `tokenizer.json` (a text-conditioned model's tokenizer), `metrics.csv`,
//! `samples/step-*.png`, `latents/` (the cache) and `checkpoint/`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{ensure_writable_dir, read_json, sha256_file, write_json};
use ldm_common::data::{self, BatchOrder, Splits};
use ldm_common::precision::Precision;
use ldm_common::rng::{randn, stream};
use ldm_common::upload;
use ldm_common::weights::{
    load_record, load_safetensors_renamed, save_record, save_safetensors_renamed,
};
use ldm_diffusion::backbone::{BackboneConfig, ConditioningSpec};
use ldm_diffusion::denoiser::{Backbone, Conditioning};
use ldm_diffusion::ldm_model::LdmModel;
use ldm_diffusion::loss::{LossWeighting, diffusion_loss};
use ldm_diffusion::parameterization::Parameterization;
use ldm_diffusion::schedule::{Schedule, ScheduleConfig};
use ldm_diffusion::training_table::TrainingTable;
use rand::RngExt;

use crate::latents::{self, LatentSet, LatentSource};
use crate::run_dir::InitFrom;
use crate::sampling::{self, GuidanceConfig};
use crate::text::{self, Captions, PromptTokenizer, TextSettings};
use crate::train::parallel::take_rows;
use crate::train::{self, Outcome, ShardedTask, TrainConfig, TrainTask};
use crate::vae_stage::VaeRun;
use crate::{ema, run_dir};
use ldm_diffusion::sampler::SamplerOptions;

/// What the diffusion model is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditioningKind {
    /// Unconditional.
    None,
    /// The class label, through a label embedding with a learned null class.
    Class,
    /// A caption, through a text encoder trained jointly with the backbone: cross-attention
    /// to its token embeddings and its pooled embedding added to the time embedding; the
    /// empty prompt is the unconditional input.
    Text,
}

/// The `[diffusion]` section: what is learned and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSettings {
    #[serde(default)]
    pub parameterization: Parameterization,
    #[serde(default)]
    pub loss: LossWeighting,
    /// Which latent of q(z|x) is cached and learned.
    #[serde(default = "d_latents")]
    pub latents: LatentSource,
    /// Decay of the EMA of the weights used for sampling.
    #[serde(default = "d_ema")]
    pub ema_decay: f64,
    #[serde(default = "d_cond")]
    pub conditioning: ConditioningKind,
    /// Probability of replacing the condition by the null class (or the caption by the empty
    /// prompt) in training (classifier-free guidance, Ho & Salimans 2022).
    #[serde(default = "d_uncond")]
    pub p_uncond: f64,
}

fn d_latents() -> LatentSource {
    LatentSource::Mean
}
fn d_ema() -> f64 {
    0.999
}
fn d_cond() -> ConditioningKind {
    ConditioningKind::None
}
fn d_uncond() -> f64 {
    0.1
}

impl Default for DiffusionSettings {
    fn default() -> Self {
        crate::config::parse_str("").expect("all keys have defaults")
    }
}

/// A `train-ldm` config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdmRunConfig {
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub diffusion: DiffusionSettings,
    #[serde(default)]
    pub backbone: BackboneConfig,
    /// The tokenizer's prompt length and the text encoder (with `conditioning = "text"`).
    #[serde(default)]
    pub text: TextSettings,
    /// The sampler of the preview grids and `generate`'s default.
    #[serde(default)]
    pub sampler: SamplerOptions,
    #[serde(default)]
    pub guidance: GuidanceConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

impl LdmRunConfig {
    /// Checks every section before anything is built.
    pub fn validate(&self) -> Result<()> {
        self.train.validate().map_err(anyhow::Error::msg)?;
        self.diffusion.loss.validate()?;
        self.diffusion
            .parameterization
            .check_schedule(&self.schedule)?;
        let d = &self.diffusion;
        if !(0.0..1.0).contains(&d.ema_decay) {
            bail!(
                "diffusion.ema_decay = {}: expected a number in [0, 1)",
                d.ema_decay
            );
        }
        if !(0.0..1.0).contains(&d.p_uncond) {
            bail!(
                "diffusion.p_uncond = {}: expected a probability in [0, 1)",
                d.p_uncond
            );
        }
        if d.conditioning == ConditioningKind::Text {
            self.text.validate()?;
        }
        let schedule = Schedule::new(&self.schedule)?;
        self.sampler.validate(&schedule)?;
        self.guidance.validate()?;
        Ok(())
    }
}

/// What `ldm.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LdmInfo {
    /// The VAE run folder, as given to `train-ldm`.
    pub vae_dir: PathBuf,
    /// SHA-256 of the VAE's `model.safetensors`: a model is refused with any other VAE.
    pub vae_sha256: String,
    pub latent_shape: [usize; 3],
    pub class_names: Vec<String>,
    pub num_params: usize,
    pub steps: u64,
    /// SHA-256 of this run's `model.safetensors`.
    pub weights_sha256: String,
    /// SHA-256 of `tokenizer.json` (a text-conditioned model): the model is refused with any
    /// other tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    /// The run whose weights training started from (`--init-from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
}

/// Tensor names of `model.safetensors`: the backbone's as a bare backbone's ("DiT.blocks.0...",
/// "UNet..."), the text encoder's under "text_encoder.", so weights written before the text
/// encoder joined the model still load.
const SAVED_NAMES: &[(&str, &str)] = &[(r"^backbone\.", "")];
const LOADED_NAMES: &[(&str, &str)] = &[(r"^(UNet|DiT)\.", "backbone.${1}.")];

/// `--init-from`, checked before anything is encoded: the finished LDM run in `src`, which
/// must have learned the latents of this run's VAE; its `ldm.json`.
fn init_source(src: &Path, vae: &VaeRun) -> Result<LdmInfo> {
    run_dir::require(
        src,
        "LDM run",
        &["config.toml", "ldm.json", "model.safetensors"],
        &format!("pipeline train-ldm --out {}", src.display()),
    )?;
    let info: LdmInfo = read_json(&src.join("ldm.json"))?;
    if info.vae_sha256 != vae.info.weights_sha256 {
        bail!(
            "--init-from {}: that model learned the latents of another VAE (sha256 {}…) than --vae {} ({}…); fine-tune it on the latents of the VAE it was trained on",
            src.display(),
            &info.vae_sha256[..12.min(info.vae_sha256.len())],
            vae.dir.display(),
            &vae.info.weights_sha256[..12]
        );
    }
    Ok(info)
}

/// `model` (this run's architecture) with the weights of the run `src` ([`init_source`]); a
/// text model's tokenizer (`out/tokenizer.json`, from this run's captions) must be the one
/// `src` was trained with, or its token ids would mean other words.
fn init_from(
    model: LdmModel,
    src: &Path,
    info: &LdmInfo,
    out: &Path,
    text: bool,
) -> Result<LdmModel> {
    if text {
        let ours = sha256_file(&out.join("tokenizer.json"))?;
        if info.tokenizer_sha256.as_deref() != Some(ours.as_str()) {
            bail!(
                "--init-from {}: its tokenizer differs from the one this run's captions give (other classes or captions, or not a text model): its token ids would mean other words",
                src.display()
            );
        }
    }
    load_safetensors_renamed(model, &src.join("model.safetensors"), LOADED_NAMES)
        .with_context(|| format!("--init-from {}", src.display()))
}

/// The conditioning spec of a config and data set.
fn conditioning_spec(config: &LdmRunConfig, num_classes: usize) -> ConditioningSpec {
    let kind = config.diffusion.conditioning;
    ConditioningSpec {
        num_classes: (kind == ConditioningKind::Class).then_some(num_classes),
        text_dim: (kind == ConditioningKind::Text).then_some(config.text.dim),
    }
}

/// The model of a config for `c x s x s` latents: class-conditional on `num_classes` classes,
/// or text-conditional with a tokenizer of `vocab_size` ids.
fn build_model(
    config: &LdmRunConfig,
    [c, s]: [usize; 2],
    num_classes: usize,
    tokenizer: Option<&PromptTokenizer>,
    device: &Device,
) -> Result<LdmModel> {
    let spec = conditioning_spec(config, num_classes);
    let text = tokenizer.map(|t| config.text.encoder_config(t.vocab_size()));
    Ok(LdmModel::init(
        &config.backbone,
        c,
        s,
        spec.num_classes,
        text.as_ref(),
        device,
    )?)
}

/// What a batch of images is asked to show, and what classifier-free guidance steers away
/// from.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Unconditional.
    None,
    /// One class per image; guidance against the `negative` class or the learned null class.
    Class {
        labels: Vec<usize>,
        negative: Option<usize>,
    },
    /// One prompt per image; guidance against the `negative` prompt or the empty prompt.
    Text {
        prompts: Vec<String>,
        negative: Option<String>,
    },
}

/// A trained LDM with its VAE.
pub struct LdmRun {
    pub dir: PathBuf,
    pub config: LdmRunConfig,
    pub info: LdmInfo,
    pub schedule: Schedule,
    pub model: LdmModel,
    /// The tokenizer of a text-conditioned model.
    pub tokenizer: Option<PromptTokenizer>,
    pub vae: VaeRun,
}

impl LdmRun {
    /// Loads a run folder and the VAE it was trained on, refusing a VAE whose checksum differs.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let how = format!("pipeline train-ldm --out {}", dir.display());
        run_dir::require(
            dir,
            "LDM run",
            &["config.toml", "ldm.json", "model.safetensors"],
            &how,
        )?;
        let config: LdmRunConfig = crate::config::read(&dir.join("config.toml"))?;
        if config.diffusion.conditioning == ConditioningKind::Text {
            run_dir::require(dir, "LDM run", &["tokenizer.json"], &how)?;
        }
        let mut info: LdmInfo = read_json(&dir.join("ldm.json"))?;
        info.weights_sha256 = run_dir::weights_sha256(dir, "ldm.json", &info.weights_sha256)?;
        let vae_dir = if info.vae_dir.is_absolute() {
            info.vae_dir.clone()
        } else {
            dir.join(&info.vae_dir)
        };
        let vae = VaeRun::load(&vae_dir, device)?;
        if vae.info.weights_sha256 != info.vae_sha256 {
            bail!(
                "{}: the VAE in {} has changed since this model was trained (sha256 {}…, expected {}…); retrain the LDM or restore that VAE",
                dir.display(),
                vae_dir.display(),
                &vae.info.weights_sha256[..12],
                &info.vae_sha256[..12.min(info.vae_sha256.len())]
            );
        }
        let tokenizer = match config.diffusion.conditioning {
            ConditioningKind::Text => Some(load_tokenizer(dir, &config, &info)?),
            _ => None,
        };
        let schedule = Schedule::new(&config.schedule)?;
        let [c, s, _] = info.latent_shape;
        let model = build_model(
            &config,
            [c, s],
            info.class_names.len(),
            tokenizer.as_ref(),
            device,
        )?;
        let model = load_safetensors_renamed(model, &dir.join("model.safetensors"), LOADED_NAMES)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            info,
            schedule,
            model,
            tokenizer,
            vae,
        })
    }

    /// Whether the model was trained with class labels.
    pub fn class_conditional(&self) -> bool {
        self.config.diffusion.conditioning == ConditioningKind::Class
    }

    /// Whether the model was trained with captions.
    pub fn text_conditional(&self) -> bool {
        self.config.diffusion.conditioning == ConditioningKind::Text
    }

    /// Whether the model was trained with a condition (class or caption).
    pub fn conditional(&self) -> bool {
        self.config.diffusion.conditioning != ConditioningKind::None
    }

    /// Asks for the classes `labels`: the labels themselves for a class-conditional model,
    /// the class names as prompts for a text model, nothing for an unconditional one.
    pub fn class_condition(&self, labels: &[usize]) -> Condition {
        match self.config.diffusion.conditioning {
            ConditioningKind::None => Condition::None,
            ConditioningKind::Class => Condition::Class {
                labels: labels.to_vec(),
                negative: None,
            },
            ConditioningKind::Text => Condition::Text {
                prompts: labels
                    .iter()
                    .map(|&l| self.info.class_names[l].clone())
                    .collect(),
                negative: None,
            },
        }
    }

    /// The unconditional input of a batch of `n`: the learned null class, the empty prompt,
    /// or nothing.
    pub fn null_condition(&self, n: usize, device: &Device) -> Result<Conditioning> {
        Ok(
            match (&self.config.diffusion.conditioning, &self.tokenizer) {
                (ConditioningKind::Class, _) => {
                    let nulls = vec![self.info.class_names.len() as i64; n];
                    Conditioning {
                        class: Some(upload::int(nulls, [n], device)),
                        text: None,
                    }
                }
                (ConditioningKind::Text, Some(tokenizer)) => Conditioning {
                    class: None,
                    text: Some(text::encode_prompts(
                        &self.model,
                        tokenizer,
                        &vec![""; n],
                        device,
                    )?),
                },
                _ => Conditioning::none(),
            },
        )
    }

    /// Samples and decodes one image per entry of `labels` (see
    /// [`class_condition`](Self::class_condition)), or `n` unconditional images, in [-1, 1].
    ///
    /// # Shapes
    /// - result: `[n, channels, height, width]`
    #[allow(clippy::too_many_arguments)]
    pub fn sample_images(
        &self,
        labels: Option<&[usize]>,
        n: usize,
        cfg: f64,
        sampler: &SamplerOptions,
        seed: u64,
        device: &Device,
        progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
    ) -> Result<Tensor<4>> {
        self.sample_images_with(
            labels,
            n,
            cfg,
            sampler,
            seed,
            sampling::SampleExtras::default(),
            device,
            progress,
        )
    }

    /// [`LdmRun::sample_images`] from an init latent (image-to-image, inpainting) and/or with
    /// classifier guidance.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_images_with(
        &self,
        labels: Option<&[usize]>,
        n: usize,
        cfg: f64,
        sampler: &SamplerOptions,
        seed: u64,
        extras: sampling::SampleExtras,
        device: &Device,
        progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
    ) -> Result<Tensor<4>> {
        let condition = labels.map_or(Condition::None, |l| self.class_condition(l));
        self.sample(&condition, n, cfg, sampler, seed, extras, device, progress)
    }

    /// Samples in `precision` from now on: the default of [`LdmRun::sample`]'s requests
    /// (`sampler.precision`), with the weights cast once here rather than on every request
    /// (`serve --precision`).
    pub fn set_sampling_precision(&mut self, precision: Precision) {
        self.config.sampler.precision = precision;
        self.model = precision.compute_copy(&self.model).into_owned();
    }

    /// Samples and decodes one image per class or prompt of `condition` (or `n` unconditional
    /// images), in [-1, 1], with classifier-free guidance of scale `cfg` and the `extras` of
    /// [`sampling::SampleExtras`].
    ///
    /// # Shapes
    /// - result: `[n, channels, height, width]`
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        condition: &Condition,
        n: usize,
        cfg: f64,
        sampler: &SamplerOptions,
        seed: u64,
        extras: sampling::SampleExtras,
        device: &Device,
        progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
    ) -> Result<Tensor<4>> {
        if !sampler.precision.is_f32() && ldm_common::flex::is_flex(device) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!(
                    "warning: sampler.precision = \"bf16\" on burn-flex runs burn's generic bf16 operations, slower than f32 there (the project's fast burn-flex operations are f32): use f32 on burn-flex, bf16 with --device libtorch or cuda"
                )
            });
        }
        // bf16: a copy with its weights cast, for the text encoder and the backbone alike
        let model = sampler.precision.compute_copy(&self.model);
        let (labels, negative_class, text, n) = match (condition, &self.tokenizer) {
            (Condition::None, _) => (None, None, None, n),
            (Condition::Class { labels, negative }, None) if self.class_conditional() => {
                (Some(labels.as_slice()), *negative, None, labels.len())
            }
            (Condition::Text { prompts, negative }, Some(tokenizer)) => {
                let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
                let pair =
                    text::guidance_pair(&model, tokenizer, &prompts, negative.as_deref(), device)?;
                (None, None, Some(pair), prompts.len())
            }
            _ => bail!(
                "{}: a model conditioned on {:?} cannot follow {condition:?}",
                self.dir.display(),
                self.config.diffusion.conditioning
            ),
        };
        let request = sampling::Request {
            sampler,
            labels,
            num_classes: self.info.class_names.len(),
            negative_class,
            text,
            latent_shape: self.info.latent_shape,
            cfg,
            n,
            seed,
        };
        let parameterization = self.config.diffusion.parameterization;
        let latents = sampling::sample_latents_with(
            &model,
            &self.schedule,
            parameterization,
            &request,
            extras,
            device,
            progress,
        )?;
        Ok(sampling::decode(&self.vae, latents))
    }
}

/// Loads the tokenizer of a text model, refusing one whose checksum is not the one recorded
/// at training.
fn load_tokenizer(dir: &Path, config: &LdmRunConfig, info: &LdmInfo) -> Result<PromptTokenizer> {
    let path = dir.join("tokenizer.json");
    if let Some(expected) = &info.tokenizer_sha256 {
        let found = sha256_file(&path)?;
        if &found != expected {
            bail!(
                "{}: tokenizer.json has changed since this model was trained (sha256 {}…, expected {}…); restore it or retrain the model",
                dir.display(),
                &found[..12],
                &expected[..12.min(expected.len())]
            );
        }
    }
    PromptTokenizer::load(&path, config.text.max_tokens)
}

impl ShardedTask for LdmTask {
    fn batch_indices(&mut self, step: u64) -> Vec<usize> {
        self.order.batch(step)
    }

    fn forward_rows(
        &self,
        model: &LdmModel,
        step: u64,
        indices: &[usize],
        rows: Range<usize>,
        device: &Device,
    ) -> (Tensor<1>, Vec<Tensor<1>>) {
        let b = indices.len();
        let z0 = self.latents.batch(&indices[rows.clone()], device);
        let mut rng = stream(self.seed, "ldm-t", step);
        let t: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..self.schedule.num_timesteps()))
            .collect();
        let t = t[rows.clone()].to_vec();
        let [_, c, h, w] = z0.dims();
        let eps = randn(
            &mut stream(self.seed, "ldm-eps", step),
            [b, c, h, w],
            device,
        );
        let eps = take_rows(eps, &rows);
        let cond = Conditioning {
            class: self.labels(indices, &rows, step, device),
            text: self.text(model, indices, &rows, step, device),
        };
        let loss = ldm_loss(model, &self.table, z0, &t, eps, &cond);
        (loss.clone(), vec![loss])
    }
}

/// The LDM training loss of one batch (`train-ldm`'s step, and `pipeline bench`'s):
/// z_t = q_sample(z_0, t, eps), output = model(z_t, t, cond), loss = weighted MSE to the
/// parameterization's target. The per-sample coefficients are gathered on the device from
/// `table` (one upload of `t`; see [`TrainingTable`]).
pub(crate) fn ldm_loss(
    model: &LdmModel,
    table: &TrainingTable,
    z0: Tensor<4>,
    t: &[usize],
    eps: Tensor<4>,
    cond: &Conditioning,
) -> Tensor<1> {
    let c = table.gather(t, &z0.device());
    let z_t = c.q_sample(z0.clone(), eps.clone());
    let target = c.target(z0, eps);
    let output = model.forward(z_t, c.t, cond);
    diffusion_loss(output, target, c.weights)
}

struct LdmTask {
    latents: LatentSet,
    order: BatchOrder,
    schedule: Schedule,
    /// The training step's per-timestep coefficients (from `schedule` and `settings`).
    table: TrainingTable,
    settings: DiffusionSettings,
    spec: ConditioningSpec,
    seed: u64,
    device: Device,
    /// EMA weights, on the plain (no autodiff) device.
    ema: LdmModel,
    /// Whether the EMA blends all parameters at once (`train.foreach`).
    foreach: bool,
    /// A text model's tokenizer and the captions of its training images.
    tokenizer: Option<PromptTokenizer>,
    captions: Option<Captions>,
    vae: VaeRun,
    sampler: SamplerOptions,
    guidance: GuidanceConfig,
    class_names: Vec<String>,
    run_dir: PathBuf,
}

impl LdmTask {
    /// Labels of rows `rows` of a batch, a fraction `p_uncond` of the batch replaced by the
    /// null class.
    fn labels(
        &self,
        indices: &[usize],
        rows: &Range<usize>,
        step: u64,
        device: &Device,
    ) -> Option<Tensor<1, Int>> {
        let num_classes = self.spec.num_classes?;
        let mut rng = stream(self.seed, "ldm-cfg-drop", step);
        let labels: Vec<i64> = indices
            .iter()
            .map(|&i| {
                if rng.random::<f64>() < self.settings.p_uncond {
                    num_classes as i64
                } else {
                    self.latents.labels[i] as i64
                }
            })
            .collect();
        let labels = labels[rows.clone()].to_vec();
        Some(upload::int(labels, [rows.len()], device))
    }

    /// A text model's conditioning of rows `rows` of a batch: tau_theta of the captions drawn
    /// for the batch (the empty prompt with probability `p_uncond`).
    fn text(
        &self,
        model: &LdmModel,
        indices: &[usize],
        rows: &Range<usize>,
        step: u64,
        device: &Device,
    ) -> Option<ldm_diffusion::denoiser::TextConditioning> {
        let captions = self.captions.as_ref()?;
        let batch = captions.draw(
            indices,
            &self.latents.labels,
            self.settings.p_uncond,
            self.seed,
            step,
        );
        Some(text::encode_batch(model, &batch[rows.clone()], device))
    }
}

impl TrainTask for LdmTask {
    type Model = LdmModel;

    fn metric_names(&self) -> Vec<&'static str> {
        vec!["loss"]
    }

    fn forward(&mut self, model: &LdmModel, step: u64) -> (Tensor<1>, Vec<Tensor<1>>) {
        let indices = self.order.batch(step);
        let device = self.device.clone();
        self.forward_rows(model, step, &indices, 0..indices.len(), &device)
    }

    fn after_update(&mut self, model: &LdmModel, step: u64) {
        let decay = ema::warmed_decay(self.settings.ema_decay, step);
        ema::update(&mut self.ema, model, decay, self.foreach);
    }

    fn write_samples(&mut self, _model: &LdmModel, step: u64) -> Result<()> {
        let plain = self
            .ema
            .devices()
            .into_iter()
            .next()
            .unwrap_or_else(Device::flex);
        let n = self.class_names.len().clamp(1, 10);
        let labels = self
            .spec
            .num_classes
            .map(|_| (0..n).collect::<Vec<usize>>());
        // a text model is prompted with the class names
        let text = match &self.tokenizer {
            Some(tokenizer) => {
                let prompts: Vec<&str> = (0..n)
                    .map(|i| self.class_names.get(i).map_or("", String::as_str))
                    .collect();
                Some(text::guidance_pair(
                    &self.ema, tokenizer, &prompts, None, &plain,
                )?)
            }
            None => None,
        };
        let request = sampling::Request {
            sampler: &self.sampler,
            labels: labels.as_deref(),
            num_classes: self.class_names.len(),
            negative_class: None,
            cfg: if labels.is_some() || text.is_some() {
                self.guidance.cfg
            } else {
                1.0
            },
            text,
            latent_shape: self.latents.meta.shape,
            n,
            seed: self.seed,
        };
        let latents = sampling::sample_latents(
            &self.ema,
            &self.schedule,
            self.settings.parameterization,
            &request,
            &plain,
            None,
        )?;
        let images = sampling::decode(&self.vae, latents);
        let path = self
            .run_dir
            .join("samples")
            .join(format!("step-{step:06}.png"));
        ldm_common::image_io::write_grid(&path, images, n)?;
        Ok(())
    }

    fn save_extra(&self, dir: &Path) -> Result<()> {
        save_record(&self.ema, &dir.join("ema.bpk"))?;
        Ok(())
    }

    fn load_extra(&mut self, dir: &Path) -> Result<()> {
        self.ema = load_record(self.ema.clone(), &dir.join("ema.bpk"))?;
        Ok(())
    }
}

/// Flags of `train-ldm` that override config keys.
pub type Overrides = crate::train::TrainOverrides;

/// What `train-ldm` reports.
pub struct LdmSummary {
    pub out: PathBuf,
    pub steps: u64,
    pub num_params: usize,
}

/// `pipeline train-ldm`: encodes (or reuses) the latent cache, trains, and writes the run
/// folder; `None` when Ctrl-C stopped it after saving a checkpoint.
pub fn train_ldm(
    config_path: &Path,
    vae_dir: &Path,
    overrides: &Overrides,
    out: &Path,
    device: &Device,
    resume: bool,
) -> Result<Option<LdmSummary>> {
    let mut config: LdmRunConfig = crate::overrides::read(config_path, &overrides.sets)?;
    overrides.apply(&mut config.train);
    config.validate()?;
    let device = &train::parallel::main_device(&config.train, device)?;
    if config.train.devices.len() > 1
        && let BackboneConfig::UNet(unet) = &config.backbone
        && unet.dropout > 0.0
    {
        bail!(
            "backbone.dropout = {} with --devices {}: dropout masks come from each device's own generator, not from --seed, so several devices cannot reproduce one-device training; set backbone.dropout = 0 or train on one device",
            unet.dropout,
            config.train.devices.join(",")
        );
    }
    let vae = VaeRun::load(vae_dir, device)?;
    let source = match (&config.train.init_from, resume) {
        (Some(src), false) => Some((src, init_source(src, &vae)?)),
        _ => None,
    };
    let [c, s, _] = vae.info.latent_shape;
    let class_names = vae.info.class_names.clone();
    let spec = conditioning_spec(&config, class_names.len());
    config.backbone.validate(c, s, &spec)?;
    ensure_writable_dir(out)?;
    crate::resume_check::check(out, &config, resume)?;
    run_dir::write_config(out, &config)?;

    let Splits { train, .. } = data::load(&vae.config.data)?;
    let latents = latents::load_or_encode(
        &out.join("latents"),
        "train",
        &vae,
        &train,
        config.diffusion.latents,
        config.train.seed,
        device,
    )?;
    // A text model: the tokenizer, trained on the class templates and captions, and the
    // captions of each training image.
    let tokenizer = match config.diffusion.conditioning {
        ConditioningKind::Text => {
            let corpus = text::corpus(&class_names, &train.captions);
            let tokenizer = PromptTokenizer::train(&corpus, config.text.max_tokens)?;
            tokenizer.save(&out.join("tokenizer.json"))?;
            Some(tokenizer)
        }
        _ => None,
    };
    let captions = tokenizer
        .as_ref()
        .map(|t| Captions::new(t, &class_names, &train.captions))
        .transpose()?;
    let schedule = Schedule::new(&config.schedule)?;
    let ad = device.clone().autodiff();
    ad.seed(config.train.seed);
    let model = build_model(&config, [c, s], class_names.len(), tokenizer.as_ref(), &ad)?;
    let text = tokenizer.is_some();
    let model = match source {
        Some((src, info)) => InitFrom::start(out, Some(src), resume, model, |model, src| {
            init_from(model, src, &info, out, text)
        })?,
        None => InitFrom::start(out, None, resume, model, |model, _| Ok(model))?,
    };
    let num_params = model.num_params();
    let mut task = LdmTask {
        order: BatchOrder::new(
            config.train.seed,
            latents.labels.len(),
            config.train.batch_size,
        ),
        latents,
        table: TrainingTable::new(
            &schedule,
            config.diffusion.parameterization,
            &config.diffusion.loss,
        ),
        schedule,
        settings: config.diffusion.clone(),
        spec,
        seed: config.train.seed,
        device: ad.clone(),
        ema: model.valid(),
        foreach: config.train.foreach_on(device),
        tokenizer: tokenizer.clone(),
        captions,
        vae,
        sampler: config.sampler.clone(),
        guidance: config.guidance.clone(),
        class_names: class_names.clone(),
        run_dir: out.to_path_buf(),
    };
    let mut architecture = format!(
        "{:?} {:?} latent={c}x{s}x{s} classes={}",
        config.backbone,
        spec,
        class_names.len()
    );
    if let Some(t) = &tokenizer {
        architecture += &format!(" text={:?} vocab={}", config.text, t.vocab_size());
    }
    match train::train_sharded(&mut task, model, &config.train, architecture, out, resume)? {
        Outcome::Finished(_) => {}
        Outcome::Interrupted(_) => return Ok(None),
    }
    let weights = out.join("model.safetensors");
    save_safetensors_renamed(
        &task.ema,
        &weights,
        &[("stage", "ldm"), ("weights", "ema")],
        SAVED_NAMES,
    )?;
    let info = LdmInfo {
        vae_dir: std::path::absolute(vae_dir).unwrap_or_else(|_| vae_dir.to_path_buf()),
        vae_sha256: task.vae.info.weights_sha256.clone(),
        latent_shape: [c, s, s],
        class_names,
        num_params,
        steps: config.train.steps,
        weights_sha256: sha256_file(&weights)?,
        tokenizer_sha256: tokenizer
            .map(|_| sha256_file(&out.join("tokenizer.json")))
            .transpose()?,
        init_from: InitFrom::recall(out)?,
    };
    write_json(&out.join("ldm.json"), &info).context("writing ldm.json")?;
    Ok(Some(LdmSummary {
        out: out.to_path_buf(),
        steps: config.train.steps,
        num_params,
    }))
}

/// Held-out figures of a trained LDM.
#[derive(Debug, Clone, Serialize)]
pub struct LdmEval {
    pub latents: usize,
    /// The training objective on held-out latents (t and noise drawn from the seed).
    pub loss: f64,
    /// Estimated negative ELBO, L_T + sum_t L_{t-1} + L_0, in nats per latent dimension.
    pub vlb_nats_per_dim: f64,
    /// Its parts: the prior term L_T and the diffusion terms, per latent dimension.
    pub prior_nats_per_dim: f64,
    pub diffusion_nats_per_dim: f64,
    /// Timesteps drawn per latent for the Monte-Carlo estimate of sum_t L_{t-1}.
    pub timesteps_per_latent: usize,
}

/// `pipeline eval-ldm`: held-out loss and the variational bound, estimated as
/// L_T + T * mean over t ~ U{0..T-1} of L_{t-1} (Ho et al. 2020 eq. 5; unbiased).
pub fn eval_ldm(
    run: &LdmRun,
    limit: usize,
    repeats: usize,
    seed: u64,
    device: &Device,
) -> Result<LdmEval> {
    use ldm_diffusion::loss::{prior_kl, vlb_term};
    use ldm_diffusion::sampler::DdpmVariance;
    let Splits { held_out, .. } = data::load(&run.vae.config.data)?;
    if held_out.labels.is_empty() {
        bail!("the data set has no held-out images (data.held_out_fraction is 0)");
    }
    let latents = latents::load_or_encode(
        &run.dir.join("latents"),
        "held-out",
        &run.vae,
        &held_out,
        run.config.diffusion.latents,
        run.config.train.seed,
        device,
    )?;
    let n = if limit == 0 {
        held_out.labels.len()
    } else {
        limit.min(held_out.labels.len())
    };
    let [c, h, w] = latents.meta.shape;
    let dims = c * h * w;
    let big_t = run.schedule.num_timesteps();
    let p = run.config.diffusion.parameterization;
    // the training step's coefficients, the loss unweighted (every weight 1)
    let table = TrainingTable::new(&run.schedule, p, &LossWeighting::default());
    let (mut loss, mut prior, mut diffusion) = (0.0, 0.0, 0.0);
    let indices: Vec<usize> = (0..n).collect();
    for (k, chunk) in indices.chunks(250).enumerate() {
        let z0 = latents.batch(chunk, device);
        prior +=
            ldm_common::tensor::scalar(prior_kl(&run.schedule, z0.clone()).sum()) / dims as f64;
        for r in 0..repeats {
            let counter = (k * repeats + r) as u64;
            let mut rng = stream(seed, "eval-t", counter);
            let t: Vec<usize> = chunk.iter().map(|_| rng.random_range(0..big_t)).collect();
            let eps = randn(&mut stream(seed, "eval-eps", counter), z0.dims(), device);
            let c = table.gather(&t, device);
            let z_t = c.q_sample(z0.clone(), eps.clone());
            let target = c.target(z0.clone(), eps);
            let cond = run.null_condition(t.len(), device)?;
            let out = run.model.forward(z_t.clone(), c.t, &cond);
            loss += ldm_common::tensor::scalar(diffusion_loss(out.clone(), target, c.weights))
                * t.len() as f64;
            let eps_pred = p.eps(&run.schedule, z_t.clone(), out, &t);
            let terms = vlb_term(
                &run.schedule,
                z0.clone(),
                z_t,
                &t,
                eps_pred,
                DdpmVariance::Posterior,
            );
            diffusion += ldm_common::tensor::scalar(terms.sum()) * big_t as f64 / dims as f64;
        }
    }
    let (prior, diffusion) = (prior / n as f64, diffusion / (n * repeats) as f64);
    Ok(LdmEval {
        latents: n,
        loss: loss / (n * repeats) as f64,
        vlb_nats_per_dim: prior + diffusion,
        prior_nats_per_dim: prior,
        diffusion_nats_per_dim: diffusion,
        timesteps_per_latent: repeats,
    })
}
