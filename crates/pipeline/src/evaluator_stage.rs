//! The project's own yardstick: `pipeline train-evaluator` trains a small CNN classifier on
//! the real training split of a data set, and `pipeline eval` scores a diffusion model's
//! class-conditional samples with it (per-class accuracy, FID in its penultimate features
//! against the held-out split, with the real-vs-real floor, and precision/recall).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLoss;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{ensure_writable_dir, read_json, write_json};
use ldm_common::data::{self, BatchOrder, DataConfig, ImageSet, Splits};
use ldm_common::weights::{load_safetensors, save_safetensors};
use ldm_diffusion::sampler::SamplerOptions;
use ldm_eval::evaluator::{Evaluator, EvaluatorConfig};
use ldm_eval::features::Features;

use crate::ldm_stage::LdmRun;
use crate::train::{self, Outcome, TrainConfig, TrainTask};

/// A `train-evaluator` config: `[data]`, `[evaluator]`, `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorRunConfig {
    pub data: DataConfig,
    #[serde(default)]
    pub evaluator: EvaluatorConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// What `evaluator.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluatorInfo {
    pub class_names: Vec<String>,
    pub image_shape: [usize; 3],
    /// Accuracy on the held-out split.
    pub held_out_accuracy: f64,
    pub held_out_images: usize,
}

/// A trained evaluator.
pub struct EvaluatorRun {
    pub dir: PathBuf,
    pub config: EvaluatorRunConfig,
    pub info: EvaluatorInfo,
    pub model: Evaluator,
}

impl EvaluatorRun {
    /// Loads `dir`, saying which command makes it when it is missing.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let how = format!(
            "pipeline train-evaluator --config evaluator-animals --out {}",
            dir.display()
        );
        crate::run_dir::require(
            dir,
            "trained evaluator",
            &["config.toml", "evaluator.json", "model.safetensors"],
            &how,
        )?;
        let config: EvaluatorRunConfig = crate::config::read(&dir.join("config.toml"))?;
        let info: EvaluatorInfo = read_json(&dir.join("evaluator.json"))?;
        let model = config
            .evaluator
            .init(info.image_shape[0], info.class_names.len(), device)?;
        let model = load_safetensors(model, &dir.join("model.safetensors"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            info,
            model,
        })
    }
}

struct EvaluatorTask {
    train: ImageSet,
    order: BatchOrder,
    device: Device,
}

impl TrainTask for EvaluatorTask {
    type Model = Evaluator;

    fn metric_names(&self) -> Vec<&'static str> {
        vec!["loss", "accuracy"]
    }

    fn forward(&mut self, model: &Evaluator, step: u64) -> (Tensor<1>, Vec<Tensor<1>>) {
        let indices = self.order.batch(step);
        let x = self.train.batch(&indices, &self.device);
        let y = self.train.batch_labels(&indices, &self.device);
        let logits = model.forward(x);
        let loss = CrossEntropyLoss::new(None, &self.device).forward(logits.clone(), y.clone());
        let [b, _] = logits.dims();
        let correct = logits.argmax(1).reshape([b]).equal(y).float().mean();
        (loss.clone(), vec![loss, correct])
    }

    fn write_samples(&mut self, _model: &Evaluator, _step: u64) -> Result<()> {
        Ok(())
    }
}

/// Labels predicted for `images` (in [-1, 1]), in batches.
fn predict(model: &Evaluator, images: Tensor<4>) -> Vec<usize> {
    let [n, ..] = images.dims();
    let logits = model.forward(images);
    let predicted = logits.argmax(1).reshape([n]);
    predicted
        .into_data()
        .iter::<i64>()
        .map(|v| v as usize)
        .collect()
}

/// Held-out accuracy of an evaluator.
fn held_out_accuracy(model: &Evaluator, held_out: &ImageSet, device: &Device) -> f64 {
    let indices: Vec<usize> = (0..held_out.labels.len()).collect();
    let mut correct = 0usize;
    for chunk in indices.chunks(500) {
        let predicted = predict(model, held_out.batch(chunk, device));
        correct += chunk
            .iter()
            .zip(predicted)
            .filter(|(i, p)| held_out.labels[**i] == *p)
            .count();
    }
    correct as f64 / held_out.labels.len().max(1) as f64
}

/// `pipeline train-evaluator`; returns the held-out accuracy, or `None` if interrupted.
pub fn train_evaluator(
    config_path: &Path,
    data_dir: Option<&Path>,
    out: &Path,
    device: &Device,
    resume: bool,
) -> Result<Option<EvaluatorInfo>> {
    let mut config: EvaluatorRunConfig = crate::config::read(config_path)?;
    if let Some(dir) = data_dir {
        config.data.dir = Some(dir.to_path_buf());
    }
    config.train.validate().map_err(anyhow::Error::msg)?;
    let Splits { train, held_out } = data::load(&config.data)?;
    let num_classes = train.class_names.len();
    config
        .evaluator
        .validate(config.data.channels, num_classes)?;
    ensure_writable_dir(out)?;
    crate::run_dir::write_config(out, &config)?;
    let ad = device.clone().autodiff();
    ad.seed(config.train.seed);
    let model = config
        .evaluator
        .init(config.data.channels, num_classes, &ad)?;
    let mut task = EvaluatorTask {
        order: BatchOrder::new(
            config.train.seed,
            train.labels.len(),
            config.train.batch_size,
        ),
        train,
        device: ad,
    };
    let architecture = format!("{:?} classes={num_classes}", config.evaluator);
    let model = match train::train(&mut task, model, &config.train, architecture, out, resume)? {
        Outcome::Finished(m) => m.valid(),
        Outcome::Interrupted(_) => return Ok(None),
    };
    let accuracy = held_out_accuracy(&model, &held_out, device);
    save_safetensors(
        &model,
        &out.join("model.safetensors"),
        &[("stage", "evaluator")],
    )?;
    let info = EvaluatorInfo {
        class_names: task.train.class_names.clone(),
        image_shape: [
            config.data.channels,
            config.data.resolution,
            config.data.resolution,
        ],
        held_out_accuracy: accuracy,
        held_out_images: held_out.labels.len(),
    };
    write_json(&out.join("evaluator.json"), &info).context("writing evaluator.json")?;
    Ok(Some(info))
}

