//! Classifier guidance's classifier: `pipeline train-classifier` trains p(y | z_t, t) on noisy
//! latents z_t = q_sample(z_0, t, eps) of a trained LDM's latent cache (the same VAE, the same
//! noise schedule), and [`ClassifierRun`] loads it for `generate` / `eval`, refusing a model
//! whose VAE, schedule, latent shape or classes differ from those it was trained for.
//!
//! A classifier run folder holds `config.toml`, `model.safetensors`, `classifier.json` (the
//! model it was trained for, by path and checksums; held-out accuracy at several t),
//! `metrics.csv` and `checkpoint/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLoss;
use burn::tensor::{Device, Tensor};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{ensure_writable_dir, sha256_file, write_json};
use ldm_common::data::{self, BatchOrder, Splits};
use ldm_common::rng::{randn, stream};
use ldm_common::upload;
use ldm_common::weights::{load_safetensors, save_safetensors};
use ldm_diffusion::noisy_classifier::{NoisyClassifier, NoisyClassifierConfig};
use ldm_diffusion::process::q_sample;
use ldm_diffusion::schedule::{Schedule, ScheduleConfig};

use crate::latents::{self, LatentSet};
use crate::ldm_stage::LdmRun;
use crate::train::{self, Outcome, TrainConfig, TrainTask};

/// `--classifier-scale` when `--classifier` is given without it.
pub const DEFAULT_SCALE: f64 = 1.0;

/// Classifier guidance as asked for: a `train-classifier` folder and the scale s.
#[derive(Debug, Clone)]
pub struct ClassifierArgs {
    pub dir: PathBuf,
    pub scale: f64,
}

/// `--classifier DIR [--classifier-scale S]`, checked together: the scale needs a classifier
/// and is a finite number >= 0 (0 samples as without it).
pub fn from_flags(dir: Option<PathBuf>, scale: Option<f64>) -> Result<Option<ClassifierArgs>> {
    let Some(dir) = dir else {
        if let Some(s) = scale {
            bail!(
                "--classifier-scale {s} needs --classifier DIR (a folder written by `pipeline train-classifier`)"
            );
        }
        return Ok(None);
    };
    let scale = scale.unwrap_or(DEFAULT_SCALE);
    if !(scale.is_finite() && scale >= 0.0) {
        bail!("--classifier-scale {scale}: expected a number >= 0");
    }
    Ok(Some(ClassifierArgs { dir, scale }))
}

/// The `[report]` section: where held-out accuracy is measured at the end of training.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Timesteps of the held-out accuracy table; empty means 0, T/4, T/2 and 3T/4.
    #[serde(default)]
    pub timesteps: Vec<usize>,
}

impl ReportConfig {
    /// The timesteps to report on a `num_timesteps`-step schedule.
    pub fn timesteps(&self, num_timesteps: usize) -> Result<Vec<usize>> {
        if self.timesteps.is_empty() {
            return Ok((0..4).map(|k| k * num_timesteps / 4).collect());
        }
        if let Some(t) = self.timesteps.iter().find(|&&t| t >= num_timesteps) {
            bail!(
                "report.timesteps contains {t}: expected timesteps below the model's {num_timesteps}"
            );
        }
        Ok(self.timesteps.clone())
    }
}

/// A `train-classifier` config: `[classifier]`, `[report]`, `[train]`. The data are the
/// latents of the LDM given with `--model`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierRunConfig {
    #[serde(default)]
    pub classifier: NoisyClassifierConfig,
    #[serde(default)]
    pub report: ReportConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// Held-out accuracy of the classifier on z_t at one timestep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccuracyAt {
    pub t: usize,
    pub accuracy: f64,
}

/// What `classifier.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// The LDM run it was trained for, as given to `train-classifier`, and its checksum.
    pub ldm_dir: PathBuf,
    pub ldm_sha256: String,
    /// What its inputs depend on: a model with another VAE or schedule is refused.
    pub vae_sha256: String,
    pub schedule: ScheduleConfig,
    pub latent_shape: [usize; 3],
    pub class_names: Vec<String>,
    pub num_params: usize,
    pub steps: u64,
    pub held_out_latents: usize,
    pub held_out_accuracy: Vec<AccuracyAt>,
    /// SHA-256 of this run's `model.safetensors`.
    pub weights_sha256: String,
}

/// A trained noisy-latent classifier.
pub struct ClassifierRun {
    pub dir: PathBuf,
    pub config: ClassifierRunConfig,
    pub info: ClassifierInfo,
    pub model: NoisyClassifier,
}

