//! AdamW over a whole module ([`AdamW`]), one parameter at a time or all at once (`foreach`).
//!
//! burn's `ModuleOptimizer` steps one parameter at a time, so on burn-tch [`FusedAdamW`] is 15
//! libtorch calls per parameter: 780 kernel launches a DiT step on CUDA, where PyTorch's
//! default CUDA AdamW (`foreach`) takes a few dozen for all parameters. With `foreach`, the
//! libtorch parameters are stepped together: gradients, weights and moments as flat tensors
//! (views where they already lie side by side; the results are handed back as views of one
//! buffer, so after the first step only the gradients are copied), per-parameter clipping
//! from one segmented sum, and the update of the module doc as about twenty launches in all.
//! The arithmetic is the per-parameter step's: only the clipping norms are summed by another
//! kernel. Parameters elsewhere (burn-flex) take the per-parameter step.
//!
//! The states stay in the `ModuleOptimizer` (burn's `AdamWState`), so checkpoints are the same
//! in both modes and either resumes the other. A foreach step is two passes of it: the first
//! hands each parameter, gradient and state to the exchange below, the update runs on all of
//! them, and the second takes each result back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::store::RecordError;
use burn::tensor::{Bytes, DType, Device, Tensor};

use super::{FusedAdamW, adamw_step, next_step};

/// When the parameters are stepped all at once (`train.foreach`; PyTorch's `foreach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Foreach {
    /// On a CUDA device, where a launch per parameter and operation costs more than the
    /// arithmetic at small batches; off elsewhere.
    #[default]
    Auto,
    On,
    Off,
}

impl Foreach {
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }

    /// Whether a model on `device` steps all parameters at once.
    pub fn enabled(self, device: &Device) -> bool {
        match self {
            Self::On => true,
            Self::Off => false,
            Self::Auto => is_cuda(device),
        }
    }
}

impl std::str::FromStr for Foreach {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err("expected auto, on or off".into()),
        }
    }
}

/// Whether `device` is a CUDA device (burn-tch).
fn is_cuda(device: &Device) -> bool {
    #[cfg(feature = "tch")]
    {
        use burn::backend::DispatchDevice;
        use burn::backend::libtorch::LibTorchDevice;
        matches!(
            device.as_dispatch().clone().inner(),
            DispatchDevice::LibTorch(LibTorchDevice::Cuda(_))
        )
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = device;
        false
    }
}

/// A parameter's tensor without its rank (burn's dispatch primitive).
type Primitive = burn::backend::tensor::FloatTensor<burn::backend::Dispatch>;

/// AdamW for a whole module, as training uses it.
pub struct AdamW {
    optim: ModuleOptimizer,
    /// `Some` in foreach mode: what the two passes of a step share.
    exchange: Option<Arc<Mutex<Exchange>>>,
}

impl FusedAdamW {
    /// The module optimizer: per parameter, or with `foreach` all libtorch parameters at once.
    pub fn module(self, foreach: bool) -> AdamW {
        if !foreach {
            return AdamW {
                optim: self.init(),
                exchange: None,
            };
        }
        let exchange = Arc::new(Mutex::new(Exchange::default()));
        AdamW {
            optim: ModuleOptimizer::from(Exchanging {
                hyper: self,
                exchange: exchange.clone(),
            }),
            exchange: Some(exchange),
        }
    }
}

impl AdamW {
    /// Whether the parameters are stepped all at once.
    pub fn is_foreach(&self) -> bool {
        self.exchange.is_some()
    }