/// What `pipeline eval` measures.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEval {
    pub per_class: usize,
    pub cfg: f64,
    pub sampler: SamplerOptions,
    /// Fraction of generated images of each class classified as that class.
    pub accuracy_per_class: Vec<(String, f64)>,
    pub accuracy: f64,
    /// FID in the evaluator's penultimate features, generated vs held-out real.
    pub fid: f64,
    /// FID between two disjoint halves of the held-out split of the same size: the floor.
    pub fid_floor: f64,
    pub precision: f64,
    pub recall: f64,
    pub images_per_second: f64,
}

/// `pipeline eval`: samples `per_class` images of every class and scores them.
pub fn eval_model(
    run: &LdmRun,
    evaluator: &EvaluatorRun,
    per_class: usize,
    cfg: f64,
    sampler: &SamplerOptions,
    seed: u64,
    device: &Device,
) -> Result<ModelEval> {
    if !run.class_conditional() {
        bail!(
            "{}: `pipeline eval` scores class-conditional samples; this model is unconditional",
            run.dir.display()
        );
    }
    if evaluator.info.class_names != run.info.class_names
        || evaluator.info.image_shape != run.vae.info.image_shape
    {
        bail!(
            "the evaluator in {} was trained on another recipe (classes {}) than the model in {} (classes {})",
            evaluator.dir.display(),
            evaluator.info.class_names.join(", "),
            run.dir.display(),
            run.info.class_names.join(", ")
        );
    }
    if per_class == 0 {
        bail!("-n 0: expected at least one image per class");
    }
    let classes = run.info.class_names.len();
    let labels: Vec<usize> = (0..classes)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    let mut correct = vec![0usize; classes];
    let mut generated = Features::new(vec![], evaluator.config.evaluator.feature_dim)?;
    let start = Instant::now();
    let bar = crate::progress::bar(labels.len() as u64, "image");
    for (k, chunk) in labels.chunks(100).enumerate() {
        let seed = seed.wrapping_add(k as u64);
        let images =
            run.sample_images(Some(chunk), chunk.len(), cfg, sampler, seed, device, None)?;
        generated.append(&Features::from_tensor(
            evaluator.model.features(images.clone()),
        ))?;
        for (label, predicted) in chunk.iter().zip(predict(&evaluator.model, images)) {
            correct[*label] += usize::from(*label == predicted);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let images_per_second = labels.len() as f64 / start.elapsed().as_secs_f64();

    let Splits { held_out, .. } = data::load(&run.vae.config.data)?;
    let n = labels.len().min(held_out.labels.len());
    let real = features_of(
        &evaluator.model,
        &held_out,
        &(0..n).collect::<Vec<_>>(),
        device,
    )?;
    let fid = ldm_eval::frechet::fid(&real, &generated)?;
    // The floor: two disjoint halves of the held-out split, each of the generated set's size
    // where the split allows it.
    let half = (held_out.labels.len() / 2).min(labels.len());
    let a = features_of(
        &evaluator.model,
        &held_out,
        &(0..half).collect::<Vec<_>>(),
        device,
    )?;
    let b = features_of(
        &evaluator.model,
        &held_out,
        &(held_out.labels.len() - half..held_out.labels.len()).collect::<Vec<_>>(),
        device,
    )?;
    let fid_floor = ldm_eval::frechet::fid(&a, &b)?;
    let pr = ldm_eval::prdc::precision_recall(&real, &generated, ldm_eval::prdc::DEFAULT_K)?;
    let accuracy_per_class: Vec<(String, f64)> = run
        .info
        .class_names
        .iter()
        .zip(&correct)
        .map(|(name, &c)| (name.clone(), c as f64 / per_class as f64))
        .collect();
    Ok(ModelEval {
        per_class,
        cfg,
        sampler: sampler.clone(),
        accuracy: correct.iter().sum::<usize>() as f64 / labels.len() as f64,
        accuracy_per_class,
        fid,
        fid_floor,
        precision: pr.precision,
        recall: pr.recall,
        images_per_second,
    })
}

/// Penultimate-layer features of the images at `indices`.
fn features_of(
    model: &Evaluator,
    set: &ImageSet,
    indices: &[usize],
    device: &Device,
) -> Result<Features> {
    let mut out: Option<Features> = None;
    for chunk in indices.chunks(500) {
        let f = Features::from_tensor(model.features(set.batch(chunk, device)));
        match &mut out {
            Some(all) => all.append(&f)?,
            None => out = Some(f),
        }
    }
    out.ok_or_else(|| anyhow::anyhow!("the held-out split is empty"))
}
