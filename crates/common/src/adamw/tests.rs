use super::*;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::TensorData;

use crate::rng::{randn, stream};
use crate::tensor::to_vec_f32;

#[derive(Module, Debug)]
struct Net {
    conv: Conv2d,
    linear: Linear,
}

/// A fresh network with its weights drawn (burn initialises parameters lazily, and clones of
/// an uninitialised one draw their own). Tests running in parallel share the device's
/// generator, so each test makes one and clones it for every run it compares.
fn net(device: &Device) -> Net {
    let net = Net {
        conv: Conv2dConfig::new([2, 3], [3, 3]).init(device),
        linear: LinearConfig::new(12, 5).init(device),
    };
    params(&net);
    net
}

fn loss(net: &Net, step: usize, device: &Device) -> Tensor<1> {
    let x = randn(
        &mut stream(7, "adamw-test", step as u64),
        [4, 2, 4, 4],
        device,
    );
    let h = net.conv.forward(x).flatten::<2>(1, 3);
    // large activations so that clipping at 0.5 binds for some parameters and not others
    (net.linear.forward(h) * 3.0).square().mean().reshape([1])
}

/// `steps` optimizer steps of `optim` on a fresh [`Net`], starting from `start` (a model and
/// the optimizer that trained it, to continue).
fn train(
    mut net: Net,
    optim: &mut impl StepModule,
    steps: std::ops::Range<usize>,
    device: &Device,
) -> Net {
    for step in steps {
        let grads = GradientsParams::from_grads(loss(&net, step, device).backward(), &net);
        net = optim.step_module(1e-2, net, grads);
    }
    net
}

/// burn's module optimizer and [`AdamW`], to the tests.
trait StepModule {
    fn step_module(&mut self, lr: f64, net: Net, grads: GradientsParams) -> Net;
}

impl StepModule for ModuleOptimizer {
    fn step_module(&mut self, lr: f64, net: Net, grads: GradientsParams) -> Net {
        self.step(lr, net, grads)
    }
}

impl StepModule for AdamW {
    fn step_module(&mut self, lr: f64, net: Net, grads: GradientsParams) -> Net {
        self.step(lr, net, grads)
    }
}

fn burn_adamw() -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(0.05)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(0.5)))
        .init()
}

fn params(net: &Net) -> Vec<f32> {
    let mut out = Vec::new();
    for t in [
        net.conv.weight.val().flatten::<1>(0, 3),
        net.conv.bias.as_ref().unwrap().val(),
        net.linear.weight.val().flatten::<1>(0, 1),
        net.linear.bias.as_ref().unwrap().val(),
    ] {
        out.extend(to_vec_f32(t));
    }
    out
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1e-3))
        .fold(0.0, f32::max)
}

/// The first step in closed form: m^ = g, v^ = g^2, so p' = p (1 - lr wd) - lr g / (|g| + eps);
/// with clipping the gradient is first scaled by max_norm / |g|.
#[test]
fn first_step_matches_the_closed_form() {
    let device = Device::flex();
    let p = Tensor::<1>::from_data(TensorData::from([1.0f32, -2.0, 0.5]), &device);
    let g = Tensor::<1>::from_data(TensorData::from([0.5f32, -0.25, 0.0]), &device);
    let (lr, wd, eps) = (0.1f64, 0.01f64, 1e-5f64);
    let opt = FusedAdamW::new(wd as f32, 0.0);
    let expected = |p: f64, g: f64| p * (1.0 - lr * wd) - lr * g / (g.abs() + eps);
    let (out, m, v) = adamw_step(
        p.clone(),
        g.clone(),
        p.zeros_like(),
        p.zeros_like(),
        opt.constants(lr, 1),
    );
    let out = to_vec_f32(out);
    for (i, (pi, gi)) in [(1.0, 0.5), (-2.0, -0.25), (0.5, 0.0)]
        .into_iter()
        .enumerate()
    {
        assert!(
            (f64::from(out[i]) - expected(pi, gi)).abs() < 1e-6,
            "{i}: {}",
            out[i]
        );
    }
    let m = to_vec_f32(m);
    let v = to_vec_f32(v);
    assert!((m[0] - 0.05).abs() < 1e-7 && (v[1] - 0.001 * 0.0625).abs() < 1e-9);

    // clipped: |g| = sqrt(0.3125); at max_norm 0.1, g becomes g * 0.1 / |g|
    let clipped = FusedAdamW::new(wd as f32, 0.1);
    let (_, m, _) = adamw_step(
        p.clone(),
        g,
        p.zeros_like(),
        p.zeros_like(),
        clipped.constants(lr, 1),
    );
    let m = to_vec_f32(m);
    let scale = 0.1 / 0.3125f64.sqrt();
    assert!(
        (f64::from(m[0]) - 0.1 * 0.5 * scale).abs() < 1e-7,
        "{}",
        m[0]
    );
}

