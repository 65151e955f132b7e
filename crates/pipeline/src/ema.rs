//! An exponential moving average of a model's weights, used for sampling (Ho et al. 2020 use
//! decay 0.9999; small CPU budgets want less): ema <- decay * ema + (1 - decay) * theta.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// Flattened, detached copies of the current parameters, keyed by parameter id.
struct Collect(HashMap<ParamId, Tensor<1>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().detach().inner();
        let n = t.shape().num_elements();
        self.0.insert(param.id, t.reshape([n]));
    }
}

/// Blends each EMA parameter with the collected parameter of the same id.
struct Blend {
    current: HashMap<ParamId, Tensor<1>>,
    decay: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(theta) = self.current.remove(&param.id) else {
            return param;
        };
        let decay = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            // decay ema + (1 - decay) theta, one operation per parameter
            ldm_common::lerp::lerp(ema, theta.reshape(shape), 1.0 - decay)
        })
    }
}

/// Updates `ema` (a copy of `model` without autodiff: same parameter ids) toward `model`;
/// with `foreach` and a model on libtorch, all parameters in one operation
/// ([`ldm_common::lerp::lerp_all`]).
pub fn update<M: Module>(ema: M, model: &M, decay: f64, foreach: bool) -> M {
    // burn-flex blends each parameter in one pass already; all at once is for libtorch
    if foreach
        && !model
            .devices()
            .first()
            .is_some_and(ldm_common::flex::is_flex)
    {
        return update_all(ema, model, decay);
    }
    let mut collect = Collect(HashMap::new());
    model.visit(&mut collect);
    ema.map(&mut Blend {
        current: collect.0,
        decay,
    })
}

/// A parameter's tensor without its rank.
type Primitive = burn::backend::tensor::FloatTensor<burn::backend::Dispatch>;

/// [`update`] with every parameter blended in one operation.
fn update_all<M: Module>(ema: M, model: &M, decay: f64) -> M {
    let mut theta = CollectAll(HashMap::new());
    model.visit(&mut theta);
    let mut pairs = Pairs {
        theta: theta.0,
        ids: Vec::new(),
        ema: Vec::new(),
        current: Vec::new(),
    };
    ema.visit(&mut pairs);
    let blended = ldm_common::lerp::lerp_all(pairs.ema, pairs.current, 1.0 - decay);
    ema.map(&mut Replace(pairs.ids.into_iter().zip(blended).collect()))
}

/// The model's detached parameters by id, without their ranks.
struct CollectAll(HashMap<ParamId, Primitive>);

impl ModuleVisitor for CollectAll {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().detach().inner().into_dispatch();
        self.0.insert(param.id, t);
    }
}

/// The EMA's parameters that have a counterpart in the model, in visiting order, with it.
struct Pairs {
    theta: HashMap<ParamId, Primitive>,
    ids: Vec<ParamId>,
    ema: Vec<Primitive>,
    current: Vec<Primitive>,
}

impl ModuleVisitor for Pairs {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(theta) = self.theta.remove(&param.id) {
            self.ids.push(param.id);
            self.ema.push(param.val().into_dispatch());
            self.current.push(theta);
        }
    }
}

/// Puts each blended parameter in place.
struct Replace(HashMap<ParamId, Primitive>);

impl ModuleMapper for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match self.0.remove(&param.id) {
            Some(blended) => param.map(|_| Tensor::from_dispatch(blended)),
            None => param,
        }
    }
}

/// Decay used at optimizer step `step`: min(decay, (1 + step) / (10 + step)), the warm-up of
/// TensorFlow's ExponentialMovingAverage, so early weights are not averaged in for long.
pub fn warmed_decay(decay: f64, step: u64) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Device;
    use ldm_common::tensor::to_vec_f32;

    #[test]
    fn blends_each_parameter_by_id() {
        let device = Device::flex().autodiff();
        device.seed(0);
        let model = LinearConfig::new(2, 2).init(&device);
        let ema = model.valid();
        // Move the model: ema must move a quarter of the way with decay 0.75.
        let moved = model.clone().map(&mut Shift);
        let updated = update(ema.clone(), &moved, 0.75, false);
        // all at once (libtorch's path, here on flex where `update` keeps per parameter)
        let all = update_all(ema.clone(), &moved, 0.75);
        assert_eq!(
            to_vec_f32(all.weight.val()),
            to_vec_f32(updated.weight.val())
        );
        assert_eq!(
            to_vec_f32(all.bias.as_ref().unwrap().val()),
            to_vec_f32(updated.bias.as_ref().unwrap().val())
        );
        let (before, after, target) = (
            to_vec_f32(ema.weight.val()),
            to_vec_f32(updated.weight.val()),
            to_vec_f32(moved.weight.val()),
        );
        for ((b, a), t) in before.iter().zip(&after).zip(&target) {
            assert!((a - (0.75 * b + 0.25 * t)).abs() < 1e-6);
        }
        assert!((warmed_decay(0.999, 0) - 0.1).abs() < 1e-12);
        assert!((warmed_decay(0.999, 1_000_000) - 0.999).abs() < 1e-12);
    }

    struct Shift;
    impl ModuleMapper for Shift {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| t + 1.0)
        }
    }
}
