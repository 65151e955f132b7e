//! AdamW with per-parameter gradient-norm clipping, each parameter's step one operation: the
//! optimizer `train-vae` and `train-ldm` use (`FusedAdamW`, wrapped in burn's
//! `ModuleOptimizer`, which visits the parameters).
//!
//! burn's `AdamW` with `GradientClipping::Norm` computes the same step from 22 tensor
//! operations per parameter (clipping 7, moments 7, bias correction and update 8), each a
//! pass over memory and a new buffer: on burn-flex that was 6% of the DiT's training step and
//! more than PyTorch's whole optimizer, and on an accelerator each is a kernel launch.
//! [`FusedAdamW`] does the step in one pass on burn-flex ([`kernels`]; a second for the
//! gradient's norm when clipping), in 15 libtorch calls on burn-tch, and in burn's operations
//! elsewhere. Its state is burn's `AdamWState`, so checkpoints are interchangeable with burn's
//! `AdamW`'s.
//!
//! The step (Loshchilov & Hutter 2019, with burn's epsilon placement), for gradient g, clipped
//! by c = min(1, max_norm / (|g|_2 + tiny)) when clipping:
//! m' = b1 m + (1 - b1) c g, v' = b2 v + (1 - b2) (c g)^2,
//! p' = p (1 - lr wd) - lr (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps).

// burn 0.22.1 marks burn-tch deprecated in favour of its CubeCL backends, whose CUDA build
// cannot be made on the project's machines: burn-tch is the GPU path here (as in `torch_ops`).
#![allow(deprecated)]

mod foreach;
pub mod kernels;
#[cfg(test)]
mod tests;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};

use crate::flex::{contiguous, has_own_kernel, into_contiguous, values};
pub use foreach::{AdamW, Foreach};
use kernels::StepConstants;

/// AdamW's hyper-parameters (burn's `AdamWConfig` defaults: betas 0.9 / 0.999, eps 1e-5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedAdamW {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// Per-parameter gradient-norm clipping threshold (burn's `GradientClipping::Norm`);
    /// `None`: no clipping.
    pub max_norm: Option<f32>,
}

impl FusedAdamW {
    /// burn's defaults with this weight decay and clipping threshold (`<= 0`: none).
    pub fn new(weight_decay: f32, max_norm: f32) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay,
            max_norm: (max_norm > 0.0).then_some(max_norm),
        }
    }

    /// The module optimizer that steps every parameter with it.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }

    /// The scalars of step `time` (1-based) at learning rate `lr`, as `f32` for the kernels:
    /// [b1, b2, eps, 1 - lr wd, lr, 1 - b1^t, 1 - b2^t, max_norm or 0].
    fn constants(&self, lr: LearningRate, time: usize) -> [f32; 8] {
        let t = time as i32;
        [
            self.beta_1,
            self.beta_2,
            self.epsilon,
            (1.0 - lr * f64::from(self.weight_decay)) as f32,
            lr as f32,
            1.0 - self.beta_1.powi(t),
            1.0 - self.beta_2.powi(t),
            self.max_norm.unwrap_or(0.0),
        ]
    }
}

/// The clipping coefficient min(1, max_norm / (norm + tiny)) (burn's `clip_by_norm`), 1 when
/// `max_norm` is 0 (no clipping).
fn clip_coefficient(max_norm: f32, norm: f32) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + f32::MIN_POSITIVE)).min(1.0)
    } else {
        1.0
    }
}

/// The step on f32 slices with [`FusedAdamW::constants`] `c`: the gradient's norm (for the
/// clipping coefficient), then [`kernels::update`], written into p, m and v.
fn kernel_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: [f32; 8]) {
    let grad_scale = clip_coefficient(c[7], kernels::sum_squares(g).sqrt() as f32);
    let k = StepConstants {
        beta_1: c[0],
        beta_2: c[1],
        epsilon: c[2],
        decay: c[3],
        lr: c[4],
        bias_correction_1: c[5],
        bias_correction_2: c[6],
        grad_scale,
    };
    kernels::update(p, g, m, v, &k);
}