/// Ten steps with weight decay and per-parameter norm clipping (binding for some parameters)
/// follow burn's `AdamW` + `GradientClipping::Norm` to float rounding, on `device`.
fn matches_burns_adamw(device: Device) {
    let start = net(&device);
    let reference = train(start.clone(), &mut burn_adamw(), 0..10, &device);
    let mut fused = FusedAdamW::new(0.05, 0.5).init();
    let fused = train(start.clone(), &mut fused, 0..10, &device);
    let (r, f) = (params(&reference), params(&fused));
    assert!(
        max_rel_diff(&r, &params(&start)) > 1e-2,
        "the parameters moved"
    );
    let diff = max_rel_diff(&r, &f);
    assert!(diff < 2e-4, "fused AdamW differs from burn's by {diff}");
}

#[test]
fn matches_burns_adamw_on_flex() {
    matches_burns_adamw(Device::flex().autodiff());
}

#[cfg(feature = "tch")]
#[test]
fn matches_burns_adamw_on_libtorch() {
    matches_burns_adamw(Device::libtorch().autodiff());
}

/// burn's composition (the path of other backends) agrees with the flex kernel.
#[test]
fn composition_matches_the_kernel() {
    let device = Device::flex();
    let draw = |n| randn(&mut stream(7, "adamw-kernel", n), [33, 70], &device);
    let (p, g, m) = (draw(1), draw(2), draw(3));
    let v = draw(4).abs();
    let c = FusedAdamW::new(0.1, 2.0).constants(3e-3, 4);
    let (p1, m1, v1) = adamw_step(p.clone(), g.clone(), m.clone(), v.clone(), c);
    let (p2, m2, v2) = composed_step(p, g, m, v, c);
    for (a, b) in [(p1, p2), (m1, m2), (v1, v2)] {
        let (a, b) = (to_vec_f32(a), to_vec_f32(b));
        assert!(max_rel_diff(&a, &b) < 1e-5);
    }
}

/// On libtorch's CPU the step runs the flex kernel in place when p, m and v have no other
/// handle: their buffers stay, and the values are burn-flex's bit for bit. With a handle held
/// on p it takes libtorch's calls instead (a new buffer); both agree with burn's composition.
#[cfg(feature = "tch")]
#[test]
fn the_libtorch_cpu_step_runs_the_kernel_in_place() {
    let device = Device::libtorch();
    let draw = |n| randn(&mut stream(8, "adamw-cpu", n), [33, 70], &device);
    let address = |t: &Tensor<2>| crate::torch_ops::data_address(t).expect("a libtorch tensor");
    let c = FusedAdamW::new(0.1, 2.0).constants(3e-3, 4);
    for hold in [false, true] {
        let (p, g, m) = (draw(1), draw(2), draw(3));
        let v = draw(4).abs();
        let reference = composed_step(p.clone(), g.clone(), m.clone(), v.clone(), c);
        let before = [address(&p), address(&m), address(&v)];
        let held = hold.then(|| p.clone());
        let (p1, m1, v1) = adamw_step(p, g, m, v, c);
        let after = [address(&p1), address(&m1), address(&v1)];
        if hold {
            assert_ne!(after[0], before[0], "p is held elsewhere: not written");
        } else {
            assert_eq!(after, before, "in place");
        }
        drop(held);
        if !hold {
            let flex = Device::flex();
            let on_flex = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &flex);
            let (p, g, m) = (draw(1), draw(2), draw(3));
            let v = draw(4).abs();
            let kernel = adamw_step(on_flex(&p), on_flex(&g), on_flex(&m), on_flex(&v), c);
            let bits = |t: &Tensor<2>| -> Vec<u32> {
                to_vec_f32(t.clone()).iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&p1), bits(&kernel.0), "the flex kernel's p'");
            assert_eq!(bits(&v1), bits(&kernel.2), "the flex kernel's v'");
        }
        for (a, b) in [(p1, reference.0), (m1, reference.1), (v1, reference.2)] {
            assert!(
                max_rel_diff(&to_vec_f32(a), &to_vec_f32(b)) < 1e-5,
                "hold {hold}"
            );
        }
    }
}

/// A checkpoint of burn's `AdamW` resumes under `FusedAdamW` (same state record): 4 steps of
/// one then 6 of the other end where 10 of burn's do.
#[test]
fn resumes_from_burns_adamw_state() {
    let device = Device::flex().autodiff();
    let start = net(&device);
    let reference = train(start.clone(), &mut burn_adamw(), 0..10, &device);
    let mut first = burn_adamw();
    let half = train(start.clone(), &mut first, 0..4, &device);
    let bytes = first.into_bytes().unwrap();
    let mut second = FusedAdamW::new(0.05, 0.5).init().from_bytes(bytes).unwrap();
    let resumed = train(half, &mut second, 4..10, &device);
    let diff = max_rel_diff(&params(&reference), &params(&resumed));
    assert!(diff < 2e-4, "resumed run differs by {diff}");
    // without the state (a fresh optimizer) the run would differ
    let fresh = train(
        train(start, &mut burn_adamw(), 0..4, &device),
        &mut FusedAdamW::new(0.05, 0.5).init(),
        4..10,
        &device,
    );
    assert!(max_rel_diff(&params(&reference), &params(&fresh)) > 1e-3);
}

