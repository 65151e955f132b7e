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
//! A first foreach step is two passes of burn's `ModuleOptimizer`, which holds the states (burn's
//! `AdamWState`): the first hands each parameter, gradient and state to the exchange below, the
//! update runs on all of them (a group per step number), and the second takes each result back.
//! Once a step has covered every parameter it stepped in one group, the optimizer keeps their
//! moments itself as two flat tensors ([`tch_step::Flat`]), as PyTorch's optimizer keeps its
//! state: a step is then one visit of the module, the update (the moments in place) and one
//! map that puts the parameters back, a third of the host time of the two passes (52 small
//! tensors on libtorch's CPU: 285 against 700 us). The record takes the state back before a
//! checkpoint ([`AdamW::into_bytes`]) and when a step's gradients cover other parameters, so
//! checkpoints are the same in both modes and either resumes the other.

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
    #[cfg(feature = "tch")]
    hyper: FusedAdamW,
    /// Foreach mode on libtorch, once a step has covered every parameter: the moments as the
    /// optimizer's own flat tensors; then `optim`'s record is out of date until
    /// [`AdamW::install`].
    #[cfg(feature = "tch")]
    flat: Option<tch_step::Flat>,
}

impl FusedAdamW {
    /// The module optimizer: per parameter, or with `foreach` all libtorch parameters at once.
    pub fn module(self, foreach: bool) -> AdamW {
        let (optim, exchange) = if foreach {
            let exchange = Arc::new(Mutex::new(Exchange::default()));
            let optim = ModuleOptimizer::from(Exchanging {
                hyper: self,
                exchange: exchange.clone(),
            });
            (optim, Some(exchange))
        } else {
            (self.init(), None)
        };
        AdamW {
            optim,
            exchange,
            #[cfg(feature = "tch")]
            hyper: self,
            #[cfg(feature = "tch")]
            flat: None,
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
        #[cfg(feature = "tch")]
        let module = match self.flat.as_mut() {
            Some(flat) => match flat.step(&self.hyper, lr, module, &grads) {
                Ok(module) => return module,
                // gradients for another set of parameters: the record takes the state back
                Err(module) => self.install(module),
            },
            None => module,
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
        let module = self.scatter(lr, module, &ids);
        #[cfg(feature = "tch")]
        if let Some((time, moments)) = exchange.lock().expect("exchange").covered.take() {
            self.flat = Some(tch_step::Flat::new(ids, time, moments));
        }
        module
    }

    /// The second pass of a foreach step: each parameter of `ids` takes its result from the
    /// exchange.
    fn scatter<M: Module>(&mut self, lr: LearningRate, module: M, ids: &[ParamId]) -> M {
        let exchange = self.exchange.clone().expect("foreach mode");
        let mut placeholders = Placeholders {
            ids,
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

    /// Hands the flat state back to the module optimizer's record (each parameter's moments
    /// and step; the parameters keep their values) and drops it.
    #[cfg(feature = "tch")]
    fn install<M: Module>(&mut self, module: M) -> M {
        let Some(flat) = self.flat.take() else {
            return module;
        };
        let module = self.put_state(module, &flat);
        drop(flat);
        module
    }

    /// Writes the flat state into the module optimizer's record with one scatter pass over
    /// `module` (each parameter keeps its value: [`Slot::Done`] without one).
    #[cfg(feature = "tch")]
    fn put_state<M: Module>(&mut self, module: M, flat: &tch_step::Flat) -> M {
        let (ids, time, m, v) = flat.states();
        {
            let mut exchange = self
                .exchange
                .as_ref()
                .expect("foreach mode")
                .lock()
                .expect("exchange");
            exchange.slots.clear();
            for (m, v) in m.into_iter().zip(v) {
                exchange.slots.push_back(Slot::Done {
                    time,
                    p: None,
                    m: tch_step::from_tch(m),
                    v: tch_step::from_tch(v),
                });
            }
        }
        // (the learning rate is not read: every result is already there)
        self.scatter(0.0, module, ids)
    }

    /// The state as burnpack bytes (burn's `ModuleOptimizer` record, the same in both modes),
    /// for the parameters of `module` (the model being trained: in foreach mode the record is
    /// brought up to date from the flat moments first).
    pub fn into_bytes<M: Module>(&mut self, module: &M) -> Result<Bytes, RecordError> {
        #[cfg(feature = "tch")]
        if let Some(flat) = self.flat.take() {
            drop(self.put_state(module.clone(), &flat));
            self.flat = Some(flat);
        }
        #[cfg(not(feature = "tch"))]
        let _ = module;
        self.optim.into_bytes()
    }

    /// Loads a state saved by [`AdamW::into_bytes`] (either mode) or by burn's `AdamW`.
    pub fn from_bytes(mut self, bytes: Bytes) -> Result<Self, RecordError> {
        self.optim = self.optim.from_bytes(bytes)?;
        self.forget_flat();
        Ok(self)
    }

    /// Loads the state from a burnpack file.
    pub fn load(mut self, path: &std::path::Path) -> Result<Self, RecordError> {
        self.optim = self.optim.load(path)?;
        self.forget_flat();
        Ok(self)
    }

    /// After a load: the record is the state.
    fn forget_flat(&mut self) {
        #[cfg(feature = "tch")]
        {
            self.flat = None;
        }
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
    /// A step that covered every slot in one group: its step number and flat moments, which
    /// the optimizer then keeps ([`tch_step::Flat`]).
    #[cfg(feature = "tch")]
    covered: Option<(usize, tch_step::Moments)>,
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
    /// The new parameter (`None`: it keeps its value, as when the flat moments are handed back
    /// to the record) and state.
    Done {
        time: usize,
        p: Option<Primitive>,
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
        #[cfg(feature = "tch")]
        let covering = groups.len() == 1 && groups[0].1.len() == self.slots.len();
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
            let (p, m, v, _moments) = step_all(p, g, m, v, key.constants);
            #[cfg(feature = "tch")]
            if covering {
                self.covered = Some((key.time, _moments));
            }
            for (((i, p), m), v) in members.into_iter().zip(p).zip(m).zip(v) {
                self.slots[i] = Slot::Done {
                    time: key.time,
                    p: Some(p),
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
            let p = p.map_or(tensor, Tensor::from_dispatch);
            return (p, Some(AdamWState::new(state)));
        }
        let (time, m, v) = next_step(&tensor, state);
        let constants = self.hyper.constants(lr, time);
        if !foreach_kernel(&tensor) {
            let (p, m, v) = adamw_step(tensor, grad, m, v, constants);
            exchange.slots.push_back(Slot::Done {
                time,
                p: Some(p.clone().into_dispatch()),
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

/// The flat moments of a group's step (libtorch; nothing without it).
#[cfg(feature = "tch")]
type GroupMoments = tch_step::Moments;
#[cfg(not(feature = "tch"))]
type GroupMoments = ();

/// (p', m', v') of every parameter of a group (libtorch tensors), and the flat moments.
fn step_all(
    p: Vec<Primitive>,
    g: Vec<Primitive>,
    m: Vec<Primitive>,
    v: Vec<Primitive>,
    constants: [f32; 8],
) -> (Vec<Primitive>, Vec<Primitive>, Vec<Primitive>, GroupMoments) {
    #[cfg(feature = "tch")]
    {
        use tch_step::{from_tch, to_tch};
        let tch = |list: Vec<Primitive>| list.into_iter().map(to_tch).collect::<Vec<_>>();
        let back = |list: Vec<_>| list.into_iter().map(from_tch).collect();
        let (p, m, v, moments) =
            tch_step::foreach_adamw_step(tch(p), tch(g), tch(m), tch(v), constants);
        (back(p), back(m), back(v), moments)
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
    use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
    use burn::optim::{GradientsParams, LearningRate};
    use burn::tensor::Tensor;

    use super::{FusedAdamW, Primitive};
    use crate::torch_ops::flat::{as_tch, as_tch_tensor, exclusive_flat, flatten, split};
    pub(super) use crate::torch_ops::flat::{from_tch, to_tch};

    /// Every parameter's AdamW step at once: the per-parameter step's formula and constants
    /// (`FusedAdamW::constants`) on flat tensors. Also the flat moments, which become the
    /// optimizer's own ([`Flat`]) when the step covered every parameter.
    pub(super) fn foreach_adamw_step(
        p: Vec<TchTensor>,
        g: Vec<TchTensor>,
        m: Vec<TchTensor>,
        v: Vec<TchTensor>,
        c: [f32; 8],
    ) -> (Vec<TchTensor>, Vec<TchTensor>, Vec<TchTensor>, Moments) {
        let [b1, b2, .., max_norm] = c.map(f64::from);
        let shapes: Vec<Vec<i64>> = p.iter().map(|t| t.tensor.size()).collect();
        let lengths: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
        let flat =
            |list: &[TchTensor]| flatten(&list.iter().map(|t| &t.tensor).collect::<Vec<_>>());
        let (p, g, m, v) = (flat(&p), flat(&g), flat(&m), flat(&v));
        let g = clipped(g, &lengths, max_norm);
        // m' = m + (1 - b1) (g - m), v' = v + (1 - b2) (g^2 - v)
        let m = m.lerp(&g, 1.0 - b1);
        let v = v.lerp(&g.square(), 1.0 - b2);
        let p = updated(&p, &m, &v, c);
        let pieces = (split(&p, &shapes), split(&m, &shapes), split(&v, &shapes));
        let moments = Moments {
            shapes,
            lengths,
            m,
            v,
        };
        (pieces.0, pieces.1, pieces.2, moments)
    }

    /// `g` clipped per parameter (segments of `lengths`) at `max_norm`, unless it is 0.
    fn clipped(g: tch::Tensor, lengths: &[i64], max_norm: f64) -> tch::Tensor {
        if max_norm > 0.0 {
            clip(&g, lengths, max_norm)
        } else {
            g
        }
    }

    /// p' = p (1 - lr wd) + (-lr / bc1) m' / (sqrt(v' / bc2) + eps), from the updated moments.
    fn updated(p: &tch::Tensor, m: &tch::Tensor, v: &tch::Tensor, c: [f32; 8]) -> tch::Tensor {
        let (decay, step, denom) = update_terms(m, v, c);
        let mut p = if decay != 1.0 {
            p.g_mul_scalar(decay)
        } else {
            p.copy()
        };
        let _ = p.addcdiv_(&step, &denom);
        p
    }

    /// [`updated`] written into `p`: the same kernels, so the same values.
    fn update_in_place(p: &mut tch::Tensor, m: &tch::Tensor, v: &tch::Tensor, c: [f32; 8]) {
        let (decay, step, denom) = update_terms(m, v, c);
        if decay != 1.0 {
            let _ = p.g_mul_scalar_(decay);
        }
        let _ = p.addcdiv_(&step, &denom);
    }

    /// (1 - lr wd, -lr / bc1 m', sqrt(v' / bc2) + eps).
    fn update_terms(
        m: &tch::Tensor,
        v: &tch::Tensor,
        c: [f32; 8],
    ) -> (f64, tch::Tensor, tch::Tensor) {
        let [_, _, eps, decay, lr, bc1, bc2, _] = c.map(f64::from);
        let mut denom = v.g_div_scalar(bc2);
        let _ = denom.sqrt_();
        let _ = denom.g_add_scalar_(eps);
        (decay, m.g_mul_scalar(-lr / bc1), denom)
    }

    /// The flat moments of a step over a list of parameters, with the list's layout.
    pub(super) struct Moments {
        shapes: Vec<Vec<i64>>,
        lengths: Vec<i64>,
        m: tch::Tensor,
        v: tch::Tensor,
    }

    /// The moments of every parameter as two flat tensors that only the optimizer holds, so
    /// that a step updates them in place and hands burn nothing but the new parameters (as
    /// PyTorch's `_foreach_*` AdamW keeps its state): one visit of the module for parameters
    /// and gradients, the update, one map to put the parameters back (or, once they are the
    /// views of one buffer only the module holds, the update written into them). burn's
    /// `ModuleOptimizer` (the record checkpoints hold, two passes a step) takes the state back
    /// ([`super::AdamW::install`]) before a checkpoint and whenever a step's gradients cover
    /// other parameters.
    pub(super) struct Flat {
        /// The parameters, in the module's visiting order; all at step `time`.
        ids: Vec<ParamId>,
        time: usize,
        moments: Moments,
    }

    impl Flat {
        pub(super) fn new(ids: Vec<ParamId>, time: usize, moments: Moments) -> Self {
            Self { ids, time, moments }
        }

        /// The state as each parameter's `(time, m, v)`, in `ids`' order (views of the flat
        /// moments).
        pub(super) fn states(&self) -> (&[ParamId], usize, Vec<TchTensor>, Vec<TchTensor>) {
            let Moments { shapes, m, v, .. } = &self.moments;
            (&self.ids, self.time, split(m, shapes), split(v, shapes))
        }

        /// One step of `module`, or the module back untouched if `grads` has gradients for
        /// other parameters than [`Flat::ids`] (or of another dtype or device).
        pub(super) fn step<M: Module>(
            &mut self,
            hyper: &FusedAdamW,
            lr: LearningRate,
            module: M,
            grads: &GradientsParams,
        ) -> Result<M, M> {
            let mut gather = Gather {
                grads,
                ids: &self.ids,
                p: Vec::with_capacity(self.ids.len()),
                g: Vec::with_capacity(self.ids.len()),
                matches: true,
            };
            module.visit(&mut gather);
            let Gather { p, g, matches, .. } = gather;
            if !matches || p.len() != self.ids.len() {
                return Err(module);
            }
            let (gather_p, gather_g) = (p, g);
            let (kind, device) = (self.moments.m.kind(), self.moments.m.device());
            let (Some(p), Some(g)) = (on(&gather_p, kind, device), on(&gather_g, kind, device))
            else {
                return Err(module);
            };
            let time = self.time + 1;
            let c = hyper.constants(lr, time);
            let [b1, b2, .., max_norm] = c.map(f64::from);
            let Moments {
                shapes,
                lengths,
                m,
                v,
            } = &mut self.moments;
            // The parameters in place (PyTorch's `_foreach_` AdamW) when they are the views of
            // one buffer that a previous step's `PutBack` left, held by nothing but the module
            // and this gather (two handles each) and apart from the gradients: the module is
            // then handed back as it is, without the per-parameter map.
            let exclusive = {
                fn tensors(list: &[Primitive]) -> Option<Vec<&TchTensor>> {
                    list.iter().map(as_tch_tensor).collect()
                }
                match (tensors(&gather_p), tensors(&gather_g)) {
                    (Some(p), Some(g)) => exclusive_flat(&p, 2, &g),
                    _ => None,
                }
            };
            let g = clipped(flatten(&g), lengths, max_norm);
            // as in `foreach_adamw_step`, in place
            let _ = m.lerp_(&g, 1.0 - b1);
            let _ = v.lerp_(&g.square(), 1.0 - b2);
            self.time = time;
            if let Some(mut flat) = exclusive {
                update_in_place(&mut flat, m, v, c);
                return Ok(module);
            }
            let p = updated(&flatten(&p), m, v, c);
            let mut put = PutBack {
                ids: &self.ids,
                next: 0,
                values: split(&p, shapes).into_iter(),
            };
            Ok(module.map(&mut put))
        }
    }

    /// The libtorch tensors of `list`, if each is one of `kind` on `device`.
    fn on(list: &[Primitive], kind: tch::Kind, device: tch::Device) -> Option<Vec<&tch::Tensor>> {
        list.iter()
            .map(|t| as_tch(t).filter(|t| t.kind() == kind && t.device() == device))
            .collect()
    }

    /// Each parameter of `ids` (in order) with its gradient; `matches` false if a gradient
    /// belongs to a parameter out of that order or outside it.
    struct Gather<'a> {
        grads: &'a GradientsParams,
        ids: &'a [ParamId],
        p: Vec<Primitive>,
        g: Vec<Primitive>,
        matches: bool,
    }

    impl ModuleVisitor for Gather<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(g) = self.grads.get::<D>(param.id) else {
                return;
            };
            if self.ids.get(self.p.len()) != Some(&param.id) {
                self.matches = false;
                return;
            }
            self.p.push(param.val().inner().into_dispatch());
            self.g.push(g.into_dispatch());
        }
    }

    /// Replaces the parameters of `ids` (in order) with `values`, keeping what burn's
    /// `ModuleOptimizer` keeps of each (autodiff, gradient requirement, checkpointing,
    /// distribution).
    struct PutBack<'a> {
        ids: &'a [ParamId],
        next: usize,
        values: std::vec::IntoIter<TchTensor>,
    }

    impl ModuleMapper for PutBack<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if self.ids.get(self.next) != Some(&param.id) {
                return param;
            }
            self.next += 1;
            let value = self
                .values
                .next()
                .expect("a value for every stepped parameter");
            let (id, old, mapper) = param.consume();
            let mut new = Tensor::from_inner(Tensor::<D>::from_dispatch(from_tch(value)));
            if let Some(strategy) = old.gradient_checkpointing_strategy() {
                new = new.with_gradient_checkpointing_strategy(strategy);
            }
            if old.is_require_grad() {
                new = new.require_grad();
            }
            if old.is_distributed() {
                new = new.set_distributed(id);
            }
            Param::from_mapped_value(id, new, mapper)
        }
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

        /// From the third step on, with nothing but the module holding its parameters, the
        /// step writes them in place (their buffer stays); with another handle held (a clone of
        /// the weight's tensor) it does not, and either way the values are the same.
        #[test]
        fn steps_in_place_when_only_the_module_holds_its_parameters() {
            use burn::nn::{Linear, LinearConfig};
            use burn::tensor::Device;
            let device = Device::libtorch().autodiff();
            let x = burn::tensor::Tensor::<2>::ones([4, 3], &device);
            let grads = |net: &Linear| {
                GradientsParams::from_grads(net.forward(x.clone()).sum().backward(), net)
            };
            let weight = |net: &Linear| to_tch(net.weight.val().inner().into_dispatch());
            let train = |hold_a_handle: bool| {
                device.seed(0);
                let mut net: Linear = LinearConfig::new(3, 2).init(&device);
                let mut optim = crate::adamw::FusedAdamW::new(0.1, 1.0).module(true);
                let mut buffers = Vec::new();
                for _ in 0..4 {
                    let held = hold_a_handle.then(|| weight(&net));
                    let g = grads(&net);
                    net = optim.step(1e-2, net, g);
                    drop(held);
                    buffers.push(weight(&net).tensor.data_ptr() as usize);
                }
                let values = |t: TchTensor| Vec::<f32>::try_from(t.tensor.reshape([-1])).unwrap();
                (buffers, values(weight(&net)))
            };
            let (in_place, a) = train(false);
            let (copied, b) = train(true);
            // steps 1 and 2 make new buffers (the first step's parameters are no views yet)
            assert!(
                in_place[1..].windows(2).all(|w| w[0] == w[1]),
                "{in_place:?}"
            );
            assert!(copied.windows(2).all(|w| w[0] != w[1]), "{copied:?}");
            assert_eq!(a, b);
        }

        /// After a step that covers every parameter, the optimizer keeps the moments: later
        /// steps update the same two buffers in place and hand burn only the parameters, views
        /// of one buffer; a checkpoint in between leaves them be; a step whose gradients cover
        /// other parameters hands the state back to the record (and keeps those of its own).
        #[test]
        fn keeps_the_moments_after_a_covering_step() {
            use burn::nn::{Linear, LinearConfig};
            use burn::tensor::Device;
            let device = Device::libtorch().autodiff();
            device.seed(0);
            let net = LinearConfig::new(3, 2).init(&device);
            let x = burn::tensor::Tensor::<2>::ones([4, 3], &device);
            let grads = |net: &Linear| {
                GradientsParams::from_grads(net.forward(x.clone()).sum().backward(), net)
            };
            let mut optim = crate::adamw::FusedAdamW::new(0.0, 1.0).module(true);
            let net = optim.step(1e-2, net.clone(), grads(&net));
            let flat = optim
                .flat
                .as_ref()
                .expect("the first step covered every parameter");
            let (m, v) = (flat.moments.m.data_ptr(), flat.moments.v.data_ptr());
            let net = optim.step(1e-2, net.clone(), grads(&net));
            optim.into_bytes(&net).unwrap();
            let net = optim.step(1e-2, net.clone(), grads(&net));
            let flat = optim.flat.as_ref().unwrap();
            assert_eq!(flat.time, 3);
            assert_eq!(
                (flat.moments.m.data_ptr(), flat.moments.v.data_ptr()),
                (m, v)
            );
            let tensor = |p: burn::tensor::Tensor<2>| to_tch(p.inner().into_dispatch());
            let weight = tensor(net.weight.val());
            let bias = tensor(net.bias.as_ref().unwrap().val().unsqueeze());
            assert_eq!(
                bias.tensor.data_ptr() as usize,
                weight.tensor.data_ptr() as usize + 6 * 4
            );
            // the weight alone: the record takes the state back, and the step (the weight's
            // fourth) covers every parameter it steps, so the optimizer keeps the weight's
            let weight_id = net.weight.id;
            let only_weight = {
                let mut g = GradientsParams::new();
                g.register(weight_id, net.weight.val().inner().ones_like());
                g
            };
            let _ = optim.step(1e-2, net, only_weight);
            let flat = optim.flat.as_ref().unwrap();
            assert_eq!(
                (flat.ids.as_slice(), flat.time),
                ([weight_id].as_slice(), 4)
            );
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
            let (p1, m1, v1, _) = foreach_adamw_step(p, grads, zeros(), zeros(), c);
            let m: Vec<f32> = m1.iter().flat_map(values).collect();
            let expected = [0.06f32, 0.08, 0.03, 0.04];
            for (a, b) in m.iter().zip(expected) {
                assert!((a - b).abs() < 1e-7, "{m:?}");
            }
            assert_eq!(p1[0].tensor.size(), [2, 1]);
            let refs: Vec<&tch::Tensor> = p1.iter().map(|t| &t.tensor).collect();
            assert_eq!(flatten(&refs).data_ptr(), p1[0].tensor.data_ptr());
            let grads = vec![tch(&g[..2], &[2, 1]), tch(&g[2..], &[2])];
            let (p2, _, _, _) = foreach_adamw_step(p1, grads, m1, v1, c);
            assert!(values(&p2[1]).iter().all(|x| x.is_finite()));
        }
    }
}
