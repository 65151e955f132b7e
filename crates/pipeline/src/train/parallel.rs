//! Data-parallel training over several devices (`--devices cpu,cpu`, `--devices cuda:0,cuda:1`,
//! or `[train] devices = [...]`), built from burn's multi-device pieces: those burn-train's
//! `ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimMainDevice)` is made of.
//! Every step the model is forked to each device (`Module::fork`: a replica with its own
//! autodiff graph), each replica runs forward and backward on its rows of the global batch on
//! its own thread, the gradients are moved to the first device (`GradientsParams::to_device`)
//! and summed there (`GradientsAccumulator`), and one optimizer step updates the model. The
//! checkpoint, metrics and sample grids are those of the one model, written once.
//!
//! With rows R_k of a global batch of B samples, replica k's loss is weighted by |R_k| / B,
//! so the summed gradient is that of the global batch's mean loss:
//! grad (1/B) sum_i l_i = sum_k (|R_k| / B) grad (1/|R_k|) sum_{i in R_k} l_i.
//! Each replica draws the global batch's samples and noise from the seed and keeps its rows,
//! so training over N devices follows single-device training up to float rounding.
//!
//! Gradient accumulation (`train.gradient_accumulation_steps` = K) splits each device's rows
//! further into K equal parts run one after the other on that device, each weighted by its
//! share of B in the same way, their gradients summed before the transfer: the step is the same
//! up to float rounding, and only one part's activations are alive at a time. On one device it
//! runs through the same path, with a single replica.
//!
//! burn 0.22.1's collective all-reduce (burn-train's DDP strategy) is not used: it runs only on
//! cubecl's CUDA runtime with NCCL; on flex and libtorch devices burn-dispatch panics
//! ("Distributed operations are not supported for device Flex(Cpu)"). See README, "Several
//! devices".

use std::ops::Range;

use anyhow::{Result, anyhow};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use ldm_common::device::{DeviceChoice, SelectedDevice, select};
use ldm_common::precision::Precision;

use super::config::TrainConfig;
use super::trainer::TrainTask;

/// A stage whose batches can be split over several devices.
pub trait ShardedTask: TrainTask + Sync {
    /// The training-set indices of batch `step` (the data order).
    fn batch_indices(&mut self, step: u64) -> Vec<usize>;

    /// The loss and logged scalars of rows `rows` of batch `step` (whose samples are
    /// `indices`), computed by `model` on `device`: exactly the samples, noise and
    /// conditioning of those rows in [`TrainTask::forward`], each value a mean over the rows.
    fn forward_rows(
        &self,
        model: &Self::Model,
        step: u64,
        indices: &[usize],
        rows: Range<usize>,
        device: &Device,
    ) -> (Tensor<1>, Vec<Tensor<1>>);
}

/// Rows `rows` of `t` along its first dimension (the tensor itself when they are all of them).
pub fn take_rows<const D: usize>(t: Tensor<D>, rows: &Range<usize>) -> Tensor<D> {
    if rows.start == 0 && rows.end == t.dims()[0] {
        t
    } else {
        t.narrow(0, rows.start, rows.len())
    }
}

/// `--devices LIST` as the entries of `train.devices`.
pub fn split_list(list: &str) -> Vec<String> {
    list.split(',').map(|s| s.trim().to_string()).collect()
}

fn shown(devices: &[String]) -> String {
    devices.join(",")
}

/// Parses `train.devices`: known names, all of one kind, no `auto`.
fn parse(devices: &[String]) -> std::result::Result<Vec<DeviceChoice>, String> {
    let expected = "expected cpu, libtorch, cuda or cuda:N";
    let mut choices = Vec::with_capacity(devices.len());
    for name in devices {
        let choice = match name.parse::<DeviceChoice>() {
            Ok(DeviceChoice::Auto) | Err(_) => {
                return Err(format!(
                    "train.devices (--devices) = {}: unknown device `{name}` in the list; {expected}",
                    shown(devices)
                ));
            }
            Ok(c) => c,
        };
        choices.push(choice);
    }
    let kind = |c: &DeviceChoice| std::mem::discriminant(c);
    if let Some(first) = choices.first()
        && let Some(other) = choices.iter().find(|c| kind(c) != kind(first))
    {
        return Err(format!(
            "train.devices (--devices) = {}: mixes {first} with {other}; expected devices of one kind, e.g. cpu,cpu or cuda:0,cuda:1",
            shown(devices)
        ));
    }
    Ok(choices)
}