    /// One step of every parameter of `module` that has a gradient in `grads`.
    pub fn step<M: Module>(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        let Some(exchange) = self.exchange.clone() else {
            return self.optim.step(lr, module, grads);
        };
        // The second pass needs a gradient for each parameter the first one stepped; any
        // tensor of the parameter's shape and device does, its value is not read.
        let mut stepped = Stepped {
            grads: &grads,
            ids: Vec::new(),
        };
        module.visit(&mut stepped);
        let ids = stepped.ids;

        exchange.lock().expect("exchange").scatter = false;
        let module = self.optim.step(lr, module, grads);
        exchange.lock().expect("exchange").resolve();
        let mut placeholders = Placeholders {
            ids: &ids,
            grads: GradientsParams::new(),
        };
        module.visit(&mut placeholders);
        exchange.lock().expect("exchange").scatter = true;
        let module = self.optim.step(lr, module, placeholders.grads);
        let mut exchange = exchange.lock().expect("exchange");
        debug_assert!(exchange.slots.is_empty(), "every result was taken back");
        exchange.slots.clear();
        module
    }

    /// The state as burnpack bytes (burn's `ModuleOptimizer` record, the same in both modes).
    pub fn into_bytes(&self) -> Result<Bytes, RecordError> {
        self.optim.into_bytes()
    }

    /// Loads a state saved by [`AdamW::into_bytes`] (either mode) or by burn's `AdamW`.
    pub fn from_bytes(mut self, bytes: Bytes) -> Result<Self, RecordError> {
        self.optim = self.optim.from_bytes(bytes)?;
        Ok(self)
    }

    /// Loads the state from a burnpack file.
    pub fn load(mut self, path: &std::path::Path) -> Result<Self, RecordError> {
        self.optim = self.optim.load(path)?;
        Ok(self)
    }
}

/// The ids of the parameters that have a gradient, in visiting order.
struct Stepped<'a> {
    grads: &'a GradientsParams,
    ids: Vec<ParamId>,
}

impl ModuleVisitor for Stepped<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.grads.get::<D>(param.id).is_some() {
            self.ids.push(param.id);
        }
    }
}

/// Stand-in gradients for the second pass: each stepped parameter's own value.
struct Placeholders<'a> {
    ids: &'a [ParamId],
    grads: GradientsParams,
}

impl ModuleVisitor for Placeholders<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.ids.contains(&param.id) {
            self.grads.register(param.id, param.val().inner());
        }
    }
}

/// What a foreach step's two passes share: one slot per stepped parameter, in visiting order.
#[derive(Default)]
struct Exchange {
    /// Second pass: hand results back.
    scatter: bool,
    slots: VecDeque<Slot>,
}

/// Parameters stepped together share step number, the step's constants (learning rate and
/// bias corrections: [`FusedAdamW::constants`]), dtype and device.
#[derive(Clone, PartialEq)]
struct GroupKey {
    time: usize,
    constants: [f32; 8],
    dtype: DType,
    device: Device,
}

// `Taken` is the small variant, and only for the moment of the group step: boxing the others
// would allocate per parameter per step.
#[allow(clippy::large_enum_variant)]
enum Slot {
    /// A libtorch parameter, to be stepped with its group.
    Pending {
        key: GroupKey,
        p: Primitive,
        g: Primitive,
        m: Primitive,
        v: Primitive,
    },
    /// The new parameter and state.
    Done {
        time: usize,
        p: Primitive,
        m: Primitive,
        v: Primitive,
    },
    /// Out for its group's step.
    Taken,
}

impl Exchange {
    /// Steps each group of pending parameters at once.
    fn resolve(&mut self) {
        let mut groups: Vec<(GroupKey, Vec<usize>)> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Slot::Pending { key, .. } = slot {
                match groups.iter_mut().find(|(k, _)| k == key) {
                    Some((_, members)) => members.push(i),
                    None => groups.push((key.clone(), vec![i])),
                }
            }
        }
        for (key, members) in groups {
            let mut lists: [Vec<Primitive>; 4] = Default::default();
            for &i in &members {
                let Slot::Pending { p, g, m, v, .. } =
                    std::mem::replace(&mut self.slots[i], Slot::Taken)
                else {
                    unreachable!("grouped slots are pending")
                };
                for (list, t) in lists.iter_mut().zip([p, g, m, v]) {
                    list.push(t);
                }
            }
            let [p, g, m, v] = lists;
            let (p, m, v) = step_all(p, g, m, v, key.constants);
            for (((i, p), m), v) in members.into_iter().zip(p).zip(m).zip(v) {
                self.slots[i] = Slot::Done {
                    time: key.time,
                    p,
                    m,
                    v,
                };
            }
        }
    }
}

