//! The project's own yardstick: `pipeline train-evaluator` trains a small CNN classifier on
//! the real training split of a data set, and `pipeline eval` scores a diffusion model's
//! class-conditional samples with it (per-class accuracy, FID in its penultimate features
//! against the held-out split, with the real-vs-real floor, and precision/recall).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use ldm_common::checkpoint::{ensure_writable_dir, write_json};
use ldm_common::data::{self, BatchOrder, DataConfig, ImageSet, Splits};
use ldm_common::weights::{load_safetensors, save_safetensors};
use ldm_diffusion::sampler::SamplerOptions;
use ldm_eval::class_fid::ClassFidReport;
use ldm_eval::evaluator::{Evaluator, EvaluatorConfig};
use ldm_eval::features::Features;

use crate::classifier_stage::ClassifierRun;
use crate::ldm_stage::LdmRun;
use crate::sampling::{ClassifierGuide, SampleExtras};
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
    /// How `eval.json` names it: the folder, or the reference evaluator's name.
    pub label: String,
    /// sha256 of `model.safetensors`.
    pub weights_sha256: String,
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
        let (config, info): (EvaluatorRunConfig, EvaluatorInfo) =
            crate::run_dir::read(dir, "trained evaluator", "evaluator.json", &how)?;
        let model = config
            .evaluator
            .init(info.image_shape[0], info.class_names.len(), device)?;
        let weights = dir.join("model.safetensors");
        let model = load_safetensors(model, &weights)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            label: dir.display().to_string(),
            weights_sha256: ldm_common::checkpoint::sha256_file(&weights)?,
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
        let (loss, accuracy) = model.loss_and_accuracy(x, y);
        (loss.clone(), vec![loss, accuracy])
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
    let (correct, total) = held_out_counts(model, held_out, 0, device);
    correct.iter().sum::<usize>() as f64 / total.iter().sum::<usize>().max(1) as f64
}

/// Correct predictions and images of each class (at least `classes` entries) over the held-out
/// split.
fn held_out_counts(
    model: &Evaluator,
    held_out: &ImageSet,
    classes: usize,
    device: &Device,
) -> (Vec<usize>, Vec<usize>) {
    let classes = classes.max(held_out.labels.iter().max().map_or(0, |m| m + 1));
    let (mut correct, mut total) = (vec![0usize; classes], vec![0usize; classes]);
    let indices: Vec<usize> = (0..held_out.labels.len()).collect();
    for chunk in indices.chunks(500) {
        let predicted = predict(model, held_out.batch(chunk, device));
        for (i, p) in chunk.iter().zip(predicted) {
            let label = held_out.labels[*i];
            total[label] += 1;
            correct[label] += usize::from(label == p);
        }
    }
    (correct, total)
}

/// `pipeline train-evaluator`; returns the held-out accuracy, or `None` if interrupted.
pub fn train_evaluator(
    config_path: &Path,
    sets: &[String],
    data_dir: Option<&Path>,
    out: &Path,
    device: &Device,
    resume: bool,
) -> Result<Option<EvaluatorInfo>> {
    let mut config: EvaluatorRunConfig = crate::overrides::read(config_path, sets)?;
    if let Some(dir) = data_dir {
        config.data.dir = Some(dir.to_path_buf());
    }
    config.train.validate().map_err(anyhow::Error::msg)?;
    config
        .train
        .require_f32("train-evaluator")
        .map_err(anyhow::Error::msg)?;
    let Splits { train, held_out } = data::load(&config.data)?;
    let num_classes = train.class_names.len();
    config
        .evaluator
        .validate(config.data.channels, num_classes)?;
    ensure_writable_dir(out)?;
    crate::resume_check::check(out, &config, resume)?;
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
    /// The same for the held-out real images of each class: how well the evaluator tells
    /// that class at all, the reference for the generated figure.
    pub real_accuracy_per_class: Vec<(String, f64)>,
    pub accuracy: f64,
    /// FID in the evaluator's penultimate features, generated vs held-out real.
    pub fid: f64,
    /// FID between two disjoint halves of the held-out split of the same size: the floor.
    pub fid_floor: f64,
    /// KID ([`ldm_eval::kid`]: unbiased squared MMD, cubic kernel) on the same sets as `fid`,
    /// and on the floor's halves.
    pub kid: f64,
    pub kid_floor: f64,
    pub precision: f64,
    pub recall: f64,
    pub images_per_second: f64,
    /// Classifier guidance: the `train-classifier` folder and its scale (null without).
    pub classifier: Option<PathBuf>,
    pub classifier_scale: Option<f64>,
    /// FID of each class's generated images against that class's held-out images, with the
    /// per-class floor (null where the class has too few images for the dimension).
    pub fid_per_class: ClassFidReport,
    /// The evaluator whose features define FID: a folder, or a reference evaluator compiled
    /// into `pipeline`; FIDs of different evaluators are not comparable.
    pub evaluator: String,
    pub evaluator_sha256: String,
}

