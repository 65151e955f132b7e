//! The training loop shared by every stage, a plain loop in the nanoGPT spirit: batch ->
//! loss -> backward -> AdamW step, with metrics, sample grids, atomic checkpoints, exact
//! `--resume`, Ctrl-C saving state, and a stop at the first non-finite loss.
//!
//! A stage plugs in through [`TrainTask`]: its forward pass returns the loss to minimise and
//! the scalars to log. A stage that also implements [`ShardedTask`] trains through
//! [`train_sharded`], which splits each batch over `train.devices` ([`super::parallel`]).

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use ldm_common::adamw::AdamW;
use ldm_common::flex::is_flex;
use ldm_common::precision::Precision;

use super::config::TrainConfig;
use super::metrics::MetricsLog;
use super::parallel::{self, DataParallel, ShardedTask, StepOutput};
use super::state::{self, TrainState};
use crate::{interrupt, progress};

/// One stage's part of training.
pub trait TrainTask {
    type Model: Module + 'static;

    /// Names of the scalars [`TrainTask::forward`] returns, in order (CSV columns).
    fn metric_names(&self) -> Vec<&'static str>;

    /// The forward pass of batch `step`: the loss to minimise and the scalars to log, each a
    /// one-element tensor (read from the device only on logging steps).
    fn forward(&mut self, model: &Self::Model, step: u64) -> (Tensor<1>, Vec<Tensor<1>>);

    /// Called after each optimizer step (the LDM updates its EMA here).
    fn after_update(&mut self, _model: &Self::Model, _step: u64) {}

    /// Writes the sample grid of `step` (the model is in eval mode, without autodiff).
    fn write_samples(&mut self, model: &Self::Model, step: u64) -> Result<()>;