/// The optimizer the module optimizer runs in foreach mode: it trades tensors with the
/// [`Exchange`] instead of stepping them (burn-flex parameters are stepped on the way in).
#[derive(Clone)]
struct Exchanging {
    hyper: FusedAdamW,
    exchange: Arc<Mutex<Exchange>>,
}

impl Optimizer for Exchanging {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let mut exchange = self.exchange.lock().expect("exchange");
        if exchange.scatter {
            let Some(Slot::Done { time, p, m, v }) = exchange.slots.pop_front() else {
                unreachable!("the first pass left a result for every parameter it saw")
            };
            let state = AdaptiveMomentumState::new(
                time,
                Tensor::from_dispatch(m),
                Tensor::from_dispatch(v),
            );
            return (Tensor::from_dispatch(p), Some(AdamWState::new(state)));
        }
        let (time, m, v) = next_step(&tensor, state);
        let constants = self.hyper.constants(lr, time);
        if !foreach_kernel(&tensor) {
            let (p, m, v) = adamw_step(tensor, grad, m, v, constants);
            exchange.slots.push_back(Slot::Done {
                time,
                p: p.clone().into_dispatch(),
                m: m.into_dispatch(),
                v: v.into_dispatch(),
            });
            return (p, None);
        }
        let key = GroupKey {
            time,
            constants,
            dtype: tensor.dtype(),
            device: tensor.device(),
        };
        exchange.slots.push_back(Slot::Pending {
            key,
            p: tensor.clone().into_dispatch(),
            g: grad.into_dispatch(),
            m: m.into_dispatch(),
            v: v.into_dispatch(),
        });
        // the state comes back in the second pass
        (tensor, None)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <FusedAdamW as Optimizer>::to_device(state, device)
    }
}

/// Whether the all-at-once step runs on `x` (burn-tch in the `tch` build).
fn foreach_kernel<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    {
        crate::torch_ops::on_libtorch(x)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = x;
        false
    }
}

/// (p', m', v') of every parameter of a group (libtorch tensors).
fn step_all(
    p: Vec<Primitive>,
    g: Vec<Primitive>,
    m: Vec<Primitive>,
    v: Vec<Primitive>,
    constants: [f32; 8],
) -> (Vec<Primitive>, Vec<Primitive>, Vec<Primitive>) {
    #[cfg(feature = "tch")]
    {
        use tch_step::{from_tch, to_tch};
        let tch = |list: Vec<Primitive>| list.into_iter().map(to_tch).collect::<Vec<_>>();
        let back = |list: Vec<_>| list.into_iter().map(from_tch).collect();
        let (p, m, v) = tch_step::foreach_adamw_step(tch(p), tch(g), tch(m), tch(v), constants);
        (back(p), back(m), back(v))
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = (p, g, m, v, constants);
        unreachable!("only libtorch parameters are grouped")
    }
}

#[cfg(feature = "tch")]
mod tch_step {
    #![allow(deprecated)]

    use burn::backend::libtorch::TchTensor;

    use crate::torch_ops::flat::{flatten, split};
    pub(super) use crate::torch_ops::flat::{from_tch, to_tch};