/// Checks `train.devices` and `train.gradient_accumulation_steps` (K) against the batch size:
/// each of N devices takes B / N rows, in K parts of B / (N K).
pub fn check_split(
    devices: &[String],
    batch_size: usize,
    accumulation: usize,
) -> std::result::Result<(), String> {
    let n = parse(devices)?.len();
    if n > 1 && !batch_size.is_multiple_of(n) {
        return Err(format!(
            "train.batch_size = {batch_size} (--batch-size) is not divisible by the {n} devices of --devices {}: expected a multiple of {n}, each device taking an equal share",
            shown(devices)
        ));
    }
    let share = batch_size / n.max(1);
    if accumulation > 1 && !share.is_multiple_of(accumulation) {
        let whose = if n > 1 {
            format!("the {share} samples each device takes of the batch of {batch_size}")
        } else {
            format!("train.batch_size = {batch_size} (--batch-size)")
        };
        return Err(format!(
            "train.gradient_accumulation_steps = {accumulation} (--gradient-accumulation-steps): {whose} cannot be split into {accumulation} equal parts; expected a divisor of {share}"
        ));
    }
    Ok(())
}

/// The devices of `train.devices`, each resolved (a CUDA device this build or machine lacks is
/// an error naming it).
pub fn select_all(devices: &[String]) -> Result<Vec<SelectedDevice>> {
    parse(devices)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .map(|c| select(c).map_err(|e| anyhow!("--devices {}: {e}", shown(devices))))
        .collect()
}

/// The device a stage works on: the first of `train.devices`, or `device` (`--device`).
pub fn main_device(config: &TrainConfig, device: &Device) -> Result<Device> {
    Ok(match select_all(&config.devices)?.into_iter().next() {
        Some(first) => first.device,
        None => device.clone(),
    })
}

/// One line saying how each batch is split over `devices` (a description of each, or none
/// for the one `--device`) and into `accumulation` parts.
pub fn describe(devices: &[String], batch_size: usize, accumulation: usize) -> String {
    let share = batch_size / devices.len().max(1);
    let parts = if accumulation > 1 {
        format!(
            ", in {accumulation} parts of {} (gradient accumulation)",
            share / accumulation
        )
    } else {
        String::new()
    };
    if devices.len() > 1 {
        format!(
            "data parallel over {} devices ({}): {share} of the {batch_size} samples of each step on each{parts}",
            devices.len(),
            devices.join(", "),
        )
    } else {
        format!("each step's {batch_size} samples{parts}, then one optimizer step")
    }
}

/// The replicas' devices and the rows of the global batch each one takes, in parts.
pub struct DataParallel {
    /// Plain devices; the first holds the model, the optimizer state and the summed gradients.
    devices: Vec<Device>,
    /// Per device, its rows of the batch as the parts it computes one after the other.
    parts: Vec<Vec<Range<usize>>>,
    batch_size: usize,
}

/// What one step produced on the main device: the loss, the logged scalars and the gradients
/// of the whole batch.
pub type StepOutput = (Tensor<1>, Vec<Tensor<1>>, GradientsParams);

impl DataParallel {
    /// Splits batches of `batch_size` evenly over `devices` (plain devices), and each device's
    /// share into `accumulation` equal parts (checked by [`check_split`]).
    pub fn new(devices: Vec<Device>, batch_size: usize, accumulation: usize) -> Self {
        let share = batch_size / devices.len();
        let part = share / accumulation;
        Self {
            parts: (0..devices.len())
                .map(|k| {
                    (0..accumulation)
                        .map(|j| k * share + j * part..k * share + (j + 1) * part)
                        .collect()
                })
                .collect(),
            devices,
            batch_size,
        }
    }