    /// Extra state to checkpoint beside model and optimizer (the LDM's EMA weights).
    fn save_extra(&self, _checkpoint_dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Restores what [`TrainTask::save_extra`] wrote.
    fn load_extra(&mut self, _checkpoint_dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// How a run ended.
pub enum Outcome<M> {
    /// All steps done; the trained model.
    Finished(M),
    /// Stopped by Ctrl-C after saving a checkpoint at this step.
    Interrupted(u64),
}

/// Runs `task` on one device from step 0, or from the checkpoint in `run_dir` with `resume`.
pub fn train<T: TrainTask>(
    task: &mut T,
    model: T::Model,
    config: &TrainConfig,
    architecture: String,
    run_dir: &Path,
    resume: bool,
) -> Result<Outcome<T::Model>> {
    if !config.devices.is_empty() {
        bail!(
            "train.devices (--devices) = {}: this stage trains on one device (data parallelism is for train-vae and train-ldm); remove it and use --device",
            config.devices.join(",")
        );
    }
    if let Some(dir) = &config.init_from {
        bail!(
            "train.init_from (--init-from) = {}: this stage starts from a random initialisation (fine-tuning is for train-vae and train-ldm); remove it",
            dir.display()
        );
    }
    if config.gradient_accumulation_steps > 1 {
        bail!(
            "train.gradient_accumulation_steps = {}: this stage computes each batch in one part (gradient accumulation is for train-vae and train-ldm); remove the key",
            config.gradient_accumulation_steps
        );
    }
    run(
        task,
        model,
        config,
        architecture,
        run_dir,
        resume,
        |task, model, step| one_device(task, model, step, config.precision),
    )
}

/// Like [`train`], with each batch split evenly over `train.devices` when it names more than
/// one, and each device's share into `train.gradient_accumulation_steps` sequential parts; the
/// model must live on the first device ([`parallel::main_device`]).
pub fn train_sharded<T: ShardedTask>(
    task: &mut T,
    model: T::Model,
    config: &TrainConfig,
    architecture: String,
    run_dir: &Path,
    resume: bool,
) -> Result<Outcome<T::Model>> {
    let devices = parallel::select_all(&config.devices)?;
    let accumulation = config.gradient_accumulation_steps;
    if devices.len() <= 1 && accumulation == 1 {
        return run(
            task,
            model,
            config,
            architecture,
            run_dir,
            resume,
            |task, model, step| one_device(task, model, step, config.precision),
        );
    }
    let names: Vec<String> = devices.iter().map(|d| d.description.clone()).collect();
    eprintln!(
        "{}",
        parallel::describe(&names, config.batch_size, accumulation)
    );
    let devices: Vec<Device> = match devices.len() {
        0 => model.devices().into_iter().take(1).collect(),
        _ => devices.into_iter().map(|d| d.device).collect(),
    };
    let devices = devices.into_iter().map(Device::without_autodiff).collect();
    let replicas = DataParallel::new(devices, config.batch_size, accumulation);
    run(
        task,
        model,
        config,
        architecture,
        run_dir,
        resume,
        |task, model, step| replicas.step(task, model, step, config.precision),
    )
}

/// The step on one device: forward, then backward (in bf16 with `precision`, the gradients
/// landing on the f32 `model`).
fn one_device<T: TrainTask>(
    task: &mut T,
    model: &T::Model,
    step: u64,
    precision: Precision,
) -> Result<StepOutput> {
    let (loss, scalars) = task.forward(&precision.compute_copy(model), step);
    let grads = GradientsParams::from_grads(loss.backward(), model);
    Ok((loss, scalars, grads))
}

/// The loop around `forward_backward`, which returns the loss, the scalars and the gradients
/// of batch `step`.
fn run<T: TrainTask>(
    task: &mut T,
    model: T::Model,
    config: &TrainConfig,
    architecture: String,
    run_dir: &Path,
    resume: bool,
    mut forward_backward: impl FnMut(&mut T, &T::Model, u64) -> Result<StepOutput>,
) -> Result<Outcome<T::Model>> {
    if !config.precision.is_f32() && model.devices().first().is_some_and(is_flex) {
        eprintln!(
            "warning: train.precision = \"bf16\" on burn-flex runs burn's generic bf16 operations, several times slower than f32 there (the project's fast burn-flex operations are f32; docs/PERFORMANCE.md): use f32 on burn-flex, bf16 with --device libtorch or cuda"
        );
    }
    let device = model
        .devices()
        .into_iter()
        .next()
        .unwrap_or_else(Device::flex);
    let optim = config.optimizer(&device);
    let mut state = TrainState {
        step: 0,
        seed: config.seed,
        batch_size: config.batch_size,
        architecture,
    };
    let (mut model, mut optim) = if resume {
        let (model, optim, saved) = state::load(run_dir, model, optim, &state)?;
        task.load_extra(&state::dir(run_dir))?;
        state.step = saved.step;
        (model, optim)
    } else {
        (model, optim)
    };
    let start = state.step;
    if start >= config.steps {
        bail!(
            "--resume: the checkpoint is at step {start}, the run asks for {} steps: raise --steps to train further",
            config.steps
        );
    }

    let mut names = task.metric_names();
    names.extend(["lr", "images_per_s"]);
    let mut metrics = MetricsLog::open(
        &run_dir.join("metrics.csv"),
        &names,
        resume.then_some(start),
    )?;
    let bar = progress::bar(config.steps, "step");
    bar.set_position(start);
    let mut last_log = (Instant::now(), start);
    let mut last_good = resume.then_some(start);

    let _graceful = interrupt::Graceful::begin();
    for step in start..config.steps {
        if interrupt::requested() {
            bar.abandon_with_message("interrupted");
            return save_checkpoint(task, &model, &mut optim, &mut state, run_dir, step)
                .map(|()| Outcome::Interrupted(step));
        }
        let (loss, scalars, grads) = forward_backward(task, &model, step)?;
        let done = step + 1;
        let logging = done % config.log_every == 0 || done == config.steps;
        let checkpointing = done % config.checkpoint_every == 0 || done == config.steps;
        // The loss is read (a device sync) only when it is logged or before a checkpoint.
        let read = (logging || checkpointing).then(|| {
            let mut values: Vec<f64> = scalars
                .iter()
                .map(|s| ldm_common::tensor::scalar(s.clone()))
                .collect();
            values.insert(0, ldm_common::tensor::scalar(loss.clone()));
            values
        });
        if let Some(values) = &read
            && values.iter().any(|v| !v.is_finite())
        {
            bar.abandon();
            let kept = match last_good {
                Some(s) => format!(
                    "the last good checkpoint (step {s}) is kept in {}",
                    state::dir(run_dir).display()
                ),
                None => "no checkpoint was written yet".into(),
            };
            bail!(
                "the loss became non-finite (NaN or inf) by step {done}; training stopped and {kept}; try a lower --lr"
            );
        }
        let lr = config.lr_at(step);
        model = optim.step(lr, model, grads);
        task.after_update(&model, step);
        bar.inc(1);

        if let Some(values) = read {
            let (t0, s0) = last_log;
            let images_per_s =
                (done - s0) as f64 * config.batch_size as f64 / t0.elapsed().as_secs_f64();
            last_log = (Instant::now(), done);
            let mut row = values[1..].to_vec();
            row.extend([lr, images_per_s]);
            if logging {
                metrics.row(done, &row)?;
            }
            let parts: Vec<String> = task
                .metric_names()
                .iter()
                .zip(&values[1..])
                .map(|(n, v)| format!("{n} {v:.4}"))
                .collect();
            bar.set_message(format!("{} | {images_per_s:.0} img/s", parts.join(" ")));
        }
        if done % config.sample_every == 0 || done == config.steps {
            task.write_samples(&model.valid(), done)?;
        }
        if checkpointing {
            save_checkpoint(task, &model, &mut optim, &mut state, run_dir, done)?;
            last_good = Some(done);
        }
    }
    bar.finish();
    Ok(Outcome::Finished(model))
}

fn save_checkpoint<T: TrainTask>(
    task: &T,
    model: &T::Model,
    optim: &mut AdamW,
    state: &mut TrainState,
    run_dir: &Path,
    step: u64,
) -> Result<()> {
    state.step = step;
    task.save_extra(&state::dir(run_dir))?;
    state::save(run_dir, model, optim, state)
}