    /// Every parameter's AdamW step at once: the per-parameter step's formula and constants
    /// (`FusedAdamW::constants`) on flat tensors.
    pub(super) fn foreach_adamw_step(
        p: Vec<TchTensor>,
        g: Vec<TchTensor>,
        m: Vec<TchTensor>,
        v: Vec<TchTensor>,
        c: [f32; 8],
    ) -> (Vec<TchTensor>, Vec<TchTensor>, Vec<TchTensor>) {
        let [b1, b2, eps, decay, lr, bc1, bc2, max_norm] = c.map(f64::from);
        let shapes: Vec<Vec<i64>> = p.iter().map(|t| t.tensor.size()).collect();
        let flat =
            |list: &[TchTensor]| flatten(&list.iter().map(|t| &t.tensor).collect::<Vec<_>>());
        let (p, g, m, v) = (flat(&p), flat(&g), flat(&m), flat(&v));
        let g = if max_norm > 0.0 {
            let lengths: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
            clip(&g, &lengths, max_norm)
        } else {
            g
        };
        // m' = m + (1 - b1) (g - m), v' = v + (1 - b2) (g^2 - v)
        let m = m.lerp(&g, 1.0 - b1);
        let v = v.lerp(&g.square(), 1.0 - b2);
        // p' = p (1 - lr wd) + (-lr / bc1) m' / (sqrt(v' / bc2) + eps)
        let mut denom = v.g_div_scalar(bc2);
        let _ = denom.sqrt_();
        let _ = denom.g_add_scalar_(eps);
        let step = m.g_mul_scalar(-lr / bc1);
        let mut p = if decay != 1.0 {
            p.g_mul_scalar(decay)
        } else {
            p.copy()
        };
        let _ = p.addcdiv_(&step, &denom);
        (split(&p, &shapes), split(&m, &shapes), split(&v, &shapes))
    }

