//! An exponential moving average of a model's weights, used for sampling (Ho et al. 2020 use
//! decay 0.9999; small CPU budgets want less): ema <- decay * ema + (1 - decay) * theta.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// A parameter's tensor without its rank.
type Primitive = burn::backend::tensor::FloatTensor<burn::backend::Dispatch>;

/// Detached copies of the model's current parameters, keyed by parameter id.
struct Current(HashMap<ParamId, Primitive>);

impl ModuleVisitor for Current {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // (`inner`: the value without autodiff)
        let t = param.val().inner().into_dispatch();
        self.0.insert(param.id, t);
    }
}

/// Blends each EMA parameter with the current parameter of the same id, one operation each.
struct Blend {
    current: HashMap<ParamId, Primitive>,
    decay: f64,
}

impl ModuleMapper for Blend {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(theta) = self.current.remove(&param.id) else {
            return param;
        };
        let decay = self.decay;
        // decay ema + (1 - decay) theta
        param.map(|ema| ldm_common::lerp::lerp(ema, Tensor::from_dispatch(theta), 1.0 - decay))
    }
}

/// Updates `ema` (a copy of `model` without autodiff: same parameter ids) toward `model`;
/// with `foreach`, all parameters in one operation where [`ldm_common::lerp::lerp_all`] can
/// (libtorch): in place once the EMA's parameters are the views of one buffer that the
/// previous update left, no other tensor handle holds them and the model's parameters do not
/// lie in them ([`ldm_common::lerp::lerp_all_in_place`], PyTorch's `_foreach_lerp_`), else
/// into a new buffer; without, one operation per parameter. In place, clones of the EMA module
/// see the update, as references to a PyTorch EMA do: burn's module clones share their
/// parameters' tensors, which no handle count shows (the callers keep none across updates).
pub fn update<M: Module>(ema: &mut M, model: &M, decay: f64, foreach: bool) {
    let mut current = Current(HashMap::new());
    model.visit(&mut current);
    let current = current.0;
    if foreach {
        let mut pairs = Pairs {
            current: &current,
            ids: Vec::new(),
            ema: Vec::new(),
            theta: Vec::new(),
        };
        ema.visit(&mut pairs);
        let Pairs {
            ids, ema: e, theta, ..
        } = pairs;
        // handles on each EMA parameter: the module's and the list's
        if ldm_common::lerp::lerp_all_in_place(&e, &theta, 1.0 - decay, 2) {
            return;
        }
        if let Some(blended) = ldm_common::lerp::lerp_all(e, theta, 1.0 - decay) {
            *ema = ema
                .clone()
                .map(&mut Replace(ids.into_iter().zip(blended).collect()));
            return;
        }
    }
    *ema = ema.clone().map(&mut Blend { current, decay });
}

/// The EMA's parameters that have a counterpart in the model, in visiting order, with it.
struct Pairs<'a> {
    current: &'a HashMap<ParamId, Primitive>,
    ids: Vec<ParamId>,
    ema: Vec<Primitive>,
    theta: Vec<Primitive>,
}

impl ModuleVisitor for Pairs<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(theta) = self.current.get(&param.id) {
            self.ids.push(param.id);
            self.ema.push(param.val().into_dispatch());
            self.theta.push(theta.clone());
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

    /// ema moves toward the model by (1 - decay), per parameter and, where it runs all at
    /// once (libtorch), the same with `foreach`.
    fn blends_each_parameter_by_id(device: Device) {
        device.seed(0);
        let model = LinearConfig::new(2, 2).init(&device.clone().autodiff());
        let ema = model.valid();
        // Move the model: ema must move a quarter of the way with decay 0.75.
        let moved = model.clone().map(&mut Shift);
        let bias = |m: &burn::nn::Linear| to_vec_f32(m.bias.as_ref().unwrap().val());
        for foreach in [false, true] {
            let mut updated = ema.clone();
            update(&mut updated, &moved, 0.75, foreach);
            for (before, after, target) in [
                (
                    to_vec_f32(ema.weight.val()),
                    to_vec_f32(updated.weight.val()),
                    to_vec_f32(moved.weight.val()),
                ),
                (bias(&ema), bias(&updated), bias(&moved)),
            ] {
                for ((b, a), t) in before.iter().zip(&after).zip(&target) {
                    assert!(
                        (a - (0.75 * b + 0.25 * t)).abs() < 1e-6,
                        "foreach {foreach}"
                    );
                }
            }
        }
        assert!((warmed_decay(0.999, 0) - 0.1).abs() < 1e-12);
        assert!((warmed_decay(0.999, 1_000_000) - 0.999).abs() < 1e-12);
    }

    #[test]
    fn blends_each_parameter_by_id_on_flex() {
        blends_each_parameter_by_id(Device::flex());
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)] // burn-tch: the project's GPU path (see ldm_common::torch_ops)
    fn blends_each_parameter_by_id_on_libtorch() {
        blends_each_parameter_by_id(Device::libtorch());
    }

    /// With `foreach` on libtorch, the first update leaves the EMA's parameters as views of one
    /// new buffer and the next ones write into it (the same storage, the values of the
    /// formula); a parameter's tensor held elsewhere turns that off (it keeps its values).
    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)] // burn-tch: the project's GPU path (see ldm_common::torch_ops)
    fn updates_in_place_unless_shared_on_libtorch() {
        let device = Device::libtorch();
        device.seed(0);
        let model = LinearConfig::new(3, 2).init(&device.clone().autodiff());
        let moved = model.clone().map(&mut Shift);
        let mut ema = model.valid();
        let address = |m: &burn::nn::Linear| {
            ldm_common::torch_ops::data_address(&m.weight.val()).expect("a libtorch tensor")
        };
        let weights = |m: &burn::nn::Linear| to_vec_f32(m.weight.val());
        let mut expected = weights(&ema);
        let target = weights(&moved);
        let blend = |e: &mut Vec<f32>| {
            for (e, t) in e.iter_mut().zip(&target) {
                *e = 0.75 * *e + 0.25 * t;
            }
        };
        update(&mut ema, &moved, 0.75, true);
        blend(&mut expected);
        let first = address(&ema);
        update(&mut ema, &moved, 0.75, true);
        blend(&mut expected);
        assert_eq!(address(&ema), first, "in place");
        let held = ema.weight.val();
        let held_values = to_vec_f32(held.clone());
        update(&mut ema, &moved, 0.75, true);
        blend(&mut expected);
        assert_ne!(address(&ema), first, "not in place while a tensor is held");
        assert_eq!(to_vec_f32(held), held_values);
        for (a, b) in weights(&ema).iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    struct Shift;
    impl ModuleMapper for Shift {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| t + 1.0)
        }
    }
}