impl ClassifierRun {
    /// Loads a folder written by `train-classifier`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let how = format!(
            "pipeline train-classifier --model LDM_DIR --out {}",
            dir.display()
        );
        let (config, mut info): (ClassifierRunConfig, ClassifierInfo) =
            crate::run_dir::read(dir, "trained classifier", "classifier.json", &how)?;
        info.weights_sha256 =
            crate::run_dir::weights_sha256(dir, "classifier.json", &info.weights_sha256)?;
        let [c, s, _] = info.latent_shape;
        let model = config
            .classifier
            .init(c, s, info.class_names.len(), device)?;
        let model = load_safetensors(model, &dir.join("model.safetensors"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            info,
            model,
        })
    }

    /// Refuses a model whose noisy latents this classifier never saw: another VAE, another
    /// noise schedule, another latent shape or other classes.
    pub fn check_model(&self, run: &LdmRun) -> Result<()> {
        let (me, it) = (self.dir.display(), run.dir.display());
        let retrain = format!("train one for it with `pipeline train-classifier --model {it}`");
        let short = |s: &str| s[..12.min(s.len())].to_string();
        if self.info.vae_sha256 != run.info.vae_sha256 {
            bail!(
                "--classifier {me} was trained on the latents of another VAE (sha256 {}…) than the model in {it} (VAE sha256 {}…); {retrain}",
                short(&self.info.vae_sha256),
                short(&run.info.vae_sha256)
            );
        }
        if self.info.schedule != run.config.schedule {
            bail!(
                "--classifier {me} was trained for another noise schedule ({}) than the model in {it} ({}); {retrain}",
                ldm_common::config::to_toml(&self.info.schedule)
                    .trim()
                    .replace('\n', ", "),
                ldm_common::config::to_toml(&run.config.schedule)
                    .trim()
                    .replace('\n', ", ")
            );
        }
        if self.info.latent_shape != run.info.latent_shape
            || self.info.class_names != run.info.class_names
        {
            bail!(
                "--classifier {me} was trained for other latents or classes ({:?}, {}) than the model in {it} ({:?}, {}); {retrain}",
                self.info.latent_shape,
                self.info.class_names.join(", "),
                run.info.latent_shape,
                run.info.class_names.join(", ")
            );
        }
        Ok(())
    }
}

/// `[f32; b]` timesteps as the network's float input.
fn t_input(t: &[usize], device: &Device) -> Tensor<1> {
    let values: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    upload::float(values, [t.len()], device)
}

struct ClassifierTask {
    latents: LatentSet,
    order: BatchOrder,
    schedule: Schedule,
    seed: u64,
    device: Device,
}

impl TrainTask for ClassifierTask {
    type Model = NoisyClassifier;

    fn metric_names(&self) -> Vec<&'static str> {
        vec!["loss", "accuracy"]
    }

    /// Cross-entropy of p(y | z_t, t) with t ~ U{0..T-1} and z_t = q_sample(z_0, t, eps).
    fn forward(&mut self, model: &NoisyClassifier, step: u64) -> (Tensor<1>, Vec<Tensor<1>>) {
        let indices = self.order.batch(step);
        let b = indices.len();
        let z0 = self.latents.batch(&indices, &self.device);
        let mut rng = stream(self.seed, "classifier-t", step);
        let t: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..self.schedule.num_timesteps()))
            .collect();
        let eps = randn(
            &mut stream(self.seed, "classifier-eps", step),
            z0.dims(),
            &self.device,
        );
        let z_t = q_sample(&self.schedule, z0, &t, eps);
        let labels: Vec<i64> = indices
            .iter()
            .map(|&i| self.latents.labels[i] as i64)
            .collect();
        let y = upload::int(labels, [b], &self.device);
        let logits = model.forward(z_t, t_input(&t, &self.device));
        let loss = CrossEntropyLoss::new(None, &self.device).forward(logits.clone(), y.clone());
        let correct = logits.argmax(1).reshape([b]).equal(y).float().mean();
        (loss.clone(), vec![loss, correct])
    }

    fn write_samples(&mut self, _model: &NoisyClassifier, _step: u64) -> Result<()> {
        Ok(())
    }
}

