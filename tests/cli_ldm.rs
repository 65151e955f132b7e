//! `train-ldm`, `eval-ldm`, `schedule` and `generate` end to end on a tiny VAE and DiT, and
//! the bad inputs of the diffusion and generation issues.

mod common;

use common::*;

/// A tiny class-conditional LDM config (DiT with 2x2 patches on 8x8x2 latents).
fn ldm_config(extra: &str) -> String {
    format!(
        r#"
[schedule]
kind = "linear"
num_timesteps = 100

[diffusion]
conditioning = "class"
ema_decay = 0.9

[backbone]
kind = "dit"
patch_size = 2
hidden_size = 32
depth = 1
num_heads = 2

[sampler]
kind = "ddim"
steps = 5

[train]
steps = 4
batch_size = 8
lr = 1e-3
warmup_steps = 1
log_every = 1
sample_every = 2
checkpoint_every = 2
{extra}
"#
    )
}

/// A tiny VAE run in `vae/` and an LDM config in `ldm.toml`.
fn setup() -> TinyVae {
    let t = TinyVae::new("");
    let o = pipeline(&[
        "train-vae",
        "--config",
        &t.p("vae.toml"),
        "--out",
        &t.p("vae"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(t.path("ldm.toml"), ldm_config("")).unwrap();
    t
}

fn train_ldm(t: &TinyVae, config: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train-ldm",
        "--config",
        config,
        "--vae",
        "VAE",
        "--out",
        out,
        "--device",
        "cpu",
    ];
    let vae = t.p("vae");
    args[4] = &vae;
    args.extend_from_slice(extra);
    pipeline(&args)
}

#[test]
fn train_generate_evaluate() {
    let t = setup();
    let o = train_ldm(&t, &t.p("ldm.toml"), &t.p("ldm"), &[]);
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
    for sampler in ["ddpm", "ddim", "dpm-solver++", "heun", "langevin"] {
        let o = generate(
            &t.p(&format!("s-{sampler}")),
            &["--sampler", sampler, "--steps", "4"],
        );
        assert!(o.status.success(), "{sampler}: {}", stderr(&o));
    }
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
    let pixels = |f: &str| image::open(t.path(f)).unwrap().to_luma8().into_raw();
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
    assert!(
        train_ldm(&t, &t.p("ldm.toml"), &t.p("a"), &[])
            .status
            .success()
    );
    assert!(
        train_ldm(&t, &t.p("ldm.toml"), &t.p("b"), &["--steps", "2"])
            .status
            .success()
    );
    let o = train_ldm(&t, &t.p("ldm.toml"), &t.p("b"), &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sha = |run: &str| {
        ldm_common::checkpoint::sha256_file(&t.path(run).join("model.safetensors")).unwrap()
    };
    assert_eq!(
        sha("a"),
        sha("b"),
        "resumed EMA weights differ from the uninterrupted run"
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
fn unknown_names_list_the_valid_ones() {
    let t = setup();
    let base = ldm_config("");
    for (from, to, needle) in [
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
    ] {
        std::fs::write(t.path("bad.toml"), base.replace(from, to)).unwrap();
        let o = train_ldm(&t, &t.p("bad.toml"), &t.p("r"), &[]);
        assert_error(&o, needle);
    }
    let o = pipeline(&["generate", "--model", &t.p("nothing"), "--sampler", "euler"]);
    assert!(!o.status.success());
}

#[test]
fn bad_steps_shapes_and_vae_dirs() {
    let t = setup();
    std::fs::write(
        t.path("bad.toml"),
        ldm_config("").replace("steps = 5", "steps = 0"),
    )
    .unwrap();
    assert_error(
        &train_ldm(&t, &t.p("bad.toml"), &t.p("r"), &[]),
        "steps = 0: between 1 and the 100 training timesteps",
    );
    std::fs::write(
        t.path("bad.toml"),
        ldm_config("").replace("steps = 5", "steps = 101"),
    )
    .unwrap();
    assert_error(
        &train_ldm(&t, &t.p("bad.toml"), &t.p("r"), &[]),
        "steps = 101: between 1 and the 100 training timesteps",
    );
    std::fs::write(
        t.path("bad.toml"),
        ldm_config("").replace("patch_size = 2", "patch_size = 3"),
    )
    .unwrap();
    assert_error(
        &train_ldm(&t, &t.p("bad.toml"), &t.p("r"), &[]),
        "dit.patch_size = 3",
    );
    let o = pipeline(&[
        "train-ldm",
        "--config",
        &t.p("ldm.toml"),
        "--vae",
        &t.p("missing"),
        "--out",
        &t.p("r"),
        "--device",
        "cpu",
    ]);
    assert_error(&o, "no such VAE run folder");
    std::fs::create_dir_all(t.path("half")).unwrap();
    std::fs::copy(t.path("vae/config.toml"), t.path("half/config.toml")).unwrap();
    let o = pipeline(&[
        "train-ldm",
        "--config",
        &t.p("ldm.toml"),
        "--vae",
        &t.p("half"),
        "--out",
        &t.p("r"),
        "--device",
        "cpu",
    ]);
    assert_error(&o, "incomplete VAE run, vae.json is missing");
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let t = setup();
    std::fs::write(
        t.path("nan.toml"),
        ldm_config("")
            .replace("grad_clip", "x")
            .replace("lr = 1e-3", "lr = 1e30\ngrad_clip = 0")
            .replace("steps = 4", "steps = 50"),
    )
    .unwrap();
    let o = train_ldm(&t, &t.p("nan.toml"), &t.p("r"), &[]);
    assert_error(&o, "the loss became non-finite");
    assert!(stderr(&o).contains("try a lower --lr"));
}

#[test]
fn a_latent_cache_of_another_vae_is_refused() {
    let t = setup();
    assert!(
        train_ldm(&t, &t.p("ldm.toml"), &t.p("r"), &["--steps", "1"])
            .status
            .success()
    );
    // Retrain the VAE with another seed: other weights, other checksum.
    let o = pipeline(&[
        "train-vae",
        "--config",
        &t.p("vae.toml"),
        "--out",
        &t.p("vae"),
        "--device",
        "cpu",
        "--seed",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train_ldm(&t, &t.p("ldm.toml"), &t.p("r"), &["--steps", "1"]);
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

#[test]
fn generate_bad_inputs() {
    let t = setup();
    assert!(
        train_ldm(&t, &t.p("ldm.toml"), &t.p("ldm"), &[])
            .status
            .success()
    );
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
        "sampler = euler: one of ddpm, ddim, dpm-solver++, heun, langevin",
    );
    std::fs::write(
        t.path("u.toml"),
        ldm_config("").replace("conditioning = \"class\"", "conditioning = \"none\""),
    )
    .unwrap();
    assert!(
        train_ldm(&t, &t.p("u.toml"), &t.p("u"), &[])
            .status
            .success()
    );
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
    let o2 = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["generate", "--prompt", "cat"])
        .env("PIPELINE_HOME", t.path("empty-home"))
        .output()
        .unwrap();
    assert_error(&o2, "no --model given and no default model recorded");
}

fn evaluator_config(data: &std::path::Path, feature_dim: usize) -> String {
    format!(
        "[data]\nsource = \"idx\"\ndir = \"{}\"\n\n[evaluator]\nchannels = [8, 8]\npool_size = 2\nfeature_dim = {feature_dim}\n\n[train]\nsteps = 6\nbatch_size = 16\nlr = 3e-3\nwarmup_steps = 1\nlog_every = 2\n",
        data.display()
    )
}

#[test]
fn evaluator_scores_a_model_and_refuses_bad_requests() {
    let t = setup();
    assert!(
        train_ldm(&t, &t.p("ldm.toml"), &t.p("ldm"), &[])
            .status
            .success()
    );
    std::fs::write(t.path("ev.toml"), evaluator_config(&t.path("data"), 4)).unwrap();
    let o = pipeline(&[
        "train-evaluator",
        "--config",
        &t.p("ev.toml"),
        "--out",
        &t.p("ev"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
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
    // 4 classes x 1 image = 4 samples for 4 feature dimensions: FID is undefined.
    assert_error(
        &eval(&["-n", "1"]),
        "FID needs more samples than feature dimensions: got n = 4 for d = 4",
    );
    assert_error(
        &pipeline(&[
            "eval",
            "--model",
            &t.p("ldm"),
            "--evaluator",
            &t.p("none"),
            "--device",
            "cpu",
        ]),
        "no such trained evaluator folder",
    );
    assert_error(
        &pipeline(&[
            "eval",
            "--model",
            &t.p("ldm"),
            "--evaluator",
            &t.p("none"),
            "--device",
            "cpu",
        ]),
        "pipeline train-evaluator",
    );
    // An evaluator of another recipe (other classes).
    let other = t.path("other");
    write_tiny_idx(&other, 32);
    std::fs::write(other.join("classes.txt"), "n\ne\ns\nw\n").unwrap();
    std::fs::write(t.path("ev2.toml"), evaluator_config(&other, 4)).unwrap();
    assert!(
        pipeline(&[
            "train-evaluator",
            "--config",
            &t.p("ev2.toml"),
            "--out",
            &t.p("ev2"),
            "--device",
            "cpu"
        ])
        .status
        .success()
    );
    let o = pipeline(&[
        "eval",
        "--model",
        &t.p("ldm"),
        "--evaluator",
        &t.p("ev2"),
        "--device",
        "cpu",
    ]);
    assert_error(&o, "was trained on another recipe");
}
