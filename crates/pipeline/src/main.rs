//! `pipeline`: parse, run one library call, print any error on one line.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use ldm_common::device::select;
use ldm_pipeline::cli::{Cli, Command};
use ldm_pipeline::{builtin, interrupt, vae_stage};

fn main() -> ExitCode {
    interrupt::install();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Exit code of a run stopped by Ctrl-C after saving its state (128 + SIGINT).
const INTERRUPTED: u8 = 130;

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::TrainVae(a) => {
            let device = select(a.device.device)?;
            let config = builtin::resolve(&a.config)?;
            let overrides = vae_stage::Overrides {
                data: a.data,
                steps: a.train.steps,
                batch_size: a.train.batch_size,
                lr: a.train.lr,
                seed: a.train.seed,
            };
            eprintln!("train-vae on {} -> {}", device.description, a.out.display());
            match vae_stage::train_vae(&config, &overrides, &a.out, &device.device, a.train.resume)? {
                Some(s) => {
                    println!(
                        "trained the VAE for {} steps; latent scale factor {:.5}; outputs in {} (model.safetensors, vae.json, metrics.csv, samples/)",
                        s.steps,
                        s.latent_scale,
                        s.out.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!(
                        "interrupted: checkpoint saved in {}; continue with the same command and --resume",
                        a.out.join("checkpoint").display()
                    );
                    Ok(ExitCode::from(INTERRUPTED))
                }
            }
        }
        Command::EvalVae(a) => {
            let device = select(a.device.device)?;
            let run = vae_stage::VaeRun::load(&a.vae, &device.device)?;
            let e = vae_stage::eval_vae(&run, a.n, &device.device)?;
            println!(
                "{}: held-out PSNR {:.2} dB, SSIM {:.4}, KL {:.4} nats per latent dim ({} images)",
                a.vae.display(),
                e.psnr_db,
                e.ssim,
                e.kl_per_dim,
                e.images
            );
            if let Some(path) = a.json {
                ldm_common::checkpoint::write_json(&path, &e)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
