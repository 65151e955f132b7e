//! Times AdamW (with per-parameter clipping) and the EMA update over a module with as many
//! parameter tensors as the DiT (52), per parameter and all at once (`foreach`): with small
//! tensors the time is the per-call cost (dispatch on a CPU, and launches on CUDA), which is
//! what `train.foreach` removes; with large ones it is the arithmetic and memory traffic.
//! The measurement behind docs/PERFORMANCE.md's "The optimizer's launches".
//!
//! ```sh
//! cargo run --release -p ldm-common --features tch --example optimizer_overhead -- \
//!     [cpu|libtorch|cuda] [elements per tensor] [iters]
//! ```
//!
//! Prints, per mode, the median time of one optimizer step and of one EMA update, each
//! followed by a device sync.

use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use ldm_common::adamw::FusedAdamW;
use ldm_common::device::{DeviceChoice, select};
use ldm_common::lerp::{lerp_all, lerp_all_in_place};

/// 26 linear layers: 52 parameter tensors, as the DiT-M/2 of the recipe has.
#[derive(Module, Debug)]
struct Stack {
    layers: Vec<Linear>,
}

/// Every parameter's id and a random gradient of its shape.
struct RandomGrads(Vec<(ParamId, Tensor<2>)>, Vec<(ParamId, Tensor<1>)>);

impl ModuleVisitor for RandomGrads {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().inner();
        let dims = t.dims();
        let device = t.device();
        match D {
            2 => self.0.push((
                param.id,
                Tensor::random([dims[0], dims[1]], Distribution::Normal(0.0, 1.0), &device),
            )),
            _ => self.1.push((
                param.id,
                Tensor::random([dims[0]], Distribution::Normal(0.0, 1.0), &device),
            )),
        }
    }
}

/// The EMA's per-parameter update (pipeline's `ema::update` without `foreach`).
struct Blend<'a>(&'a Stack, f64);

impl ModuleMapper for Blend<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let mut find = Find(param.id, None);
        self.0.visit(&mut find);
        let theta = find.1.expect("same ids");
        let w = self.1;
        param.map(|ema| {
            let theta = Tensor::<D>::from_dispatch(theta);
            ldm_common::lerp::lerp(ema, theta, w)
        })
    }
}

struct Find(
    ParamId,
    Option<burn::backend::tensor::FloatTensor<burn::backend::Dispatch>>,
);

impl ModuleVisitor for Find {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.id == self.0 {
            self.1 = Some(param.val().inner().into_dispatch());
        }
    }
}

/// The EMA's all-at-once update (pipeline's `ema::update` with `foreach`); `None` off
/// libtorch, where it blends per parameter.
fn blend_all(
    ema: &Stack,
    model: &Stack,
    w: f64,
) -> Option<Vec<burn::backend::tensor::FloatTensor<burn::backend::Dispatch>>> {
    let mut a = Collect(Vec::new());
    ema.visit(&mut a);
    let mut b = Collect(Vec::new());
    model.visit(&mut b);
    lerp_all(a.0, b.0, w)
}

/// The EMA's update in place (pipeline's `ema::update` with `foreach`, after its first
/// update): `false` where it does not apply.
fn blend_in_place(ema: &Stack, model: &Stack, w: f64) -> bool {
    let mut a = Collect(Vec::new());
    ema.visit(&mut a);
    let mut b = Collect(Vec::new());
    model.visit(&mut b);
    // handles on each EMA parameter: the module's and the list's
    lerp_all_in_place(&a.0, &b.0, w, 2)
}

struct Collect(Vec<burn::backend::tensor::FloatTensor<burn::backend::Dispatch>>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().inner().into_dispatch());
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let choice: DeviceChoice = args
        .get(1)
        .map_or("libtorch", |s| s.as_str())
        .parse()
        .unwrap();
    let elements: usize = args.get(2).map_or(64, |s| s.parse().unwrap());
    let iters: usize = args.get(3).map_or(200, |s| s.parse().unwrap());
    let selected = select(choice).unwrap();
    let device: Device = selected.device.clone().autodiff();
    let side = (elements as f64).sqrt().round().max(1.0) as usize;
    device.seed(0);
    let model = Stack {
        layers: (0..26)
            .map(|_| LinearConfig::new(side, side).init(&device))
            .collect(),
    };
    println!(
        "{}: 52 tensors ({side}x{side} weights and {side} biases), median of {iters} steps",
        selected.description
    );
    let mut template = RandomGrads(Vec::new(), Vec::new());
    model.visit(&mut template);
    let sync = |d: &Device| d.sync().expect("device sync");
    for foreach in [false, true] {
        let mut optim = FusedAdamW::new(0.0, 1.0).module(foreach);
        let mut model = model.clone();
        let mut step_times = Vec::new();
        for _ in 0..iters + 5 {
            let mut grads = GradientsParams::new();
            for (id, g) in &template.0 {
                grads.register(*id, g.clone());
            }
            for (id, g) in &template.1 {
                grads.register(*id, g.clone());
            }
            sync(&device);
            let t = Instant::now();
            model = optim.step(1e-3, model, grads);
            sync(&device);
            step_times.push(t.elapsed().as_secs_f64());
        }
        let mut ema = model.valid();
        let plain = model.valid();
        let mut ema_times = Vec::new();
        for _ in 0..iters + 5 {
            sync(&device);
            let t = Instant::now();
            if !(foreach && blend_in_place(&ema, &plain, 0.01)) {
                let blended = if foreach {
                    blend_all(&ema, &plain, 0.01)
                } else {
                    None
                };
                match blended {
                    Some(blended) => ema = ema.map(&mut Put(&mut blended.into_iter())),
                    None => ema = ema.map(&mut Blend(&plain, 0.01)),
                }
            }
            sync(&device);
            ema_times.push(t.elapsed().as_secs_f64());
        }
        println!(
            "{:<16} AdamW step {:>9.1} us   EMA update {:>9.1} us",
            if foreach { "foreach" } else { "per parameter" },
            1e6 * median(step_times[5..].to_vec()),
            1e6 * median(ema_times[5..].to_vec()),
        );
    }
}

/// Puts blended tensors in visiting order.
struct Put<'a>(
    &'a mut dyn Iterator<Item = burn::backend::tensor::FloatTensor<burn::backend::Dispatch>>,
);

impl ModuleMapper for Put<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let t = self.0.next().expect("one per parameter");
        param.map(|_| Tensor::from_dispatch(t))
    }
}
