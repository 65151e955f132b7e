//! `train-ldm`, `eval-ldm`, `schedule` and `generate` end to end on a tiny VAE and DiT, and
//! the bad inputs of the diffusion and generation issues.

mod common;

use std::process::Output;

use common::*;

/// A tiny VAE run in `vae/` and the tiny class-conditional LDM config in `ldm.toml`.
fn setup() -> TinyVae {
    let t = TinyVae::trained();
    std::fs::write(t.path("ldm.toml"), TinyLdmConfig::default().toml()).unwrap();
    t
}

/// `pipeline generate` of four `top-left` images on burn-flex from the LDM run `model` into
/// `out` (both relative to `t`), with `extra` flags.
fn generate_four(t: &TinyVae, model: &str, out: &str, extra: &[&str]) -> Output {
    let (model, dir) = (t.p(model), t.p(out));
    let mut args = vec![
        "generate", "--model", &model, "--class", "top-left", "-n", "4", "--out", &dir, "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    pipeline(&args)
}

/// The gray levels of the PNG `rel` (relative to `t`).
fn luma(t: &TinyVae, rel: &str) -> Vec<u8> {
    image::open(t.path(rel)).unwrap().to_luma8().into_raw()
}

/// Asserts that `ldm.toml` with `from` replaced by `to` fails to train, saying `needle`, for
/// each case.
fn assert_bad_configs(t: &TinyVae, cases: &[(&str, &str, &str)]) {
    let base = TinyLdmConfig::default().toml();
    for (from, to, needle) in cases {
        std::fs::write(t.path("bad.toml"), base.replace(from, to)).unwrap();
        assert_error(&t.train_ldm("bad.toml", "r", &[]), needle);
    }
}

#[test]
fn train_generate_evaluate() {
    let t = setup();
    let o = t.train_ldm("ldm.toml", "ldm", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for file in [
        "config.toml",
        "model.safetensors",
        "ldm.json",
        "metrics.csv",
        "samples/step-000004.png",
        "checkpoint/ema.bpk",
        "latents/train.f32",
    ] {
        assert!(t.path("ldm").join(file).exists(), "missing {file}");
    }
    let generate = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "M",
            "--class",
            "top-right",
            "--cfg",
            "3",
            "-n",
            "3",
            "--out",
            out,
            "--device",
            "cpu",
        ];
        let m = t.p("ldm");
        args[2] = &m;
        args.extend_from_slice(extra);
        pipeline(&args)
    };
    let (a, b) = (t.p("g1"), t.p("g2"));
    let o = generate(&a, &["--seed", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(generate(&b, &["--seed", "7"]).status.success());
    for f in ["000.png", "001.png", "002.png", "grid.png", "generate.json"] {
        let sha = |d: &str| ldm_common::checkpoint::sha256_file(&t.path(d).join(f)).unwrap();
        assert_eq!(sha("g1"), sha("g2"), "{f} differs between equal seeds");
    }
    let text = ldm_common::image_io::read_png_text(&t.path("g1/000.png")).unwrap();
    assert_eq!(text[0].0, "parameters");
    assert!(
        text[0].1.contains("\"class\":\"top-right\"") && text[0].1.contains("\"seed\":7"),
        "{}",
        text[0].1
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("g1/generate.json")).unwrap())
            .unwrap();
    assert_eq!(record["cfg"], 3.0);
    assert_eq!(record["files"].as_array().unwrap().len(), 3);
    // Another seed gives other images; every sampler runs.
    assert!(generate(&t.p("g3"), &["--seed", "8"]).status.success());
    let sha = |f: &str| ldm_common::checkpoint::sha256_file(&t.path(f)).unwrap();
    assert_ne!(sha("g1/000.png"), sha("g3/000.png"));
    for sampler in [
        "ddpm",
        "ddim",
        "plms",
        "dpm-solver++",
        "unipc",
        "heun",
        "langevin",
    ] {
        let o = generate(
            &t.p(&format!("s-{sampler}")),
            &["--sampler", sampler, "--steps", "4"],
        );
        assert!(o.status.success(), "{sampler}: {}", stderr(&o));
    }
    // --trajectory: one row per image, one column per step (6 steps: all shown); DDIM's last
    // step returns its x0 estimate, so the last column is the image itself.
    let o = generate(
        &t.p("traj"),
        &["--trajectory", "--steps", "6", "--seed", "7"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("grid.png, trajectory.png and generate.json"));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("traj/generate.json")).unwrap())
            .unwrap();
    let traj = &record["trajectory"];
    assert_eq!(traj["file"], "trajectory.png");
    assert_eq!(traj["steps"], serde_json::json!([1, 2, 3, 4, 5, 6]));
    assert_eq!(
        (traj["sampler_steps"].as_u64(), traj["rows"].as_u64()),
        (Some(6), Some(3))
    );
    let grid = image::open(t.path("traj/trajectory.png"))
        .unwrap()
        .to_luma8();
    // cells of 32 pixels with a 2-pixel border
    assert_eq!(grid.dimensions(), (6 * 34 + 2, 3 * 34 + 2));
    let cell = |row: u32, col: u32| -> Vec<u8> {
        let (x0, y0) = (2 + col * 34, 2 + row * 34);
        (0..32)
            .flat_map(|y| (0..32).map(move |x| (x, y)))
            .map(|(x, y)| grid.get_pixel(x0 + x, y0 + y)[0])
            .collect()
    };
    for (row, file) in ["traj/000.png", "traj/001.png", "traj/002.png"]
        .iter()
        .enumerate()
    {
        assert_eq!(
            cell(row as u32, 5),
            luma(&t, file),
            "{file}: the last column is the image"
        );
    }
    assert_ne!(
        cell(0, 0),
        cell(0, 5),
        "the first estimate is not yet the image"
    );
    // Without the flag: no trajectory, and the same images.
    assert!(!t.path("g1/trajectory.png").exists());
    assert_eq!(luma(&t, "traj/000.png"), {
        let o = generate(&t.p("traj-off"), &["--steps", "6", "--seed", "7"]);
        assert!(o.status.success());
        luma(&t, "traj-off/000.png")
    });
    // Karras spacing is recorded; where levels round to one timestep (100 levels on T = 100),
    // a note says how many steps run.
    let o = generate(
        &t.p("karras"),
        &[
            "--sampler",
            "dpm-solver++",
            "--spacing",
            "karras",
            "--steps",
            "100",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("note: sampler.spacing = karras: the 100 noise levels fall on ")
            && e.contains(" distinct trained timesteps"),
        "{e}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("karras/generate.json")).unwrap())
            .unwrap();
    assert_eq!(record["sampler"]["spacing"], "karras");
    assert!(
        !stderr(&generate(
            &t.p("karras10"),
            &["--spacing", "karras", "--steps", "10"]
        ))
        .contains("note:")
    );
    // A prompt naming a class works like --class.
    let o = pipeline(&[
        "generate",
        "--model",
        &t.p("ldm"),
        "--prompt",
        "A  Top-Right",
        "--cfg",
        "3",
        "-n",
        "3",
        "--seed",
        "7",
        "--out",
        &t.p("g4"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pixels = |f: &str| luma(&t, f);
    assert_eq!(
        pixels("g1/000.png"),
        pixels("g4/000.png"),
        "the prompt did not select the class"
    );

    let o = pipeline(&[
        "eval-ldm",
        "--model",
        &t.p("ldm"),
        "--device",
        "cpu",
        "--json",
        &t.p("e.json"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("e.json")).unwrap()).unwrap();
    let vlb = e["vlb_nats_per_dim"].as_f64().unwrap();
    assert!(vlb.is_finite() && vlb > 0.0, "{e}");
    assert_eq!(e["latents"], 16);
}

#[test]
fn resume_is_exact_and_the_cache_is_reused() {
    let t = setup();
    assert!(t.train_ldm("ldm.toml", "a", &[]).status.success());
    assert!(
        t.train_ldm("ldm.toml", "b", &["--steps", "2"])
            .status
            .success()
    );
    assert_ok(&t.train_ldm("ldm.toml", "b", &["--resume"]));
    assert_eq!(
        t.sha("a/model.safetensors"),
        t.sha("b/model.safetensors"),
        "resumed EMA weights differ from the uninterrupted run"
    );
}

/// `--init-from`: a run that starts from another run's weights begins where that one ended
/// (one step at a vanishing learning rate stays within 1e-5 of them, while training from
/// scratch does not), records where it came from, and is refused another architecture or a
/// model of another VAE.
#[test]
fn fine_tuning_starts_from_another_runs_weights() {
    let t = setup();
    assert_ok(&t.train_ldm("ldm.toml", "base", &[]));
    let tiny_step = [
        "--steps",
        "1",
        "--lr",
        "1e-12",
        "--set",
        "train.warmup_steps=1",
    ];
    let base = t.p("base");
    let mut flags = vec!["--init-from", base.as_str()];
    flags.extend_from_slice(&tiny_step);
    let o = t.train_ldm("ldm.toml", "tuned", &flags);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("starting from the weights of"),
        "{}",
        stderr(&o)
    );
    let diff = max_weight_difference(
        &t.path("base/model.safetensors"),
        &t.path("tuned/model.safetensors"),
    );
    assert!(
        diff < 1e-5,
        "the fine-tuned run moved {diff} from its start"
    );
    assert_ok(&t.train_ldm("ldm.toml", "scratch", &tiny_step));
    let scratch = max_weight_difference(
        &t.path("base/model.safetensors"),
        &t.path("scratch/model.safetensors"),
    );
    assert!(scratch > 1e-3, "from scratch: {scratch}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("tuned/ldm.json")).unwrap()).unwrap();
    assert_eq!(
        info["init_from"]["weights_sha256"].as_str(),
        Some(t.sha("base/model.safetensors").as_str())
    );
    assert!(info["init_from"]["dir"].as_str().unwrap().ends_with("base"));
    let saved = std::fs::read_to_string(t.path("tuned/config.toml")).unwrap();
    assert!(saved.contains("init_from = "), "{saved}");
    // A fresh run into the same folder without it forgets the source.
    assert_ok(&t.train_ldm("ldm.toml", "tuned", &tiny_step));
    let info = std::fs::read_to_string(t.path("tuned/ldm.json")).unwrap();
    assert!(!info.contains("init_from"), "{info}");

    // Another architecture, a VAE run, and a missing folder are refused before training.
    let o = t.train_ldm(
        "ldm.toml",
        "wider",
        &["--init-from", &base, "--set", "backbone.hidden_size=48"],
    );
    assert_error(&o, "--init-from");
    assert!(
        stderr(&o).contains("weights were made for another architecture"),
        "{}",
        stderr(&o)
    );
    let vae = t.p("vae");
    assert_error(
        &t.train_ldm("ldm.toml", "x1", &["--init-from", &vae]),
        "a VAE run folder (vae.json) where an LDM run folder was expected",
    );
    let nothing = t.p("nothing");
    assert_error(
        &t.train_ldm("ldm.toml", "x2", &["--init-from", &nothing]),
        "no such LDM run folder",
    );
    // A model of another VAE: its latent space is not this one's.
    assert_ok(&t.train_vae("vae.toml", "vae2", &["--seed", "5"]));
    let o = t.train_ldm_on(
        "ldm.toml",
        "vae2",
        "x3",
        &["--init-from", &base, "--device", "cpu"],
    );
    assert_error(&o, "that model learned the latents of another VAE");
    for refused in ["x1", "x2", "x3"] {
        assert!(
            !t.path(refused).join("latents").exists(),
            "{refused}: refused before encoding"
        );
    }
    // The VAE stage fine-tunes too; the evaluator stage refuses it.
    let o = t.train_vae(
        "vae.toml",
        "vae-tuned",
        &["--init-from", &vae, "--steps", "1"],
    );
    assert_ok(&o);
    let info = std::fs::read_to_string(t.path("vae-tuned/vae.json")).unwrap();
    assert!(info.contains(&t.sha("vae/model.safetensors")), "{info}");
    let evaluator = tiny_evaluator_config(&t.path("data"), 4, TINY_EVALUATOR_TRAIN);
    std::fs::write(t.path("ev.toml"), evaluator).unwrap();
    let set = format!("train.init_from={vae}");
    assert_error(
        &t.train_evaluator("ev.toml", "ev", &["--set", &set]),
        "train.init_from (--init-from) = ",
    );
}

#[test]
fn schedule_prints_csv() {
    let t = setup();
    let o = pipeline(&["schedule", "--config", &t.p("ldm.toml")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("t,beta,alpha,alphas_cumprod")
    );
    assert_eq!(lines.count(), 100);
    let o = pipeline(&["schedule", "--config", "ldm-fmnist"]);
    assert_eq!(stdout(&o).lines().count(), 1001);
}

#[test]
fn built_in_configs_leave_no_temporary_files() {
    // a built-in name is written to a file under the temporary directory for the run (so
    // that errors name a file) and removed when the command ends, whether it succeeded or not
    let tmp = std::env::temp_dir().join(format!("ldm-tmpdir-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (args, ok) in [
        (&["schedule", "--config", "ldm-fmnist"][..], true),
        (
            &[
                "train-ldm",
                "--config",
                "ldm-animals",
                "--vae",
                "no-such-vae",
                "--out",
                "x",
            ][..],
            false,
        ),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(args)
            .env("TMPDIR", &tmp)
            .output()
            .unwrap();
        assert_eq!(o.status.success(), ok, "{args:?}: {}", stderr(&o));
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Ctrl-C (and SIGTERM) outside a training loop quits at once, with exit code 130 and the
/// built-in config's temporary files removed: `bench` here, which has no state to save (before,
/// the handler only raised a flag that nothing outside training read, and the command ran on).
#[cfg(unix)]
#[test]
fn interrupts_stop_other_commands_at_once() {
    let tmp = std::env::temp_dir().join(format!("ldm-tmpdir-int-{}", std::process::id()));
    for signal in ["-INT", "-TERM"] {
        std::fs::create_dir_all(&tmp).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args([
                "bench",
                "--config",
                "animals",
                "--rows",
                "ldm-train-dit",
                "--iters",
                "1000000",
                "--device",
                "cpu",
            ])
            .env("TMPDIR", &tmp)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        // the built-in config is resolved (written under TMPDIR) before the work starts
        while std::fs::read_dir(&tmp).unwrap().next().is_none() {
            assert!(
                start.elapsed().as_secs() < 30,
                "{signal}: bench did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        let sent = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if sent.elapsed().as_secs() >= 20 {
                child.kill().unwrap();
                panic!("{signal}: bench still running 20 s after the signal");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{signal}: {err}");
        assert!(err.contains("interrupted"), "{signal}: {err}");
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "{signal} left {left:?}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

#[test]
fn unknown_names_list_the_valid_ones() {
    let t = setup();
    assert_bad_configs(
        &t,
        &[
            (
                "kind = \"linear\"",
                "kind = \"quadratic\"",
                "unknown variant `quadratic`, expected one of `linear`, `cosine`, `scaled-linear`",
            ),
            (
                "kind = \"ddim\"",
                "kind = \"euler\"",
                "unknown variant `euler`",
            ),
            (
                "kind = \"dit\"",
                "kind = \"vit\"",
                "unknown variant `vit`, expected `unet` or `dit`",
            ),
            (
                "conditioning = \"class\"",
                "conditioning = \"class\"\nparameterization = \"score\"",
                "unknown variant `score`, expected one of `epsilon`, `sample`, `x0`, `v`, `v_prediction`",
            ),
        ],
    );
    let o = pipeline(&["generate", "--model", &t.p("nothing"), "--sampler", "euler"]);
    assert!(!o.status.success());
}

#[test]
fn bad_steps_shapes_and_vae_dirs() {
    let t = setup();
    assert_bad_configs(
        &t,
        &[
            (
                "steps = 5",
                "steps = 0",
                "steps = 0: between 1 and the 100 training timesteps",
            ),
            (
                "steps = 5",
                "steps = 101",
                "steps = 101: between 1 and the 100 training timesteps",
            ),
            ("patch_size = 2", "patch_size = 3", "dit.patch_size = 3"),
        ],
    );
    let on_vae = |vae: &str| t.train_ldm_on("ldm.toml", vae, "r", &["--device", "cpu"]);
    assert_error(&on_vae("missing"), "no such VAE run folder");
    std::fs::create_dir_all(t.path("half")).unwrap();
    std::fs::copy(t.path("vae/config.toml"), t.path("half/config.toml")).unwrap();
    assert_error(&on_vae("half"), "incomplete VAE run, vae.json is missing");
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let t = setup();
    std::fs::write(
        t.path("nan.toml"),
        TinyLdmConfig::default()
            .toml()
            .replace("grad_clip", "x")
            .replace("lr = 1e-3", "lr = 1e30\ngrad_clip = 0")
            .replace("steps = 4", "steps = 50"),
    )
    .unwrap();
    let o = t.train_ldm("nan.toml", "r", &[]);
    assert_error(&o, "the loss became non-finite");
    assert!(stderr(&o).contains("try a lower --lr"));
}

#[test]
fn a_latent_cache_of_another_vae_is_refused() {
    let t = setup();
    assert!(
        t.train_ldm("ldm.toml", "r", &["--steps", "1"])
            .status
            .success()
    );
    // Retrain the VAE with another seed: other weights, other checksum.
    assert_ok(&t.train_vae("vae.toml", "vae", &["--seed", "5"]));
    let o = t.train_ldm("ldm.toml", "r", &["--steps", "1"]);
    assert_error(&o, "this latent cache was encoded by another VAE");
    // And the trained model refuses the changed VAE.
    let o = pipeline(&[
        "generate",
        "--model",
        &t.p("r"),
        "--class",
        "top-left",
        "--out",
        &t.p("g"),
        "--device",
        "cpu",
    ]);
    assert_error(&o, "has changed since this model was trained");
}

/// `generate --precision bf16` samples with the network's weights cast to bf16 (warning on
/// burn-flex, where it is slow), records the setting, and lands close to the f32 images; the
/// default is f32, which generate.json does not mention (its files stay as before).
#[test]
fn generate_in_bf16_is_recorded_and_close_to_f32() {
    let t = setup();
    assert_ok(&t.train_ldm("ldm.toml", "r", &["--steps", "4"]));
    let generate = |out: &str, extra: &[&str]| generate_four(&t, "r", out, extra);
    assert_ok(&generate("f32", &[]));
    let o = generate("bf16", &["--precision", "bf16"]);
    assert_ok(&o);
    assert!(stderr(&o).contains("bf16\" on burn-flex"), "{}", stderr(&o));
    let record =
        |dir: &str| std::fs::read_to_string(t.path(&format!("{dir}/generate.json"))).unwrap();
    assert!(
        record("bf16").contains("\"precision\": \"bf16\""),
        "{}",
        record("bf16")
    );
    assert!(!record("f32").contains("precision"), "{}", record("f32"));
    let pixels = |dir: &str| luma(&t, &format!("{dir}/grid.png"));
    let (a, b) = (pixels("f32"), pixels("bf16"));
    assert_ne!(a, b, "bf16 changed nothing");
    let mean_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64;
    assert!(mean_diff < 1.0, "mean pixel difference {mean_diff} of 255");
    let o = generate("x", &["--precision", "f16"]);
    assert!(
        stderr(&o).starts_with(
            "error: invalid value 'f16' for '--precision <PRECISION>': expected f32 or bf16"
        ),
        "{}",
        stderr(&o)
    );
}

/// `generate --guidance-rescale PHI` rescales the guided prediction (recorded; 0 is the plain
/// guidance, byte for byte, and is not written), warns where there is no guidance to rescale,
/// and refuses a phi outside [0, 1].
#[test]
fn generate_with_guidance_rescale() {
    let t = setup();
    assert_ok(&t.train_ldm("ldm.toml", "r", &["--steps", "4"]));
    let generate = |out: &str, extra: &[&str]| generate_four(&t, "r", out, extra);
    let file = |f: &str| std::fs::read(t.path(f)).unwrap();
    for (dir, extra) in [
        ("plain", vec!["--cfg", "5"]),
        ("zero", vec!["--cfg", "5", "--guidance-rescale", "0"]),
        ("phi", vec!["--cfg", "5", "--guidance-rescale", "0.7"]),
        ("one", vec!["--cfg", "1"]),
    ] {
        let o = generate(dir, &extra);
        assert_ok(&o);
        assert!(!stderr(&o).contains("warning"), "{dir}: {}", stderr(&o));
    }
    assert_eq!(file("plain/grid.png"), file("zero/grid.png"));
    assert_eq!(file("plain/generate.json"), file("zero/generate.json"));
    assert_ne!(
        file("plain/grid.png"),
        file("phi/grid.png"),
        "phi changed nothing"
    );
    let record = String::from_utf8(file("phi/generate.json")).unwrap();
    assert!(record.contains("\"guidance_rescale\": 0.7"), "{record}");
    // At cfg 1 there is nothing to rescale: a warning, and the pixels of cfg 1 (the PNGs'
    // settings chunk records the rescale).
    let o = generate("one-phi", &["--cfg", "1", "--guidance-rescale", "0.7"]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains(
            "warning: guidance rescale 0.7 has no effect without classifier-free guidance (cfg 1)"
        ),
        "{}",
        stderr(&o)
    );
    let pixels = |f: &str| luma(&t, f);
    assert_eq!(pixels("one/grid.png"), pixels("one-phi/grid.png"));
    for bad in ["1.5", "-0.1"] {
        assert_error(
            &generate("bad", &["--guidance-rescale", bad]),
            &format!("sampler.guidance_rescale = {bad}: a number in [0, 1]"),
        );
    }
}

/// A recipe names its configs by paths relative to itself: `pipeline run` finds them from any
/// working folder (a path from the working folder, then beside the recipe, then a built-in
/// name), as `pipeline bench` does.
#[test]
fn a_recipe_finds_its_configs_beside_it() {
    let t = TinyVae::new("");
    std::fs::write(t.path("ldm.toml"), TinyLdmConfig::default().toml()).unwrap();
    let recipe = format!(
        "out = \"{}\"\nvae = \"vae.toml\"\nldm = \"ldm.toml\"\n\n[grid]\nper_class = 1\ncfg = 1.0\n",
        t.p("out")
    );
    std::fs::write(t.path("recipe.toml"), recipe).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let recipe = t.p("recipe.toml");
    let args = [
        "run",
        &recipe,
        "--vae-steps",
        "2",
        "--ldm-steps",
        "2",
        "--device",
        "cpu",
    ];
    assert_ok(&pipeline_home(elsewhere.path(), &t.path("home"), &args));
    assert!(t.path("out/grid.png").exists() && t.path("out/ldm/ldm.json").exists());
}

/// Flips the lowest bit of the first weight in a safetensors file: still valid weights, other
/// bytes.
fn alter_weights(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1;
    std::fs::write(path, bytes).unwrap();
}

/// Weights replaced after training are used with a warning, and what is recorded is the file's
/// own checksum: `generate.json` names it, and a model refuses a VAE whose weights file alone
/// was replaced (its `vae.json` unchanged).
#[test]
fn replaced_weights_are_warned_and_checked_by_their_own_checksum() {
    let t = setup();
    assert_ok(&t.train_ldm("ldm.toml", "r", &["--steps", "1"]));
    let generate = |out: &str| {
        let (model, out) = (t.p("r"), t.p(out));
        let args = [
            "generate", "--model", &model, "-n", "1", "--out", &out, "--device", "cpu",
        ];
        pipeline(&args)
    };
    let o = generate("g1");
    assert_ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    alter_weights(&t.path("r/model.safetensors"));
    let o = generate("g2");
    assert_ok(&o);
    assert!(
        stderr(&o).contains("r/model.safetensors: sha256")
            && stderr(&o).contains("that ldm.json recorded when training ended"),
        "{}",
        stderr(&o)
    );
    let record = std::fs::read_to_string(t.path("g2/generate.json")).unwrap();
    let sha = t.sha("r/model.safetensors");
    assert!(
        record.contains(&format!("\"model_sha256\": \"{sha}\"")),
        "{record}"
    );
    alter_weights(&t.path("vae/model.safetensors"));
    let o = generate("g3");
    assert!(
        stderr(&o).contains("that vae.json recorded"),
        "{}",
        stderr(&o)
    );
    assert_error(&o, "has changed since this model was trained");
}

/// Cosine with T = 100 ends at alphas_cumprod = 2.4e-7: trailing spacing starts there, and an
/// epsilon model's x0 estimate multiplies its error by 2000.
#[test]
fn an_ill_conditioned_start_is_warned_and_clip_x0_bounds_it() {
    let t = setup();
    let o = t.train_ldm("ldm.toml", "cos", &["--set", "schedule.kind=cosine"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = |out: &str, extra: &[&str]| {
        let (m, o) = (t.p("cos"), t.p(out));
        let mut args = vec![
            "generate", "--model", &m, "--class", "top-left", "-n", "2", "--out", &o, "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let output = pipeline(&args);
        assert!(output.status.success(), "{extra:?}: {}", stderr(&output));
        stderr(&output)
    };
    let warning = "warning: an epsilon model starting at t = 99";
    let e = run("plain", &[]);
    assert!(e.contains(warning) && e.contains("--clip-x0 3"), "{e}");
    assert!(!run("leading", &["--spacing", "leading"]).contains("warning"));
    assert!(!run("clipped", &["--clip-x0", "3"]).contains("warning"));
    let sha = |f: &str| ldm_common::checkpoint::sha256_file(&t.path(f)).unwrap();
    assert_ne!(
        sha("plain/000.png"),
        sha("clipped/000.png"),
        "clipping changed nothing"
    );
    let record = std::fs::read_to_string(t.path("clipped/generate.json")).unwrap();
    assert!(record.contains("\"clip_x0\": 3.0"), "{record}");
}

#[test]
fn generate_bad_inputs() {
    let t = setup();
    assert!(t.train_ldm("ldm.toml", "ldm", &[]).status.success());
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", "M", "--out", "O", "--device", "cpu"];
        let (m, o) = (t.p("ldm"), t.p("g"));
        args[2] = &m;
        args[4] = &o;
        args.extend_from_slice(extra);
        pipeline(&args)
    };
    assert_error(
        &run(&["--class", "giraffe"]),
        "--class giraffe: unknown class; valid classes: top-left, top-right, bottom-left, bottom-right",
    );
    assert_error(
        &run(&["--prompt", "a giraffe"]),
        "names none of its classes (top-left, top-right, bottom-left, bottom-right)",
    );
    assert_error(&run(&["-n", "0"]), "-n 0: expected at least one image");
    assert_error(&run(&["--steps", "0"]), "--steps 0: expected 1 to 100");
    assert_error(&run(&["--steps", "101"]), "--steps 101: expected 1 to 100");
    assert_error(
        &run(&["--prompt", "", "--cfg", "5"]),
        "--cfg 5 with an empty prompt",
    );
    assert_error(
        &run(&["--sampler", "euler", "--class", "top-left"]),
        "sampler = euler: one of ddpm, ddim, plms, dpm-solver++, unipc, heun, langevin",
    );
    assert_error(
        &run(&["--spacing", "middle"]),
        "sampler.spacing = middle: one of leading, trailing, linspace, karras",
    );
    assert_error(
        &run(&["--clip-x0", "0"]),
        "sampler.clip_x0 = 0: a positive number",
    );
    // A finished run of another kind is named as such, not as an interrupted LDM run.
    let vae = t.p("vae");
    assert_error(
        &pipeline(&["generate", "--model", &vae, "--device", "cpu"]),
        "vae: a VAE run folder (vae.json) where an LDM run folder was expected (one made by `pipeline train-ldm`)",
    );
    let ldm = t.p("ldm");
    assert_error(
        &pipeline(&["eval-vae", "--vae", &ldm, "--device", "cpu"]),
        "ldm: an LDM run folder (ldm.json) where a VAE run folder was expected",
    );
    // A negative number is a value to check, not a flag clap does not know.
    assert_error(
        &run(&["--eta", "-1"]),
        "sampler.eta = -1: a number in [0, 1]",
    );
    let o = run(&["--seed", "-1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).starts_with("error: invalid value '-1' for '--seed <SEED>'"),
        "{}",
        stderr(&o)
    );
    std::fs::write(
        t.path("u.toml"),
        TinyLdmConfig {
            conditioning: "none",
            ..Default::default()
        }
        .toml(),
    )
    .unwrap();
    assert!(t.train_ldm("u.toml", "u", &[]).status.success());
    let o = pipeline(&[
        "generate",
        "--model",
        &t.p("u"),
        "--prompt",
        "cat",
        "--out",
        &t.p("g"),
        "--device",
        "cpu",
    ]);
    assert_error(
        &o,
        "was trained unconditionally: it cannot follow --prompt or --class",
    );
    let o = pipeline(&[
        "generate",
        "--model",
        &t.p("u"),
        "-n",
        "2",
        "--out",
        &t.p("gu"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o2 = pipeline_home(
        &std::env::temp_dir(),
        &t.path("empty-home"),
        &["generate", "--prompt", "cat"],
    );
    assert_error(&o2, "no --model given and no default model recorded");
}

#[test]
fn evaluator_scores_a_model_and_refuses_bad_requests() {
    let t = setup();
    assert!(t.train_ldm("ldm.toml", "ldm", &[]).status.success());
    std::fs::write(
        t.path("ev.toml"),
        tiny_evaluator_config(&t.path("data"), 4, TINY_EVALUATOR_TRAIN),
    )
    .unwrap();
    let o = t.train_evaluator("ev.toml", "ev", &[]);
    assert_ok(&o);
    assert!(stdout(&o).contains("held-out accuracy"), "{}", stdout(&o));
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            "M",
            "--evaluator",
            "E",
            "--device",
            "cpu",
            "--steps",
            "3",
        ];
        let (m, e) = (t.p("ldm"), t.p("ev"));
        args[2] = &m;
        args[4] = &e;
        args.extend_from_slice(extra);
        pipeline(&args)
    };
    let o = eval(&["-n", "3", "--json", &t.p("eval.json")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("eval.json")).unwrap()).unwrap();
    assert_eq!(e["accuracy_per_class"].as_array().unwrap().len(), 4);
    let acc = e["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(e["fid"].as_f64().unwrap().is_finite() && e["fid_floor"].as_f64().unwrap().is_finite());
    assert!(e["kid"].as_f64().unwrap().is_finite() && e["kid_floor"].as_f64().unwrap().is_finite());
    // 4 classes x 1 image = 4 samples for 4 feature dimensions: FID is undefined.
    assert_error(
        &eval(&["-n", "1"]),
        "FID needs more samples than feature dimensions: got n = 4 for d = 4",
    );
    let eval_with = |evaluator: &str| {
        pipeline(&[
            "eval",
            "--model",
            &t.p("ldm"),
            "--evaluator",
            &t.p(evaluator),
            "--device",
            "cpu",
        ])
    };
    let o = eval_with("none");
    assert_error(&o, "no such trained evaluator folder");
    assert_error(&o, "pipeline train-evaluator");
    // An evaluator of another recipe (other classes).
    let other = t.path("other");
    write_tiny_idx(&other, 32);
    std::fs::write(other.join("classes.txt"), "n\ne\ns\nw\n").unwrap();
    std::fs::write(
        t.path("ev2.toml"),
        tiny_evaluator_config(&other, 4, TINY_EVALUATOR_TRAIN),
    )
    .unwrap();
    assert_ok(&t.train_evaluator("ev2.toml", "ev2", &[]));
    assert_error(&eval_with("ev2"), "was trained on another recipe");
}