/// One parameter's AdamW step as a backend operation: (p', m', v') from p, g, m, v and
/// [`FusedAdamW::constants`].
#[backend_extension(Flex, LibTorch: cfg(feature = "tch"))]
pub trait AdamWStep: Backend {
    fn adamw_step(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        constants: [f32; 8],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl AdamWStep for Flex {
    fn adamw_step(
        p: FlexTensor,
        g: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        c: [f32; 8],
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let g = contiguous(&g);
        // In place where burn holds no other handle on the storage (`storage_mut` copies
        // otherwise): the step then allocates nothing.
        let (mut p, mut m, mut v) = (into_contiguous(p), into_contiguous(m), into_contiguous(v));
        kernel_step(
            p.storage_mut::<f32>(),
            values(&g),
            m.storage_mut::<f32>(),
            v.storage_mut::<f32>(),
            c,
        );
        (p, m, v)
    }
}

#[cfg(feature = "tch")]
impl AdamWStep for burn::backend::LibTorch {
    fn adamw_step(
        mut p: burn::backend::libtorch::TchTensor,
        g: burn::backend::libtorch::TchTensor,
        mut m: burn::backend::libtorch::TchTensor,
        mut v: burn::backend::libtorch::TchTensor,
        c: [f32; 8],
    ) -> (
        burn::backend::libtorch::TchTensor,
        burn::backend::libtorch::TchTensor,
        burn::backend::libtorch::TchTensor,
    ) {
        use burn::backend::libtorch::TchTensor;
        if cpu_in_place(&mut p, &g, &mut m, &mut v, c) {
            return (p, m, v);
        }
        let [b1, b2, eps, decay, lr, bc1, bc2, max_norm] = c.map(f64::from);
        let g = &g.tensor;
        let g = if max_norm > 0.0 {
            // c = min(1, max_norm / (|g| + tiny)) as a 0-d tensor: no read back to the host
            let mut coef = g.norm();
            let _ = coef.g_add_scalar_(f64::from(f32::MIN_POSITIVE));
            let _ = coef.reciprocal_();
            let _ = coef.g_mul_scalar_(max_norm);
            let _ = coef.clamp_max_(1.0);
            g * coef
        } else {
            g.shallow_clone()
        };
        // In place where burn-tch says no other handle shares the storage (`mut_ops`, as its
        // own operations decide), else out of place.
        // m' = m + (1 - b1) (g - m), v' = v + (1 - b2) (g^2 - v)
        let m = m
            .mut_ops(|m| m.lerp_(&g, 1.0 - b1))
            .unwrap_or_else(|| TchTensor::new(m.tensor.lerp(&g, 1.0 - b1)));
        let g2 = g.square();
        let v = v
            .mut_ops(|v| v.lerp_(&g2, 1.0 - b2))
            .unwrap_or_else(|| TchTensor::new(v.tensor.lerp(&g2, 1.0 - b2)));
        // p' = p (1 - lr wd) + (-lr / bc1) m' / (sqrt(v' / bc2) + eps)
        let mut denom = v.tensor.g_div_scalar(bc2);
        let _ = denom.sqrt_();
        let _ = denom.g_add_scalar_(eps);
        let step = m.tensor.g_mul_scalar(-lr / bc1);
        let update = |p: &mut tch::Tensor| {
            if decay != 1.0 {
                let _ = p.g_mul_scalar_(decay);
            }
            p.addcdiv_(&step, &denom)
        };
        let p = p.mut_ops(update).unwrap_or_else(|| {
            let mut copy = p.tensor.copy();
            TchTensor::new(update(&mut copy))
        });
        (p, m, v)
    }
}

/// On libtorch's CPU, the step as on burn-flex: one pass of [`kernels::update`] over the
/// tensors' memory (a second for the gradient's norm), written into p, m and v, instead of
/// 15 libtorch calls and their temporaries. Only where each is a contiguous f32 CPU tensor
/// that burn-tch would itself update in place (no other handle on its storage, no broadcast
/// stride) and the gradient is apart from them; `false` otherwise, and nothing is written.
#[cfg(feature = "tch")]
fn cpu_in_place(
    p: &mut burn::backend::libtorch::TchTensor,
    g: &burn::backend::libtorch::TchTensor,
    m: &mut burn::backend::libtorch::TchTensor,
    v: &mut burn::backend::libtorch::TchTensor,
    c: [f32; 8],
) -> bool {
    let n = p.tensor.numel();
    let plain = |t: &tch::Tensor| {
        t.device() == tch::Device::Cpu
            && t.kind() == tch::Kind::Float
            && t.is_contiguous()
            && t.numel() == n
    };
    let writable = [&*p, &*m, &*v]
        .iter()
        .all(|t| plain(&t.tensor) && t.can_mut());
    let addresses = [&p.tensor, &m.tensor, &v.tensor].map(|t| t.data_ptr() as usize);
    let g_at = g.tensor.data_ptr() as usize;
    let apart = !addresses.contains(&g_at)
        && addresses[0] != addresses[1]
        && addresses[1] != addresses[2]
        && addresses[0] != addresses[2];
    if !writable || !plain(&g.tensor) || !apart || n == 0 {
        return false;
    }
    // SAFETY: four distinct, contiguous f32 CPU buffers of n elements; p, m and v have no
    // other handle (burn-tch's `can_mut`), so nothing else reads or writes them meanwhile.
    let (p, g, m, v) = unsafe {
        let slice = |t: &tch::Tensor| std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n);
        (
            slice(&p.tensor),
            std::slice::from_raw_parts(g_at as *const f32, n),
            slice(&m.tensor),
            slice(&v.tensor),
        )
    };
    kernel_step(p, g, m, v, c);
    true
}

/// The step from burn's tensor operations (other backends and dtypes; the tests' second
/// reference): the formula of the module doc.
fn composed_step<const D: usize>(
    p: Tensor<D>,
    g: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    c: [f32; 8],
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let [b1, b2, eps, decay, lr, bc1, bc2, max_norm] = c.map(f64::from);
    let g = if max_norm > 0.0 {
        let norm = g.clone().square().sum().sqrt();
        let coef =
            (norm.add_scalar(f64::from(f32::MIN_POSITIVE)).recip() * max_norm).clamp_max(1.0);
        g * coef.unsqueeze()
    } else {
        g
    };
    let m = m * b1 + g.clone() * (1.0 - b1);
    let v = v * b2 + g.square() * (1.0 - b2);
    let delta = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + eps);
    (p * decay - delta * lr, m, v)
}

/// (p', m', v') of one step; `m`, `v` are zeros on the first step.
pub fn adamw_step<const D: usize>(
    p: Tensor<D>,
    g: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    constants: [f32; 8],
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    // [`AdamWStep`] runs f32 on burn-flex and any float on burn-tch
    if !has_own_kernel(&p) {
        return composed_step(p, g, m, v, constants);
    }
    let (p, m, v) = <Dispatch as AdamWStep>::adamw_step(
        p.into_dispatch(),
        g.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        constants,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// The step number and moments a parameter's step starts from: one past its state's, or step
/// 1 with zero moments.
fn next_step<const D: usize>(
    tensor: &Tensor<D>,
    state: Option<AdamWState<D>>,
) -> (usize, Tensor<D>, Tensor<D>) {
    match state {
        Some(AdamWState { momentum: s }) => (s.time + 1, s.moment_1, s.moment_2),
        None => (1, tensor.zeros_like(), tensor.zeros_like()),
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (time, m, v) = next_step(&tensor, state);
        let (p, m, v) = adamw_step(tensor, grad, m, v, self.constants(lr, time));
        let state = AdamWState::new(AdaptiveMomentumState::new(time, m, v));
        (p, Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
