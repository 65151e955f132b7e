//! Times what a training step does before its network: the noised latent z_t, v's target, the
//! min-SNR weights and the float timesteps, with the per-sample coefficients uploaded one by
//! one from the host (`per_sample`: six uploads besides the latents) or gathered from the
//! [`TrainingTable`] (one upload of the timesteps). On a CPU the difference is the host cost
//! of the calls; on CUDA each upload from pageable memory also waits for the device's queue.
//! Then the same for a sampler step's conversions (a v output to eps, and eps to x0), with the
//! coefficients uploaded per sample or passed as scalars (one timestep for the batch).
//! The measurement behind docs/PERFORMANCE.md's "Fewer uploads, and uploads that do not wait".
//!
//! ```sh
//! cargo run --release -p ldm-diffusion --features ldm-common/tch --example step_coefficients \
//!     -- [cpu|libtorch|cuda] [iters]
//! ```
//!
//! Prints, per batch size and path, the median time of one step's coefficients and the
//! element-wise work on them, followed by a device sync.

use std::time::Instant;

use burn::prelude::*;
use ldm_common::device::{DeviceChoice, select};
use ldm_common::rng::{randn, stream};
use ldm_diffusion::loss::LossWeighting;
use ldm_diffusion::parameterization::{Parameterization, eps_to_x0};
use ldm_diffusion::process::{per_sample, q_sample};
use ldm_diffusion::schedule::{Schedule, ScheduleConfig};
use ldm_diffusion::training_table::TrainingTable;

fn median_ms(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2] * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let choice: DeviceChoice = args.first().map_or("cpu", String::as_str).parse()?;
    let iters: usize = args.get(1).map_or(Ok(2000), |s| s.parse())?;
    let device = select(choice)?.device;
    let schedule = Schedule::new(&ScheduleConfig::default())?;
    let p = Parameterization::Velocity;
    let weighting = LossWeighting::MinSnr { gamma: 5.0 };
    let table = TrainingTable::new(&schedule, p, &weighting);
    println!("device {device:?}, {iters} iterations; ms per step (median)");
    println!("batch   per-sample uploads   table gather");
    for b in [1usize, 64, 256] {
        let shape = [b, 4, 8, 8];
        let z0 = randn(&mut stream(1, "z0", 0), shape, &device);
        let eps = randn(&mut stream(1, "eps", 0), shape, &device);
        let t: Vec<usize> = (0..b).map(|i| (i * 37) % 1000).collect();
        let uploads = |z0: Tensor<4>, eps: Tensor<4>| {
            let z_t = q_sample(&schedule, z0.clone(), &t, eps.clone());
            let target = p.target(&schedule, z0, eps, &t);
            let weights = weighting.weights(&schedule, p, &t, &device);
            let t_float = per_sample(&t, &device, |t| t as f64).reshape([b]);
            (z_t, target, weights, t_float)
        };
        let gather = |z0: Tensor<4>, eps: Tensor<4>| {
            let c = table.gather(&t, &device);
            let z_t = c.q_sample(z0.clone(), eps.clone());
            let target = c.target(z0, eps);
            (z_t, target, c.weights, c.t)
        };
        let (up, ga) = alternate(
            iters,
            &device,
            || drop(uploads(z0.clone(), eps.clone())),
            || drop(gather(z0.clone(), eps.clone())),
        )?;
        println!("{b:5}   {up:18.4}   {ga:12.4}");
    }

    println!("a sampler step's conversions (v output -> eps -> x0, one t for the batch)");
    println!("batch   per-sample uploads   scalars");
    for b in [2usize, 128, 512] {
        let shape = [b, 4, 8, 8];
        let z_t = randn(&mut stream(2, "z_t", 0), shape, &device);
        let output = randn(&mut stream(2, "output", 0), shape, &device);
        let (t, ts) = (500, vec![500; b]);
        let each = || {
            let eps = p.eps(&schedule, z_t.clone(), output.clone(), &ts);
            drop(Parameterization::Epsilon.x0(&schedule, z_t.clone(), eps, &ts))
        };
        let at = || {
            let eps = p.eps_at(&schedule, z_t.clone(), output.clone(), t);
            drop(eps_to_x0(&schedule, z_t.clone(), eps, t))
        };
        let (each, at) = alternate(iters, &device, each, at)?;
        println!("{b:5}   {each:18.4}   {at:12.4}");
    }
    Ok(())
}

/// The median ms of `a` and of `b`, each followed by a device sync, over `iters` calls of
/// each, alternated (and which goes first alternated too), so that a slow moment of the
/// machine falls on both.
fn alternate(
    iters: usize,
    device: &Device,
    a: impl Fn(),
    b: impl Fn(),
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let (mut times_a, mut times_b) = (Vec::new(), Vec::new());
    for i in 0..iters {
        for k in 0..2 {
            let start = Instant::now();
            let first = (i + k) % 2 == 0;
            if first {
                a()
            } else {
                b()
            }
            device.sync()?;
            let elapsed = start.elapsed().as_secs_f64();
            if first {
                times_a.push(elapsed)
            } else {
                times_b.push(elapsed)
            }
        }
    }
    Ok((median_ms(times_a), median_ms(times_b)))
}