    /// `g` with each parameter's segment (of `lengths`) scaled by its clipping coefficient
    /// min(1, max_norm / (|g_i| + tiny)): one segmented sum of squares for all the norms, the
    /// coefficients spread back over the elements. Should libtorch refuse those two kernels
    /// (on a device or version where they were never run), segment by segment instead, with a
    /// warning once.
    fn clip(g: &tch::Tensor, lengths: &[i64], max_norm: f64) -> tch::Tensor {
        match segmented_coefficients(g, lengths, max_norm) {
            Ok(coef) => g * coef,
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!(
                        "warning: train.foreach: libtorch refused the segmented clipping norms ({e}); clipping parameter by parameter"
                    )
                });
                clip_each(g, lengths, max_norm)
            }
        }
    }

    /// [`clip`] segment by segment: two libtorch calls per parameter.
    fn clip_each(g: &tch::Tensor, lengths: &[i64], max_norm: f64) -> tch::Tensor {
        let pieces: Vec<tch::Tensor> = g
            .split_with_sizes(lengths, 0)
            .iter()
            .map(|s| s * coefficients(s.norm(), max_norm))
            .collect();
        tch::Tensor::cat(&pieces, 0)
    }

    /// min(1, max_norm / (norm + tiny)), elementwise on the norms.
    fn coefficients(mut norms: tch::Tensor, max_norm: f64) -> tch::Tensor {
        let _ = norms.g_add_scalar_(f64::from(f32::MIN_POSITIVE));
        let _ = norms.reciprocal_();
        let _ = norms.g_mul_scalar_(max_norm);
        let _ = norms.clamp_max_(1.0);
        norms
    }

    /// Each element's clipping coefficient, from one segmented sum of squares.
    fn segmented_coefficients(
        g: &tch::Tensor,
        lengths: &[i64],
        max_norm: f64,
    ) -> Result<tch::Tensor, tch::TchError> {
        let lengths = device_lengths(lengths, g.device())?;
        let total: i64 = g.size()[0];
        let sums = tch::Tensor::f_segment_reduce(
            &g.square(),
            "sum",
            Some(&lengths),
            None::<&tch::Tensor>,
            None::<&tch::Tensor>,
            0,
            true,
            0.0,
        )?;
        let coef = coefficients(sums.f_sqrt()?, max_norm);
        // with the output size given, CUDA needs no read of `lengths` back to the host
        coef.f_repeat_interleave_self_tensor(&lengths, 0, total)
    }

    /// `lengths` as an int64 tensor on `device`, kept from step to step: a fresh upload would
    /// wait for the device to finish its queue on every step.
    fn device_lengths(lengths: &[i64], device: tch::Device) -> Result<tch::Tensor, tch::TchError> {
        static CACHE: std::sync::Mutex<Vec<(tch::Device, Vec<i64>, tch::Tensor)>> =
            std::sync::Mutex::new(Vec::new());
        let mut cache = CACHE.lock().expect("lengths cache");
        if let Some((_, _, t)) = cache
            .iter()
            .find(|(d, l, _)| *d == device && l.as_slice() == lengths)
        {
            return Ok(t.shallow_clone());
        }
        let t = tch::Tensor::f_from_slice(lengths)?.f_to_device(device)?;
        if cache.len() >= 8 {
            drop(cache.remove(0));
        }
        cache.push((device, lengths.to_vec(), t.shallow_clone()));
        Ok(t)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn tch(values: &[f32], shape: &[i64]) -> TchTensor {
            TchTensor::new(tch::Tensor::from_slice(values).reshape(shape))
        }

        fn values(t: &TchTensor) -> Vec<f32> {
            Vec::<f32>::try_from(t.tensor.reshape([-1])).unwrap()
        }

        /// The segment-by-segment fallback clips as the segmented kernels do.
        #[test]
        fn clipping_fallback_matches_the_segmented_kernels() {
            let g = tch::Tensor::from_slice(&[3.0f32, 4.0, 0.3, 0.4, 10.0, 0.0, 0.0]);
            let lengths = [2, 2, 3, 0];
            let (a, b) = (clip(&g, &lengths, 1.0), clip_each(&g, &lengths, 1.0));
            let (a, b) = (
                Vec::<f32>::try_from(a).unwrap(),
                Vec::<f32>::try_from(b).unwrap(),
            );
            let expected = [0.6f32, 0.8, 0.3, 0.4, 1.0, 0.0, 0.0];
            for ((x, y), e) in a.iter().zip(&b).zip(expected) {
                assert!((x - e).abs() < 1e-6 && (y - e).abs() < 1e-6, "{a:?} {b:?}");
            }
        }

        /// First step in closed form with per-parameter clipping: m' = (1 - b1) c_i g with
        /// c_i = min(1, max_norm / |g_i|) for each parameter i; and the results are views of
        /// one buffer, which the next step flattens without a copy.
        #[test]
        fn clips_each_parameter_by_its_own_norm() {
            // |g_0| = 5 (clipped at 1 to a fifth), |g_1| = 0.5 (not clipped)
            let g = [3.0f32, 4.0, 0.3, 0.4];
            let p = vec![tch(&[1.0, 2.0], &[2, 1]), tch(&[3.0, 4.0], &[2])];
            let grads = vec![tch(&g[..2], &[2, 1]), tch(&g[2..], &[2])];
            let zeros = || vec![tch(&[0.0; 2], &[2, 1]), tch(&[0.0; 2], &[2])];
            let c = crate::adamw::FusedAdamW::new(0.0, 1.0).constants(0.1, 1);
            let (p1, m1, v1) = foreach_adamw_step(p, grads, zeros(), zeros(), c);
            let m: Vec<f32> = m1.iter().flat_map(values).collect();
            let expected = [0.06f32, 0.08, 0.03, 0.04];
            for (a, b) in m.iter().zip(expected) {
                assert!((a - b).abs() < 1e-7, "{m:?}");
            }
            assert_eq!(p1[0].tensor.size(), [2, 1]);
            let refs: Vec<&tch::Tensor> = p1.iter().map(|t| &t.tensor).collect();
            assert_eq!(flatten(&refs).data_ptr(), p1[0].tensor.data_ptr());
            let grads = vec![tch(&g[..2], &[2, 1]), tch(&g[2..], &[2])];
            let (p2, _, _) = foreach_adamw_step(p1, grads, m1, v1, c);
            assert!(values(&p2[1]).iter().all(|x| x.is_finite()));
        }
    }
}
