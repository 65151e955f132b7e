//! The one device selector behind every `--device` flag.
//!
//! `cpu` is burn-flex (pure Rust, always built). `libtorch` (libtorch on the CPU) and
//! `cuda[:N]` need a build with the `tch` cargo feature (see README, "GPU"). `auto` takes CUDA
//! when the build and the machine have it; otherwise libtorch on the CPU in a `tch` build (1.0
//! to 1.4x faster than burn-flex in training on 2 cores, docs/PERFORMANCE.md) and burn-flex in
//! the default build.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{CommonError, Result};

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Libtorch,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" | "flex" => Ok(Self::Cpu),
            "libtorch" | "tch-cpu" => Ok(Self::Libtorch),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!(
                        "unknown device `{other}`: expected auto, cpu, libtorch, cuda or cuda:N"
                    )
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Libtorch => write!(f, "libtorch"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A selected device and a short human description of it (`cpu (burn-flex)`, `cuda:0 (libtorch)`).
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub description: String,
}

/// Resolves a choice to a device, or explains why this build or machine cannot provide it.
// burn 0.22.1 marks burn-tch deprecated in favour of its CubeCL backends, whose CUDA build
// downloads LLVM and cannot be built on the project's machines: burn-tch is the GPU path here.
#[allow(deprecated)]
pub fn select(choice: DeviceChoice) -> Result<SelectedDevice> {
    let flex = || SelectedDevice {
        device: Device::flex(),
        description: "cpu (burn-flex)".into(),
    };
    match choice {
        DeviceChoice::Cpu => Ok(flex()),
        #[cfg(feature = "tch")]
        DeviceChoice::Libtorch => Ok(SelectedDevice {
            device: Device::libtorch(),
            description: "cpu (libtorch)".into(),
        }),
        #[cfg(feature = "tch")]
        DeviceChoice::Cuda(i) => {
            if !tch::Cuda::is_available() || i >= tch::Cuda::device_count() as usize {
                return Err(CommonError::Device(format!(
                    "cuda:{i}: no such CUDA device on this machine ({} found)",
                    tch::Cuda::device_count()
                )));
            }
            // cuDNN autotuning, as PyTorch users turn it on (`cudnn.benchmark`, and the twin
            // does): the first call of each convolution shape times cuDNN's algorithms and
            // keeps the fastest; training and sampling repeat the same shapes every step.
            tch::Cuda::cudnn_set_benchmark(true);
            Ok(SelectedDevice {
                device: Device::libtorch_cuda(i),
                description: format!("cuda:{i} (libtorch)"),
            })
        }
        #[cfg(feature = "tch")]
        DeviceChoice::Auto if tch::Cuda::is_available() => select(DeviceChoice::Cuda(0)),
        #[cfg(feature = "tch")]
        DeviceChoice::Auto => select(DeviceChoice::Libtorch),
        #[cfg(not(feature = "tch"))]
        DeviceChoice::Auto => Ok(flex()),
        #[cfg(not(feature = "tch"))]
        other => Err(CommonError::Device(format!(
            "{other}: this build has no libtorch/CUDA backend; rebuild with `cargo build --release -p ldm-pipeline --features tch` (see README, GPU)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert!(
            "gpu"
                .parse::<DeviceChoice>()
                .unwrap_err()
                .contains("expected auto, cpu")
        );
    }

    #[test]
    fn auto_takes_the_fastest_backend_of_the_build() {
        let description = select(DeviceChoice::Auto).unwrap().description;
        if cfg!(feature = "tch") {
            assert!(
                description == "cpu (libtorch)" || description.starts_with("cuda:0"),
                "{description}"
            );
        } else {
            assert_eq!(description, "cpu (burn-flex)");
        }
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn cuda_without_tch_is_a_clear_error() {
        let err = select(DeviceChoice::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("--features tch"), "{err}");
    }
}