    /// Forward and backward of batch `step` on every replica, one thread each, each replica's
    /// parts one after the other; returns the batch's loss and scalars (row-weighted means)
    /// and the summed gradients, on the first device. `model` lives on the first device (with
    /// autodiff).
    pub fn step<T: ShardedTask>(
        &self,
        task: &mut T,
        model: &T::Model,
        step: u64,
        precision: Precision,
    ) -> Result<StepOutput> {
        let indices = task.batch_indices(step);
        let task: &T = task;
        let total = self.batch_size as f64;
        let outputs = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .devices
                .iter()
                .zip(&self.parts)
                .map(|(device, parts)| {
                    let replica = model.clone();
                    let indices = &indices;
                    scope.spawn(move || {
                        let ad = device.clone().autodiff();
                        let replica = replica.fork(&ad);
                        let mut sum = Summed::default();
                        for rows in parts {
                            let (loss, scalars) = task.forward_rows(
                                &precision.compute_copy(&replica),
                                step,
                                indices,
                                rows.clone(),
                                &ad,
                            );
                            let weight = rows.len() as f64 / total;
                            let loss = loss * weight;
                            let grads = GradientsParams::from_grads(loss.backward(), &replica);
                            let scalars = scalars.into_iter().map(|s| s.inner() * weight);
                            sum.add(&replica, loss.inner(), scalars.collect(), grads, device);
                        }
                        sum
                    })
                })
                .collect();
            workers
                .into_iter()
                .enumerate()
                .map(|(k, worker)| {
                    worker.join().map_err(|panic| {
                        anyhow!(
                            "the training worker on device {k} of --devices failed: {}",
                            panic_message(panic.as_ref())
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;

        let main = &self.devices[0];
        let mut total = Summed::default();
        for shard in outputs {
            let Summed {
                loss,
                scalars,
                grads,
            } = shard;
            let (Some(loss), Some(mut grads)) = (loss, grads) else {
                continue;
            };
            total.add(model, loss, scalars, grads.grads(), main);
        }
        match total {
            Summed {
                loss: Some(loss),
                scalars,
                grads: Some(mut grads),
            } => Ok((loss, scalars, grads.grads())),
            _ => Err(anyhow!("--devices: no device to train on")),
        }
    }
}

/// Losses, scalars and gradients summed over parts of a batch, on one device.
struct Summed<M: Module> {
    loss: Option<Tensor<1>>,
    scalars: Vec<Tensor<1>>,
    grads: Option<GradientsAccumulator<M>>,
}

impl<M: Module> Default for Summed<M> {
    fn default() -> Self {
        Self {
            loss: None,
            scalars: Vec::new(),
            grads: None,
        }
    }
}

impl<M: Module> Summed<M> {
    /// Adds one part's weighted loss, scalars and gradients (of `model`'s parameters), moved
    /// to `device` first.
    fn add(
        &mut self,
        model: &M,
        loss: Tensor<1>,
        scalars: Vec<Tensor<1>>,
        grads: GradientsParams,
        device: &Device,
    ) {
        let loss = loss.to_device(device);
        self.loss = Some(match self.loss.take() {
            Some(sum) => sum + loss,
            None => loss,
        });
        let scalars = scalars.into_iter().map(|s| s.to_device(device));
        if self.scalars.is_empty() {
            self.scalars = scalars.collect();
        } else {
            for (sum, s) in self.scalars.iter_mut().zip(scalars) {
                *sum = sum.clone() + s;
            }
        }
        self.grads
            .get_or_insert_with(GradientsAccumulator::new)
            .accumulate(model, grads.to_device(device, model));
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &str) -> Vec<String> {
        split_list(list)
    }

    #[test]
    fn lists_parse_and_refuse_what_they_should() {
        let check_devices = |devices: &[String], batch| check_split(devices, batch, 1);
        assert!(check_devices(&names("cpu,cpu"), 8).is_ok());
        assert!(check_devices(&[], 7).is_ok());
        assert!(check_devices(&names("cpu"), 7).is_ok());
        assert_eq!(
            check_devices(&names("cpu,cpu"), 5).unwrap_err(),
            "train.batch_size = 5 (--batch-size) is not divisible by the 2 devices of --devices cpu,cpu: expected a multiple of 2, each device taking an equal share"
        );
        let unknown = check_devices(&names("cpu,gpu"), 8).unwrap_err();
        assert!(unknown.contains("unknown device `gpu`"), "{unknown}");
        assert!(unknown.contains("expected cpu, libtorch, cuda or cuda:N"));
        assert!(check_devices(&names("auto,cpu"), 8).is_err());
        assert!(check_devices(&names("cpu,"), 8).is_err());
        let mixed = check_devices(&names("cpu,cuda:0"), 8).unwrap_err();
        assert!(mixed.contains("mixes cpu with cuda:0"), "{mixed}");
        assert!(check_split(&names("cpu,cpu"), 8, 4).is_ok());
        assert!(check_split(&[], 12, 3).is_ok());
        assert_eq!(
            check_split(&[], 10, 4).unwrap_err(),
            "train.gradient_accumulation_steps = 4 (--gradient-accumulation-steps): train.batch_size = 10 (--batch-size) cannot be split into 4 equal parts; expected a divisor of 10"
        );
        assert_eq!(
            check_split(&names("cpu,cpu"), 8, 3).unwrap_err(),
            "train.gradient_accumulation_steps = 3 (--gradient-accumulation-steps): the 4 samples each device takes of the batch of 8 cannot be split into 3 equal parts; expected a divisor of 4"
        );
    }

    /// Least squares y = x w on 3 inputs, x and y drawn from the seed per step.
    struct Regression {
        seen: std::sync::Mutex<Vec<Range<usize>>>,
    }

    impl TrainTask for Regression {
        type Model = burn::nn::Linear;

        fn metric_names(&self) -> Vec<&'static str> {
            vec!["mse"]
        }

        fn forward(&mut self, model: &Self::Model, step: u64) -> (Tensor<1>, Vec<Tensor<1>>) {
            let device = model.devices()[0].clone();
            self.forward_rows(model, step, &[0; 8], 0..8, &device)
        }

        fn write_samples(&mut self, _model: &Self::Model, _step: u64) -> anyhow::Result<()> {
            Ok(())
        }
    }

    impl ShardedTask for Regression {
        fn batch_indices(&mut self, _step: u64) -> Vec<usize> {
            vec![0; 8]
        }

        fn forward_rows(
            &self,
            model: &Self::Model,
            step: u64,
            indices: &[usize],
            rows: Range<usize>,
            device: &Device,
        ) -> (Tensor<1>, Vec<Tensor<1>>) {
            self.seen.lock().unwrap().push(rows.clone());
            let mut rng = ldm_common::rng::stream(1, "x", step);
            let x = ldm_common::rng::randn(&mut rng, [indices.len(), 3], device);
            let y = ldm_common::rng::randn(&mut rng, [indices.len(), 1], device);
            let error = model.forward(take_rows(x, &rows)) - take_rows(y, &rows);
            let mse = error.powi_scalar(2).mean();
            (mse.clone(), vec![mse])
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        ldm_common::tensor::to_vec_f32(t)
    }

    /// N replicas in K parts each give the loss and the gradient of all eight rows on one
    /// device in one part, up to float rounding (the sums run in another order): two devices
    /// (data parallel), two parts on one device (gradient accumulation), and both.
    #[test]
    fn split_batches_give_the_gradient_of_the_whole_batch() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let model = burn::nn::LinearConfig::new(3, 1).init(&device);
        let close = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{a:?} vs {b:?}");
            }
        };
        let weight = |g: &GradientsParams| values(g.get::<2>(model.weight.id).unwrap());
        let bias =
            |g: &GradientsParams| values(g.get::<1>(model.bias.as_ref().unwrap().id).unwrap());
        for (devices, parts, rows) in [
            (2, 1, vec![0..4, 4..8]),
            (1, 2, vec![0..4, 4..8]),
            (2, 2, vec![0..2, 2..4, 4..6, 6..8]),
        ] {
            let mut task = Regression {
                seen: Default::default(),
            };
            let (loss, _) = task.forward(&model, 5);
            let single = GradientsParams::from_grads(loss.backward(), &model);
            let (dp_loss, dp_scalars, dp_grads) =
                DataParallel::new(vec![Device::flex(); devices], 8, parts)
                    .step(&mut task, &model, 5, Precision::F32)
                    .unwrap();
            let seen = task.seen.lock().unwrap().clone();
            assert_eq!(seen[0], 0..8);
            let mut shards = seen[1..].to_vec();
            shards.sort_by_key(|r| r.start);
            assert_eq!(
                shards, rows,
                "{devices} x {parts}: each part takes its own rows"
            );
            close(&values(loss.inner()), &values(dp_loss.clone()));
            close(&values(dp_scalars[0].clone()), &values(dp_loss));
            assert!(weight(&single).iter().any(|v| v.abs() > 1e-3));
            close(&weight(&single), &weight(&dp_grads));
            close(&bias(&single), &bias(&dp_grads));
        }
    }

    #[test]
    fn rows_are_equal_shares_in_equal_parts() {
        let dp = DataParallel::new(vec![Device::flex(); 3], 12, 1);
        assert_eq!(dp.parts, vec![vec![0..4], vec![4..8], vec![8..12]]);
        let dp = DataParallel::new(vec![Device::flex(); 2], 12, 3);
        assert_eq!(
            dp.parts,
            vec![vec![0..2, 2..4, 4..6], vec![6..8, 8..10, 10..12]]
        );
    }
}
