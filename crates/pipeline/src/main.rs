//! `pipeline`: parse, run one library call, print any error on one line.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use ldm_common::device::select;
use ldm_diffusion::sampler::rescale_suffix;
use ldm_pipeline::cli::{Cli, Command};
use ldm_pipeline::{builtin, evaluator_stage, generate, interrupt, ldm_stage, recipe, vae_stage};
use ldm_pipeline::{classifier_stage, img2img};

fn main() -> ExitCode {
    ldm_common::alloc::keep_freed_memory();
    interrupt::install();
    let cli = Cli::parse();
    let result = ldm_common::threads::on_worker_thread(|| run(cli));
    builtin::remove_temporary_files();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// What a training command runs on: the `--devices` list when given, else the one device.
fn on_devices(devices: Option<&str>, device: &str) -> String {
    match devices {
        Some(list) => format!("{list} (data-parallel)"),
        None => device.to_string(),
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
                train: a.train.overrides(Some(&a.split)),
            };
            eprintln!(
                "train-vae on {} -> {}",
                on_devices(a.split.devices.as_deref(), &device.description),
                a.out.display()
            );
            match vae_stage::train_vae(&config, &overrides, &a.out, &device.device, a.train.resume)?
            {
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
        Command::TrainLdm(a) => {
            let device = select(a.device.device)?;
            let config = builtin::resolve(&a.config)?;
            let overrides = a.train.overrides(Some(&a.split));
            eprintln!(
                "train-ldm on {} -> {}",
                on_devices(a.split.devices.as_deref(), &device.description),
                a.out.display()
            );
            match ldm_stage::train_ldm(
                &config,
                &a.vae,
                &overrides,
                &a.out,
                &device.device,
                a.train.resume,
            )? {
                Some(s) => {
                    println!(
                        "trained the LDM ({} parameters) for {} steps; outputs in {} (model.safetensors = EMA weights, ldm.json, metrics.csv, samples/)",
                        s.num_params,
                        s.steps,
                        s.out.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None => interrupted(&a.out),
            }
        }
        Command::EvalLdm(a) => {
            let device = select(a.device.device)?;
            let run = ldm_stage::LdmRun::load(&a.model, &device.device)?;
            let e = ldm_stage::eval_ldm(&run, a.n, a.repeats, a.seed, &device.device)?;
            println!(
                "{}: held-out loss {:.5}; variational bound {:.4} nats per latent dim (prior {:.4} + diffusion {:.4}; {} latents x {} timesteps)",
                a.model.display(),
                e.loss,
                e.vlb_nats_per_dim,
                e.prior_nats_per_dim,
                e.diffusion_nats_per_dim,
                e.latents,
                e.timesteps_per_latent
            );
            if let Some(path) = a.json {
                ldm_common::checkpoint::write_json(&path, &e)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedule(a) => {
            let config: ldm_stage::LdmRunConfig =
                ldm_pipeline::config::read(&builtin::resolve(&a.config)?)?;
            let schedule = ldm_diffusion::schedule::Schedule::new(&config.schedule)?;
            print!("{}", schedule.to_csv());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(a) => {
            let device = select(a.device.device)?;
            let model = match a.model {
                Some(m) => m,
                None => generate::default_model()?,
            };
            let run = ldm_stage::LdmRun::load(&model, &device.device)?;
            let sampler =
                generate::sampler_options(&run.config.sampler, &run.schedule, &a.sampler)?;
            if a.n < 1 {
                anyhow::bail!("-n {}: expected at least one image", a.n);
            }
            let args = generate::GenerateArgs {
                prompt: a.prompt,
                negative_prompt: a.negative_prompt,
                class: a.class,
                cfg: a.cfg,
                sampler,
                n: a.n as usize,
                seed: a.seed,
                img2img: img2img::from_flags(
                    a.img2img.init_image,
                    a.img2img.strength,
                    a.img2img.mask,
                )?,
                classifier: classifier_stage::from_flags(
                    a.guidance.classifier,
                    a.guidance.classifier_scale,
                )?,
                trajectory: a.trajectory,
            };
            let record = generate::generate(&run, &args, &a.out, &device.device)?;
            let mut what = match (&record.class, &record.prompt) {
                (Some(c), _) => format!("class {c}"),
                (None, Some(p)) if run.text_conditional() => format!("prompt {p:?}"),
                _ => "unconditional".into(),
            };
            if let Some(negative) = &record.negative_prompt {
                what += &format!(", negative prompt {negative:?}");
            }
            let rescale = rescale_suffix(record.sampler.guidance_rescale);
            let trajectory = if record.trajectory.is_some() {
                ", trajectory.png"
            } else {
                ""
            };
            println!(
                "wrote {} images, grid.png{trajectory} and generate.json to {} ({what}, cfg {}{rescale}, {} {} steps, seed {})",
                record.n,
                a.out.display(),
                record.cfg,
                record.sampler.kind,
                record.sampler.steps,
                record.seed
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::TrainEvaluator(a) => train_evaluator(a),
        Command::TrainClassifier(a) => train_classifier(a),
        Command::Eval(a) => eval(a),
        Command::Plot(a) => {
            let (path, w, h) = ldm_pipeline::plot::plot_run(&a.run_dir, a.out.as_deref())?;
            println!("wrote {} ({w}x{h})", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::PlotSweep(a) => {
            let table = ldm_pipeline::plot_sweep::plot_sweep(&a.files, a.x, &a.out)?;
            print!("{table}");
            eprintln!("wrote {}", a.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(a) => {
            let model = match a.model {
                Some(m) => m,
                None => generate::default_model()?,
            };
            ldm_pipeline::serve::serve(ldm_pipeline::serve::ServeOptions {
                model,
                classifier: a.classifier,
                host: a.host,
                port: a.port,
                queue: a.queue,
                max_images: a.max_images,
                max_body: a.max_body,
                device: a.device.device,
                precision: a.precision,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(a) => ldm_pipeline::bench::run_cli(a),
        Command::Run(a) => {
            let device = select(a.device.device)?;
            let overrides = recipe::RunOverrides {
                sets: a.set,
                vae_steps: a.vae_steps,
                ldm_steps: a.ldm_steps,
                out: a.out,
            };
            eprintln!("run {} on {}", a.recipe, device.description);
            match recipe::run(&a.recipe, &overrides, &device.device)? {
                Some(s) => {
                    let minutes = |x: Option<f64>| {
                        x.map_or("kept".to_string(), |x| format!("{:.1} min", x / 60.0))
                    };
                    println!(
                        "recipe done in {:.1} min (VAE {}, LDM {}, grid {:.0} s): VAE {}, LDM {}, grid {} (one row per class); `pipeline generate` now uses this model by default",
                        s.timing.total_seconds / 60.0,
                        minutes(s.timing.vae_seconds),
                        minutes(s.timing.ldm_seconds),
                        s.timing.grid_seconds,
                        s.vae.display(),
                        s.ldm.display(),
                        s.grid.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!(
                        "interrupted: checkpoints saved; run the same command again to resume"
                    );
                    Ok(ExitCode::from(INTERRUPTED))
                }
            }
        }
    }
}

fn train_evaluator(a: ldm_pipeline::cli::TrainEvaluatorArgs) -> Result<ExitCode> {
    let device = select(a.device.device)?;
    let config = builtin::resolve(&a.config)?;
    eprintln!(
        "train-evaluator on {} -> {}",
        device.description,
        a.out.display()
    );
    match evaluator_stage::train_evaluator(
        &config,
        &a.set,
        a.data.as_deref(),
        &a.out,
        &device.device,
        a.resume,
    )? {
        Some(info) => {
            println!(
                "trained the evaluator: held-out accuracy {:.2}% on {} images; outputs in {}",
                100.0 * info.held_out_accuracy,
                info.held_out_images,
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        None => interrupted(&a.out),
    }
}

fn train_classifier(a: ldm_pipeline::cli::TrainClassifierArgs) -> Result<ExitCode> {
    let device = select(a.device.device)?;
    let config = builtin::resolve(&a.config)?;
    let model = match a.model {
        Some(m) => m,
        None => generate::default_model()?,
    };
    let run = ldm_stage::LdmRun::load(&model, &device.device)?;
    let overrides = a.train.overrides(None);
    eprintln!(
        "train-classifier on the latents of {} on {} -> {}",
        model.display(),
        device.description,
        a.out.display()
    );
    match classifier_stage::train_classifier(
        &config,
        &run,
        &overrides,
        &a.out,
        &device.device,
        a.train.resume,
    )? {
        Some(info) => {
            let table: Vec<String> = info
                .held_out_accuracy
                .iter()
                .map(|a| format!("t={} {:.1}%", a.t, 100.0 * a.accuracy))
                .collect();
            println!(
                "trained the noisy-latent classifier ({} parameters) for {} steps; held-out accuracy on {} latents: {}; outputs in {} (model.safetensors, classifier.json, metrics.csv)",
                info.num_params,
                info.steps,
                info.held_out_latents,
                table.join(", "),
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        None => interrupted(&a.out),
    }
}

fn eval(a: ldm_pipeline::cli::EvalArgs) -> Result<ExitCode> {
    let device = select(a.device.device)?;
    let model = match a.model {
        Some(m) => m,
        None => generate::default_model()?,
    };
    let mut run = ldm_stage::LdmRun::load(&model, &device.device)?;
    let (dir, reference) = ldm_pipeline::reference_evaluator::resolve(
        &a.evaluator,
        &run.info.class_names,
        run.vae.info.image_shape,
    )?;
    let mut evaluator = evaluator_stage::EvaluatorRun::load(&dir, &device.device)?;
    if let Some(name) = reference {
        evaluator.label = format!("the reference evaluator {name}");
    }
    let sampler = generate::sampler_options(&run.config.sampler, &run.schedule, &a.sampler)?;
    for line in generate::sampler_warnings(&run, &sampler, true) {
        eprintln!("{line}");
    }
    // bf16: the weights cast once here, not once per class's batch
    run.set_sampling_precision(sampler.precision);
    let guide = classifier_stage::from_flags(a.guidance.classifier, a.guidance.classifier_scale)?
        .map(|c| {
            classifier_stage::ClassifierRun::load(&c.dir, &device.device).map(|r| (r, c.scale))
        })
        .transpose()?;
    let e = evaluator_stage::eval_model(
        &run,
        &evaluator,
        a.n,
        a.cfg,
        &sampler,
        a.seed,
        guide.as_ref().map(|(r, s)| (r, *s)),
        &device.device,
    )?;
    println!(
        "{} | cfg {}{} | {} {} steps | {} images per class | {}",
        model.display(),
        e.cfg,
        rescale_suffix(e.sampler.guidance_rescale),
        e.sampler.kind,
        e.sampler.steps,
        e.per_class,
        e.evaluator
    );
    print!("{}", evaluator_stage::class_table(&e));
    println!(
        "FID {:.3} (real-vs-real floor {:.3}), KIDx1000 {:.3} (floor {:.3}), precision {:.3}, recall {:.3}, {:.1} images/s",
        e.fid,
        e.fid_floor,
        1000.0 * e.kid,
        1000.0 * e.kid_floor,
        e.precision,
        e.recall,
        e.images_per_second
    );
    if let Some(path) = a.json {
        ldm_common::checkpoint::write_json(&path, &e)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn interrupted(out: &std::path::Path) -> Result<ExitCode> {
    eprintln!(
        "interrupted: checkpoint saved in {}; continue with the same command and --resume",
        out.join("checkpoint").display()
    );
    Ok(ExitCode::from(INTERRUPTED))
}
