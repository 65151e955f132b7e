//! Mixed precision (`train.precision = "bf16"`): f32 master weights, bf16 arithmetic.
//!
//! burn 0.22 has no automatic mixed precision (burn #5696); this is its manual form. Each
//! training step maps the f32 model to a bf16 copy *inside the autodiff graph* (every weight
//! becomes `w.cast(bf16)`, whose backward casts the gradient back), runs forward and backward
//! in bf16, and the gradients arrive at the f32 weights in f32, where AdamW keeps its moments
//! and the EMA its average. bf16 has f32's exponent range, so no loss scaling is needed.
//!
//! The models keep the dtype boundary themselves: they cast their inputs to [`param_dtype`]
//! on entry ([`to_dtype`]), build any constant in the dtype of the tensor it meets, and hand
//! back f32, so losses and their reductions stay in f32.

use std::borrow::Cow;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// The arithmetic of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// f32 weights and optimizer state, forward and backward in bf16.
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }

    /// The model a step computes with: `model` itself for f32 (borrowed, no copy); for bf16 a
    /// copy whose weights are bf16 casts of `model`'s, so that
    /// `GradientsParams::from_grads(loss.backward(), model)` finds the gradients on the f32
    /// weights, or `model` itself if its weights are bf16 already (a model cast once for
    /// sampling).
    pub fn compute_copy<M: Module>(self, model: &M) -> Cow<'_, M> {
        match self {
            Self::F32 => Cow::Borrowed(model),
            Self::Bf16 if param_dtype(model) == DType::BF16 => Cow::Borrowed(model),
            Self::Bf16 => Cow::Owned(model.clone().map(&mut CastWeights(FloatDType::BF16))),
        }
    }
}

/// The names of `train.precision`, for flags such as `pipeline bench --precision`.
impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err("expected f32 or bf16".into()),
        }
    }
}

struct CastWeights(FloatDType);

impl ModuleMapper for CastWeights {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

struct FirstFloat(Option<DType>);

impl ModuleVisitor for FirstFloat {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.0.is_none() {
            self.0 = Some(param.val().dtype());
        }
    }
}

/// The dtype a module computes in: that of its first float weight (f32 if it has none).
pub fn param_dtype<M: Module>(module: &M) -> DType {
    let mut first = FirstFloat(None);
    module.visit(&mut first);
    first.0.unwrap_or(DType::F32)
}

/// `x` in `dtype`, without a graph node when it already is.
pub fn to_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// `x` in f32 (what models hand back, so that losses reduce in f32).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    to_dtype(x, DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::Device;

    #[test]
    fn bf16_copy_sends_f32_gradients_to_the_f32_weights() {
        let device = Device::flex().autodiff();
        device.seed(0);
        let master: Linear = LinearConfig::new(4, 3).init(&device);
        let x = Tensor::<2>::ones([2, 4], &device);
        let grads_of = |precision: Precision| {
            let model = precision.compute_copy(&master);
            assert_eq!(
                param_dtype(&*model),
                if precision.is_f32() {
                    DType::F32
                } else {
                    DType::BF16
                }
            );
            let y = to_f32(model.forward(to_dtype(x.clone(), param_dtype(&*model))));
            let grads = GradientsParams::from_grads(y.sum().backward(), &master);
            let g = grads
                .get::<2>(master.weight.id)
                .expect("a gradient for the f32 weight");
            assert_eq!(g.dtype(), DType::F32);
            crate::tensor::to_vec_f32(g)
        };
        let (full, mixed) = (grads_of(Precision::F32), grads_of(Precision::Bf16));
        // d sum(x W + b) / dW = column sums of x = 2 for every entry, exact in bf16
        assert!(
            full.iter().chain(&mixed).all(|&g| g == 2.0),
            "{full:?} {mixed:?}"
        );
        assert_eq!(param_dtype(&master), DType::F32, "the master stays f32");
        // a model cast once (for sampling) is not copied again
        let cast = Precision::Bf16.compute_copy(&master).into_owned();
        assert!(matches!(
            Precision::Bf16.compute_copy(&cast),
            Cow::Borrowed(_)
        ));
    }
}