/// Accuracy on every latent of `set` noised to timestep `t` (noise drawn from the seed).
fn accuracy_at(
    model: &NoisyClassifier,
    set: &LatentSet,
    schedule: &Schedule,
    t: usize,
    seed: u64,
    device: &Device,
) -> f64 {
    let indices: Vec<usize> = (0..set.labels.len()).collect();
    let mut correct = 0usize;
    for (k, chunk) in indices.chunks(500).enumerate() {
        let z0 = set.batch(chunk, device);
        let counter = ((t as u64) << 32) | k as u64;
        let eps = randn(
            &mut stream(seed, "classifier-eval-eps", counter),
            z0.dims(),
            device,
        );
        let ts = vec![t; chunk.len()];
        let z_t = q_sample(schedule, z0, &ts, eps);
        let predicted = model.forward(z_t, t_input(&ts, device)).argmax(1);
        correct += predicted
            .into_data()
            .iter::<i64>()
            .zip(chunk)
            .filter(|(p, i)| *p as usize == set.labels[**i])
            .count();
    }
    correct as f64 / set.labels.len().max(1) as f64
}

/// Flags of `train-classifier` that override config keys.
pub type Overrides = crate::train::TrainOverrides;

/// `pipeline train-classifier`: trains on the LDM's cached training latents, reports held-out
/// accuracy at the configured timesteps, and writes the run folder; `None` when Ctrl-C stopped
/// it after saving a checkpoint.
pub fn train_classifier(
    config_path: &Path,
    run: &LdmRun,
    overrides: &Overrides,
    out: &Path,
    device: &Device,
    resume: bool,
) -> Result<Option<ClassifierInfo>> {
    let mut config: ClassifierRunConfig = crate::overrides::read(config_path, &overrides.sets)?;
    overrides.apply(&mut config.train);
    config.train.validate().map_err(anyhow::Error::msg)?;
    config
        .train
        .require_f32("train-classifier")
        .map_err(anyhow::Error::msg)?;
    let report_t = config.report.timesteps(run.schedule.num_timesteps())?;
    let [c, s, _] = run.info.latent_shape;
    let classes = run.info.class_names.len();
    config.classifier.validate(c, s, classes)?;
    let Splits { train, held_out } = data::load(&run.vae.config.data)?;
    if held_out.labels.is_empty() {
        bail!(
            "the data set of {} has no held-out images to measure the classifier on (data.held_out_fraction is 0)",
            run.dir.display()
        );
    }
    ensure_writable_dir(out)?;
    crate::resume_check::check(out, &config, resume)?;
    crate::run_dir::write_config(out, &config)?;
    let cache = |split: &str, images| {
        latents::load_or_encode(
            &run.dir.join("latents"),
            split,
            &run.vae,
            images,
            run.config.diffusion.latents,
            run.config.train.seed,
            device,
        )
    };
    let train_latents = cache("train", &train)?;
    let ad = device.clone().autodiff();
    ad.seed(config.train.seed);
    let model = config.classifier.init(c, s, classes, &ad)?;
    let num_params = model.num_params();
    let mut task = ClassifierTask {
        order: BatchOrder::new(
            config.train.seed,
            train_latents.labels.len(),
            config.train.batch_size,
        ),
        latents: train_latents,
        schedule: run.schedule.clone(),
        seed: config.train.seed,
        device: ad,
    };
    let architecture = format!(
        "{:?} latent={c}x{s}x{s} classes={classes}",
        config.classifier
    );
    let model = match train::train(&mut task, model, &config.train, architecture, out, resume)? {
        Outcome::Finished(m) => m.valid(),
        Outcome::Interrupted(_) => return Ok(None),
    };
    let held_out_latents = cache("held-out", &held_out)?;
    let held_out_accuracy = report_t
        .iter()
        .map(|&t| AccuracyAt {
            t,
            accuracy: accuracy_at(
                &model,
                &held_out_latents,
                &run.schedule,
                t,
                config.train.seed,
                device,
            ),
        })
        .collect();
    let weights = out.join("model.safetensors");
    save_safetensors(&model, &weights, &[("stage", "classifier")])?;
    let info = ClassifierInfo {
        ldm_dir: std::path::absolute(&run.dir).unwrap_or_else(|_| run.dir.clone()),
        ldm_sha256: run.info.weights_sha256.clone(),
        vae_sha256: run.info.vae_sha256.clone(),
        schedule: run.config.schedule.clone(),
        latent_shape: run.info.latent_shape,
        class_names: run.info.class_names.clone(),
        num_params,
        steps: config.train.steps,
        held_out_latents: held_out_latents.labels.len(),
        held_out_accuracy,
        weights_sha256: sha256_file(&weights)?,
    };
    write_json(&out.join("classifier.json"), &info).context("writing classifier.json")?;
    Ok(Some(info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latents::{CacheMeta, LatentSource};
    use crate::train::config::LrDecay;
    use ldm_diffusion::schedule::ScheduleConfig;

    /// 64 latents of 2x4x4 whose class (of 4) is the sign pattern of the two channel means,
    /// plus N(0, 0.3^2) texture.
    fn latent_set() -> LatentSet {
        let noise = ldm_common::tensor::to_vec_f32(randn(
            &mut stream(5, "latents", 0),
            [64, 2, 4, 4],
            &Device::flex(),
        ));
        let labels: Vec<usize> = (0..64).map(|i| i % 4).collect();
        let values = noise
            .iter()
            .enumerate()
            .map(|(k, e)| {
                let (y, c) = (labels[k / 32], (k / 16) % 2);
                let mean = if (y >> c) & 1 == 1 { 1.0 } else { -1.0 };
                mean + 0.3 * e
            })
            .collect();
        LatentSet {
            meta: CacheMeta {
                vae_sha256: "test".into(),
                source: LatentSource::Mean,
                seed: 0,
                count: 64,
                shape: [2, 4, 4],
                latent_scale: 1.0,
            },
            values,
            labels,
        }
    }

    /// The task `train-classifier` runs learns p(y | z_t, t): near-perfect on clean latents,
    /// and near chance where the noise drowns the signal (alphabar_t = 0).
    #[test]
    fn the_training_task_learns_noisy_classes() {
        let dir = tempfile::tempdir().unwrap();
        // zero terminal SNR: z_99 is pure noise
        let schedule = Schedule::new(&ScheduleConfig {
            num_timesteps: 100,
            rescale_zero_terminal_snr: true,
            ..ScheduleConfig::default()
        })
        .unwrap();
        let ad = Device::flex().autodiff();
        ad.seed(5);
        let config = NoisyClassifierConfig {
            channels: vec![8, 16],
            num_res_blocks: 1,
            groups: 4,
            time_dim: 16,
            dropout: 0.0,
        };
        let model = config.init(2, 4, 4, &ad).unwrap();
        let train_config = TrainConfig {
            steps: 150,
            batch_size: 32,
            lr: 5e-3,
            warmup_steps: 0,
            lr_decay: LrDecay::Constant,
            log_every: 10,
            sample_every: 1000,
            checkpoint_every: 1000,
            ..TrainConfig::default()
        };
        let mut task = ClassifierTask {
            latents: latent_set(),
            order: BatchOrder::new(5, 64, 32),
            schedule: schedule.clone(),
            seed: 5,
            device: ad,
        };
        let Outcome::Finished(model) = train::train(
            &mut task,
            model,
            &train_config,
            "test".into(),
            dir.path(),
            false,
        )
        .unwrap() else {
            panic!("not interrupted");
        };
        let model = model.valid();
        let plain = Device::flex();
        let clean = accuracy_at(&model, &latent_set(), &schedule, 0, 1, &plain);
        let noisy = accuracy_at(&model, &latent_set(), &schedule, 99, 1, &plain);
        assert!(clean >= 0.95, "clean accuracy {clean}");
        assert!(noisy < 0.6, "t=99 (pure noise) accuracy {noisy}");
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(
            csv.starts_with("step,loss,accuracy,lr,images_per_s\n"),
            "{csv}"
        );
    }

    #[test]
    fn scale_needs_a_classifier_and_a_sane_value() {
        let dir = || Some(PathBuf::from("c"));
        let e = from_flags(None, Some(2.0)).unwrap_err().to_string();
        assert!(
            e.starts_with("--classifier-scale 2 needs --classifier"),
            "{e}"
        );
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let e = from_flags(dir(), Some(bad)).unwrap_err().to_string();
            assert!(e.ends_with("expected a number >= 0"), "{e}");
        }
        assert_eq!(
            from_flags(dir(), None).unwrap().unwrap().scale,
            DEFAULT_SCALE
        );
        assert!(from_flags(None, None).unwrap().is_none());
    }

    #[test]
    fn report_timesteps_default_to_quarters_and_must_exist() {
        let r = ReportConfig::default();
        assert_eq!(r.timesteps(1000).unwrap(), [0, 250, 500, 750]);
        assert_eq!(r.timesteps(100).unwrap(), [0, 25, 50, 75]);
        let r = ReportConfig {
            timesteps: vec![0, 999, 1000],
        };
        let e = r.timesteps(1000).unwrap_err().to_string();
        assert!(e.starts_with("report.timesteps contains 1000"), "{e}");
    }

    #[test]
    fn config_has_defaults_and_refuses_unknown_keys() {
        let c: ClassifierRunConfig = crate::config::parse_str("").unwrap();
        assert_eq!(c.classifier, NoisyClassifierConfig::default());
        let e = crate::config::parse_str::<ClassifierRunConfig>("[classifier]\nwidth = 3\n")
            .unwrap_err();
        assert!(e.contains("unknown field `width`"), "{e}");
    }
}