/// `pipeline eval`: samples `per_class` images of every class and scores them.
#[allow(clippy::too_many_arguments)]
pub fn eval_model(
    run: &LdmRun,
    evaluator: &EvaluatorRun,
    per_class: usize,
    cfg: f64,
    sampler: &SamplerOptions,
    seed: u64,
    classifier: Option<(&ClassifierRun, f64)>,
    device: &Device,
) -> Result<ModelEval> {
    // a text model is prompted with each class name; an unconditional one can be scored only
    // under classifier guidance
    if !run.conditional() && classifier.is_none() {
        bail!(
            "{}: `pipeline eval` scores class-conditional samples (or a text model's, prompted with each class name); this model is unconditional",
            run.dir.display()
        );
    }
    if evaluator.info.class_names != run.info.class_names
        || evaluator.info.image_shape != run.vae.info.image_shape
    {
        bail!(
            "the evaluator in {} was trained on another recipe (classes {}) than the model in {} (classes {})",
            evaluator.label,
            evaluator.info.class_names.join(", "),
            run.dir.display(),
            run.info.class_names.join(", ")
        );
    }
    if per_class == 0 {
        bail!("-n 0: expected at least one image per class");
    }
    // FID fits a d x d covariance: checked before any image is sampled.
    let (classes, d) = (
        run.info.class_names.len(),
        evaluator.config.evaluator.feature_dim,
    );
    if classes * per_class <= d {
        bail!(
            "FID needs more samples than feature dimensions: got n = {} for d = {d} ({classes} classes x -n {per_class}); use -n {} or more",
            classes * per_class,
            (d + 1).div_ceil(classes)
        );
    }
    if let Some((c, _)) = classifier {
        c.check_model(run)?;
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
        let extras = SampleExtras {
            init: None,
            classifier: classifier.map(|(c, scale)| ClassifierGuide {
                classifier: &c.model,
                labels: chunk,
                scale,
            }),
            trajectory: None,
        };
        let images = run.sample_images_with(
            Some(chunk),
            chunk.len(),
            cfg,
            sampler,
            seed,
            extras,
            device,
            None,
        )?;
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
    let all_real = features_of(
        &evaluator.model,
        &held_out,
        &(0..held_out.labels.len()).collect::<Vec<_>>(),
        device,
    )?;
    // KID's features are scaled by the RMS of all the held-out ones (as per class)
    let scale = ldm_eval::feature_scale(&all_real);
    let (kid, kid_floor) = (
        ldm_eval::kid(&real, &generated, scale)?,
        ldm_eval::kid(&a, &b, scale)?,
    );
    let fid_per_class = ldm_eval::class_fid::class_fids(
        &run.info.class_names,
        &all_real,
        &held_out.labels,
        &generated,
        &labels,
    )?;
    let accuracy_per_class: Vec<(String, f64)> = run
        .info
        .class_names
        .iter()
        .zip(&correct)
        .map(|(name, &c)| (name.clone(), c as f64 / per_class as f64))
        .collect();
    let (real_correct, real_total) = held_out_counts(&evaluator.model, &held_out, classes, device);
    let real_accuracy_per_class = run
        .info
        .class_names
        .iter()
        .zip(real_correct.iter().zip(&real_total))
        .map(|(name, (&c, &t))| (name.clone(), c as f64 / t.max(1) as f64))
        .collect();
    Ok(ModelEval {
        per_class,
        cfg,
        sampler: sampler.clone(),
        accuracy: correct.iter().sum::<usize>() as f64 / labels.len() as f64,
        accuracy_per_class,
        real_accuracy_per_class,
        fid,
        fid_floor,
        kid,
        kid_floor,
        precision: pr.precision,
        recall: pr.recall,
        images_per_second,
        classifier: classifier.map(|(c, _)| c.dir.clone()),
        classifier_scale: classifier.map(|(_, s)| s),
        fid_per_class,
        evaluator: evaluator.label.clone(),
        evaluator_sha256: evaluator.weights_sha256.clone(),
    })
}

/// The per-class table of `pipeline eval`: accuracy, FID (floor) in the evaluator's d
/// features and in the top-k principal directions; "-" where FID is undefined, with the
/// reasons below the table (one line per distinct reason).
pub fn class_table(e: &ModelEval) -> String {
    use std::fmt::Write;
    let r = &e.fid_per_class;
    let cell = |fid: Option<f64>, floor: Option<f64>| match (fid, floor) {
        (Some(f), Some(fl)) => format!("{f:.2} ({fl:.2})"),
        (Some(f), None) => format!("{f:.2} (-)"),
        (None, Some(fl)) => format!("- ({fl:.2})"),
        (None, None) => "-".into(),
    };
    let mut out = String::new();
    let full = format!("FID d={} (floor)", r.feature_dim);
    let pca = format!("FID k={} (floor)", r.pca_dim);
    let kid = format!("KIDx1000 d={} (floor)", r.feature_dim);
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:>9}  {full:>20}  {pca:>20}  {kid:>24}",
        "class", "accuracy", "(real)"
    );
    let mut reasons: Vec<(String, Vec<&str>)> = Vec::new();
    for (((name, acc), (_, real)), c) in e
        .accuracy_per_class
        .iter()
        .zip(&e.real_accuracy_per_class)
        .zip(&r.classes)
    {
        let thousandths = |v: Option<f64>| v.map(|v| 1000.0 * v);
        let _ = writeln!(
            out,
            "{name:<16} {:>8.1}% {:>8.1}%  {:>20}  {:>20}  {:>24}",
            100.0 * acc,
            100.0 * real,
            cell(c.fid, c.fid_floor),
            cell(c.fid_pca, c.fid_pca_floor),
            cell(thousandths(c.kid), thousandths(c.kid_floor))
        );
        if let Some(note) = &c.note {
            match reasons.iter_mut().find(|(n, _)| n == note) {
                Some((_, classes)) => classes.push(&c.class),
                None => reasons.push((note.clone(), vec![&c.class])),
            }
        }
    }
    let _ = writeln!(out, "{:<16} {:>8.1}%", "all", 100.0 * e.accuracy);
    let _ = writeln!(
        out,
        "(real): the evaluator's accuracy on the held-out real images of the class"
    );
    if let Some(v) = r.pca_explained_variance {
        let _ = writeln!(
            out,
            "k={}: FID in the top {} principal directions of the held-out features ({:.1}% of their variance), a lower bound of the d={} figure",
            r.pca_dim,
            r.pca_dim,
            100.0 * v,
            r.feature_dim
        );
    }
    for (note, classes) in reasons {
        let _ = writeln!(out, "- for {}: {note}", classes.join(", "));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::LrDecay;

    /// 16 noise images of 16x16 with labels of 4 classes that no pattern explains: only
    /// memorisation fits them.
    fn noise_set() -> ImageSet {
        let mut rng = ldm_common::rng::stream(41, "images", 0);
        let pixels: Vec<u8> = (0..16 * 16 * 16)
            .map(|_| rand::RngExt::random::<u8>(&mut rng))
            .collect();
        ImageSet {
            channels: 1,
            resolution: 16,
            pixels,
            labels: (0..16).map(|i| (i * 7 + 3) % 4).collect(),
            captions: vec![None; 16],
            class_names: (0..4).map(|c| format!("c{c}")).collect(),
        }
    }

    /// The path `train-evaluator` takes (EvaluatorTask in the shared training loop) fits a
    /// fixed set of 16 random images: the objective, its gradients and AdamW are wired.
    #[test]
    fn the_training_task_overfits_a_fixed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let set = noise_set();
        let ad = Device::flex().autodiff();
        ad.seed(41);
        let config = EvaluatorConfig {
            channels: vec![8, 16],
            pool_size: 2,
            feature_dim: 32,
        };
        let model = config.init(1, 4, &ad).unwrap();
        let train_config = TrainConfig {
            steps: 80,
            batch_size: 16,
            lr: 1e-2,
            warmup_steps: 0,
            lr_decay: LrDecay::Constant,
            log_every: 1,
            sample_every: 1000,
            checkpoint_every: 1000,
            ..TrainConfig::default()
        };
        let mut task = EvaluatorTask {
            order: BatchOrder::new(0, 16, 16),
            train: set.clone(),
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
        let accuracy = held_out_accuracy(&model.valid(), &set, &Device::flex());
        assert_eq!(accuracy, 1.0);
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let losses: Vec<f64> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(losses.len(), 80);
        assert!(
            losses[0] > 1.0 && losses[79] < 0.2 * losses[0],
            "{:?}",
            losses
        );
        assert!(
            csv.starts_with("step,loss,accuracy,lr,images_per_s\n"),
            "{csv}"
        );
    }
}
