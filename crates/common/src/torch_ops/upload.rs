//! Uploads to CUDA through page-locked memory, without waiting for the device.
//!
//! burn-tch uploads a host tensor with `Tensor::to(device)`: from pageable memory, libtorch
//! copies it and synchronises the stream, so the host waits for every kernel already queued.
//! The first upload of a training step therefore waits for the previous step's optimizer, and
//! the host cannot queue one step while the device runs the last. PyTorch's data loaders pin
//! the batch and copy it with `non_blocking=True`; [`pinned_float`] and [`pinned_int`] do the
//! same (`ldm_pinned_upload` in `csrc/torch_backward.cpp`).
//!
//! Neither runs on a CPU, so the first call for each CUDA device checks the path once: a few
//! values of each kind are uploaded and read back, then four large buffers queued in a row
//! (whose page-locked blocks are handed back at once) are read back after all four. If that
//! fails, a warning gives libtorch's reason and every upload to that device goes through
//! burn's `from_data`; a later upload that fails goes that way too, with a warning the first
//! time. `LDM_UPLOADS=pageable` chooses `from_data` without a check (to measure what the path
//! changes).

use std::sync::{Mutex, Once};

use burn::backend::libtorch::TchTensor;
use burn::backend::{
    BackendTensor, DispatchAutodiffContext, DispatchDevice, DispatchTensor, DispatchTensorKind,
};
use burn::tensor::{Device, Int, Tensor};

use super::native;

/// The outcome of each CUDA device's check, by device index, made on its first upload.
static CHECKS: Mutex<Vec<(usize, Result<(), String>)>> = Mutex::new(Vec::new());

/// The CUDA device index of `device`, if it is burn-tch on CUDA.
fn cuda_index(device: &Device) -> Option<usize> {
    match device.as_dispatch().clone().inner() {
        DispatchDevice::LibTorch(d) => match tch::Device::from(d) {
            tch::Device::Cuda(index) => Some(index),
            _ => None,
        },
        _ => None,
    }
}

/// `values` as a `shape` tensor on `device` through page-locked memory, when `device` is CUDA
/// and the first use's check passed; `None` otherwise (the caller uploads with `from_data`).
pub fn pinned_float<const D: usize>(
    values: &[f32],
    shape: [usize; D],
    device: &Device,
) -> Option<Tensor<D>> {
    let t = warn_once(send(values, &sizes(shape), usable(device)?))?;
    Some(wrap(t, float_kind, device))
}

/// [`pinned_float`] for integer values (labels, timesteps).
pub fn pinned_int<const D: usize>(
    values: &[i64],
    shape: [usize; D],
    device: &Device,
) -> Option<Tensor<D, Int>> {
    let t = warn_once(send(values, &sizes(shape), usable(device)?))?;
    Some(wrap(t, int_kind, device))
}

/// A page-locked upload after the check passed, or `None` (the caller uploads with
/// `from_data`) with a warning the first time one fails: the check ran once per device, and
/// a later upload can still fail (out of page-locked memory).
fn warn_once(sent: Result<tch::Tensor, String>) -> Option<tch::Tensor> {
    static WARNED: Once = Once::new();
    sent.map_err(|reason| {
        WARNED.call_once(|| {
            eprintln!(
                "warning: a page-locked upload to CUDA failed ({reason}); it and any other that fails go through burn's from_data"
            )
        })
    })
    .ok()
}

/// The outcome of the pinned-upload checks, if a process has made a CUDA upload: `Ok` when
/// uploads to every CUDA device used go through page-locked memory, else the first device's
/// reason that does not.
pub fn pinned_upload_check() -> Option<Result<(), String>> {
    let checks = CHECKS.lock().unwrap_or_else(|e| e.into_inner());
    if checks.is_empty() {
        return None;
    }
    Some(match checks.iter().find(|(_, outcome)| outcome.is_err()) {
        Some((index, Err(reason))) if checks.len() > 1 => Err(format!("cuda:{index}: {reason}")),
        Some((_, outcome)) => outcome.clone(),
        None => Ok(()),
    })
}

/// The CUDA index of `device` when uploads to it may go through page-locked memory: checked
/// on the device's first upload (each device of a data-parallel run has its own check).
fn usable(device: &Device) -> Option<usize> {
    let index = cuda_index(device)?;
    let mut checks = CHECKS.lock().unwrap_or_else(|e| e.into_inner());
    let passed = match checks.iter().find(|(i, _)| *i == index) {
        Some((_, outcome)) => outcome.is_ok(),
        None => {
            let outcome = check(index);
            let passed = outcome.is_ok();
            checks.push((index, outcome));
            passed
        }
    };
    passed.then_some(index)
}

/// Uploads a few values of each kind to CUDA device `index` and reads them back.
fn check(index: usize) -> Result<(), String> {
    if std::env::var("LDM_UPLOADS").as_deref() == Ok("pageable") {
        return Err("LDM_UPLOADS=pageable".to_owned());
    }
    let outcome = check_on(index);
    if let Err(reason) = &outcome {
        eprintln!(
            "warning: uploads to cuda:{index} wait for the device (page-locked uploads failed their check: {reason})"
        );
    }
    outcome
}

fn check_on(index: usize) -> Result<(), String> {
    let floats = [0.5f32, -1.25, 3.0e-30, 7.0e20, -0.0];
    let ints = [3i64, -2, 1 << 40];
    let back_f: Vec<f32> = read_back(&send(&floats, &[5], index)?)?;
    let back_i: Vec<i64> = read_back(&send(&ints, &[3], index)?)?;
    let same_floats = back_f
        .iter()
        .zip(&floats)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    if !same_floats || back_i != ints {
        return Err(format!(
            "read back {back_f:?} / {back_i:?} for {floats:?} / {ints:?}"
        ));
    }
    reuse_check(index)
}