/// All parameters at once follow one at a time: ten steps with clipping binding for some
/// parameters; only the clipping norms are summed by another kernel.
fn foreach_matches_per_parameter(device: Device, tolerance: f32) {
    let start = net(&device);
    let mut one = FusedAdamW::new(0.05, 0.5).module(false);
    let mut all = FusedAdamW::new(0.05, 0.5).module(true);
    assert!(all.is_foreach() && !one.is_foreach());
    let (a, b) = (
        train(start.clone(), &mut one, 0..10, &device),
        train(start.clone(), &mut all, 0..10, &device),
    );
    assert!(max_rel_diff(&params(&a), &params(&start)) > 1e-2, "moved");
    let diff = max_rel_diff(&params(&a), &params(&b));
    assert!(diff <= tolerance, "foreach differs by {diff}");
}

#[test]
fn foreach_is_the_per_parameter_step_on_flex() {
    // burn-flex parameters take the per-parameter kernel in both modes: equal to the bit
    foreach_matches_per_parameter(Device::flex().autodiff(), 0.0);
}

#[cfg(feature = "tch")]
#[test]
fn foreach_matches_per_parameter_on_libtorch() {
    foreach_matches_per_parameter(Device::libtorch().autodiff(), 1e-5);
}

/// The state is burn's `ModuleOptimizer` record in both modes: 4 steps of one then 6 of the
/// other end where 10 of either do, both ways round.
fn checkpoints_cross_modes(device: Device) {
    let start = net(&device);
    let reference = train(
        start.clone(),
        &mut FusedAdamW::new(0.05, 0.5).module(false),
        0..10,
        &device,
    );
    for first_foreach in [true, false] {
        let mut first = FusedAdamW::new(0.05, 0.5).module(first_foreach);
        let half = train(start.clone(), &mut first, 0..4, &device);
        let bytes = first.into_bytes(&half).unwrap();
        let mut second = FusedAdamW::new(0.05, 0.5)
            .module(!first_foreach)
            .from_bytes(bytes)
            .unwrap();
        let resumed = train(half.clone(), &mut second, 4..10, &device);
        let diff = max_rel_diff(&params(&reference), &params(&resumed));
        assert!(
            diff < 1e-5,
            "foreach {first_foreach} first: differs by {diff}"
        );
        // and saving left the first optimizer as it was
        let continued = train(half, &mut first, 4..10, &device);
        let diff = max_rel_diff(&params(&reference), &params(&continued));
        assert!(diff < 1e-5, "foreach {first_foreach}, continued: {diff}");
    }
}

#[test]
fn checkpoints_cross_modes_on_flex() {
    checkpoints_cross_modes(Device::flex().autodiff());
}

#[cfg(feature = "tch")]
#[test]
fn checkpoints_cross_modes_on_libtorch() {
    checkpoints_cross_modes(Device::libtorch().autodiff());
}

/// A parameter without a gradient keeps its value and its state; the others step: steps of the
/// convolution alone and of every parameter, in turns (in foreach mode the first covers every
/// parameter with gradients, so the optimizer keeps their moments, and the next covers more).
#[cfg(feature = "tch")]
#[test]
fn foreach_leaves_parameters_without_gradients() {
    let device = Device::libtorch().autodiff();
    let start = net(&device);
    let conv_only = |net: &Net, step: usize| {
        let x = randn(
            &mut stream(7, "adamw-conv", step as u64),
            [4, 2, 4, 4],
            &device,
        );
        GradientsParams::from_grads(net.conv.forward(x).square().mean().backward(), net)
    };
    let mut runs = Vec::new();
    for foreach in [false, true] {
        let mut optim = FusedAdamW::new(0.05, 0.5).module(foreach);
        let mut net = start.clone();
        for (step, all) in [false, false, false, true, true, false, true]
            .into_iter()
            .enumerate()
        {
            let grads = if all {
                GradientsParams::from_grads(loss(&net, step, &device).backward(), &net)
            } else {
                conv_only(&net, step)
            };
            net = optim.step(1e-2, net, grads);
        }
        runs.push(net);
    }
    let diff = max_rel_diff(&params(&runs[0]), &params(&runs[1]));
    assert!(diff < 1e-5, "differs by {diff}");
}

/// `auto` is on for CUDA devices only, with or without autodiff (constructing a CUDA device
/// does not need one).
#[cfg(feature = "tch")]
#[test]
fn foreach_auto_is_on_for_cuda_only() {
    use super::Foreach;
    assert!(Foreach::Auto.enabled(&Device::libtorch_cuda(0)));
    assert!(Foreach::Auto.enabled(&Device::libtorch_cuda(1).autodiff()));
    assert!(!Foreach::Auto.enabled(&Device::libtorch().autodiff()));
    assert!(!Foreach::Auto.enabled(&Device::flex().autodiff()));
    assert!(
        Foreach::On.enabled(&Device::flex()) && !Foreach::Off.enabled(&Device::libtorch_cuda(0))
    );
}