/// Each upload hands its page-locked block back at once, and the next one of that size may
/// take it: four 4 MiB uploads queued in a row and read back only then show whether a block
/// was reused (overwritten) before its copy had run.
fn reuse_check(index: usize) -> Result<(), String> {
    const N: usize = 1 << 20;
    let mut copies = Vec::new();
    for k in 0..4usize {
        let values: Vec<f32> = (0..N).map(|i| (i ^ (k * 0x5555)) as f32).collect();
        let t = send(&values, &[N as i64], index)?;
        copies.push((values, t));
    }
    for (k, (values, t)) in copies.iter().enumerate() {
        if read_back::<f32>(t)? != *values {
            return Err(format!(
                "upload {k} of 4 read back different values: a page-locked block was reused before its copy ran"
            ));
        }
    }
    Ok(())
}

fn sizes<const D: usize>(shape: [usize; D]) -> [i64; D] {
    shape.map(|n| n as i64)
}

/// `values` (row-major with `sizes`) on CUDA device `index` through page-locked memory, or
/// libtorch's first sentence.
fn send<T: bytemuck::Pod + tch::kind::Element>(
    values: &[T],
    sizes: &[i64],
    index: usize,
) -> Result<tch::Tensor, String> {
    native::pinned_upload(bytemuck::cast_slice(values), sizes, T::KIND, index)
        .map_err(|e| native::first_sentence(&e))
}

/// A device tensor's values, copied back to the host.
fn read_back<T: tch::kind::Element + Copy>(t: &tch::Tensor) -> Result<Vec<T>, String> {
    Vec::<T>::try_from(t.to(tch::Device::Cpu)).map_err(|e| e.to_string())
}

fn float_kind(t: TchTensor) -> DispatchTensorKind {
    DispatchTensorKind::LibTorch(BackendTensor::Float(t))
}

fn int_kind(t: TchTensor) -> DispatchTensorKind {
    DispatchTensorKind::LibTorch(BackendTensor::Int(t))
}

/// A libtorch tensor as a burn tensor on `device`: kind `kind` (float or int) of burn-tch, in
/// `device`'s autodiff context (an upload onto an autodiff device is an autodiff constant,
/// as burn's `from_data` makes it).
fn wrap<const D: usize, K: burn::tensor::kind::Autodiff>(
    t: tch::Tensor,
    kind: fn(TchTensor) -> DispatchTensorKind,
    device: &Device,
) -> Tensor<D, K> {
    let plain = Tensor::<D, K>::from_dispatch(DispatchTensor {
        kind: kind(TchTensor::new(t)),
        autodiff: DispatchAutodiffContext::Disabled,
    });
    match device.gradient_checkpointing_strategy() {
        Some(strategy) => plain
            .autodiff()
            .with_gradient_checkpointing_strategy(strategy),
        None => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::to_vec_f32;

    /// The wrapping into burn (every step of a pinned upload but the copy itself, which needs
    /// CUDA), on libtorch's CPU: values, kind and the device's autodiff context.
    #[test]
    fn a_libtorch_tensor_wraps_as_burn_would_upload_it() {
        let plain = Device::libtorch();
        for device in [plain.clone(), plain.autodiff()] {
            let t = tch::Tensor::from_slice(&[1.5f32, -2.0, 4.0]).reshape([3, 1]);
            let x: Tensor<2> = wrap(t, float_kind, &device);
            assert_eq!(x.dims(), [3, 1]);
            assert_eq!(x.is_autodiff(), device.is_autodiff());
            assert_eq!(to_vec_f32(x), [1.5, -2.0, 4.0]);
            let i: Tensor<1, Int> = wrap(tch::Tensor::from_slice(&[7i64, -1]), int_kind, &device);
            assert_eq!(i.is_autodiff(), device.is_autodiff());
            assert_eq!(i.into_data().try_into_vec_as::<i64>().unwrap(), [7, -1]);
        }
    }

    /// Each CUDA device is checked once, on its own first upload (a data-parallel run uploads
    /// to several); libtorch's CPU device never is. Without CUDA every check fails, and the
    /// summary names the first device that failed.
    #[test]
    fn each_cuda_device_is_checked_once() {
        assert_eq!(usable(&Device::libtorch()), None);
        for _ in 0..2 {
            assert_eq!(usable(&Device::libtorch_cuda(0)), None);
            assert_eq!(usable(&Device::libtorch_cuda(1)), None);
        }
        let indices: Vec<usize> = CHECKS.lock().unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [0, 1]);
        let summary = pinned_upload_check().unwrap().unwrap_err();
        assert!(summary.starts_with("cuda:0: "), "{summary}");
    }

    /// A page-locked upload that fails after the check falls back (`None`: the caller uploads
    /// with `from_data`); one that succeeds is used.
    #[test]
    fn a_later_failed_upload_falls_back() {
        assert!(warn_once(Err("out of page-locked memory".to_owned())).is_none());
        let t = warn_once(Ok(tch::Tensor::from_slice(&[2.0f32]))).expect("a sent tensor is used");
        assert_eq!(Vec::<f32>::try_from(t).unwrap(), [2.0]);
    }

    /// On a machine without CUDA the check fails with libtorch's one-line reason, and nothing
    /// but CUDA devices take the path.
    #[test]
    fn without_cuda_the_check_fails_in_one_line() {
        let reason = check_on(0).expect_err("no CUDA device here");
        assert!(!reason.is_empty() && !reason.contains('\n'), "{reason}");
        assert_eq!(cuda_index(&Device::libtorch()), None);
        assert_eq!(cuda_index(&Device::flex()), None);
        assert!(pinned_float(&[1.0], [1], &Device::libtorch()).is_none());
    }
}
