//! `pipeline train-vae` and `pipeline eval-vae` end to end on small data, and every bad input
//! the VAE issue names: one `error:` line, a non-zero exit, no panic, nothing lost.

mod common;

use common::*;

/// A relative `data.dir` that is not there from the working folder is read from the per-user
/// folder (`$PIPELINE_HOME`), where `scripts/install_data.sh` copies Animal-MNIST: the built-in
/// configs' `data/animal-mnist` trains from any folder. Where it is in neither, the error
/// names both.
#[test]
fn a_relative_data_folder_is_found_in_the_per_user_folder() {
    let t = tempfile::tempdir().unwrap();
    let (home, work) = (t.path().join("home"), t.path().join("work"));
    std::fs::create_dir_all(&work).unwrap();
    write_tiny_idx(&home.join("data/tiny"), 64);
    let config = t.path().join("vae.toml");
    std::fs::write(
        &config,
        tiny_vae_config(std::path::Path::new("data/tiny"), ""),
    )
    .unwrap();
    let (config, out) = (config.display().to_string(), t.path().join("run"));
    let out = out.display().to_string();
    let args = [
        "train-vae",
        "--config",
        &config,
        "--out",
        &out,
        "--device",
        "cpu",
        "--steps",
        "1",
    ];
    assert_ok(&pipeline_home(&work, &home, &args));
    let empty = t.path().join("empty-home");
    assert_error(
        &pipeline_home(&work, &empty, &args),
        &format!(
            "data/tiny: data set folder not found, neither in the working folder nor under {}",
            empty.display()
        ),
    );
}

#[test]
fn trains_evaluates_and_writes_a_complete_run_folder() {
    let t = TinyVae::new("");
    let out = t.p("run");
    let o = t.train_vae("vae.toml", "run", &[]);
    assert_ok(&o);
    assert!(stdout(&o).contains("latent scale factor"), "{}", stdout(&o));
    for file in [
        "config.toml",
        "model.safetensors",
        "vae.json",
        "metrics.csv",
        "samples/step-000002.png",
        "samples/step-000004.png",
        "checkpoint/state.json",
    ] {
        assert!(t.path("run").join(file).exists(), "missing {file}");
    }
    let csv = std::fs::read_to_string(t.path("run/metrics.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("step,recon,kl,loss,lr,images_per_s"));
    assert_eq!(lines.count(), 4);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("run/vae.json")).unwrap()).unwrap();
    let scale = info["latent_scale"].as_f64().unwrap();
    assert!(scale.is_finite() && scale > 0.0);
    assert_eq!(info["latent_shape"], serde_json::json!([2, 8, 8]));
    assert_eq!(info["class_names"][1], "top-right");

    let o = pipeline(&[
        "eval-vae",
        "--vae",
        &out,
        "--device",
        "cpu",
        "--json",
        &t.p("eval.json"),
    ]);
    assert_ok(&o);
    assert!(stdout(&o).contains("held-out PSNR"), "{}", stdout(&o));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("eval.json")).unwrap()).unwrap();
    assert_eq!(e["images"], 16);
    assert!(e["psnr_db"].as_f64().unwrap() > 3.0);
}

#[test]
fn resume_continues_exactly_where_the_run_stopped() {
    let t = TinyVae::new("");
    assert_ok(&t.train_vae("vae.toml", "a", &[]));
    assert_ok(&t.train_vae("vae.toml", "b", &["--steps", "2"]));
    assert_ok(&t.train_vae("vae.toml", "b", &["--resume"]));
    let losses = |run: &str| -> Vec<String> {
        std::fs::read_to_string(t.path(run).join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(
        losses("a"),
        losses("b"),
        "the resumed run saw other batches or optimizer state"
    );
    // With warm-up 1, steps 0-1 have the same learning rate under a 2-step and a 4-step
    // schedule, so the resumed run must end with exactly the weights of the straight one.
    assert_eq!(
        t.sha("a/model.safetensors"),
        t.sha("b/model.safetensors"),
        "resumed weights differ from the uninterrupted run"
    );
}

#[test]
fn missing_dataset_says_how_to_install_it() {
    let t = TinyVae::new("");
    let o = pipeline(&[
        "train-vae",
        "--data",
        "/nonexistent/fmnist",
        "--out",
        &t.p("r"),
        "--device",
        "cpu",
    ]);
    assert_error(
        &o,
        "/nonexistent/fmnist: data set folder not found: install it with `bash scripts/install_data.sh`",
    );
}

#[test]
fn truncated_and_non_idx_files_are_named() {
    let t = TinyVae::new("");
    let images = t.path("data/train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() / 2]).unwrap();
    let train = || t.train_vae("vae.toml", "r", &[]);
    assert_error(
        &train(),
        "train-images-idx3-ubyte.gz: not a valid gzip file",
    );
    std::fs::write(&images, b"this is not an IDX file at all").unwrap();
    assert_error(
        &train(),
        "train-images-idx3-ubyte.gz: not an IDX u8 file with 3 dimensions",
    );
}

fn image_folder_config(dir: &std::path::Path) -> String {
    format!(
        "[data]\nsource = \"image-folder\"\ndir = \"{}\"\nresolution = 16\nchannels = 3\nheld_out_fraction = 0.25\n\n[vae]\nbase_channels = 8\ngroups = 4\nlatent_channels = 2\n\n[train]\nsteps = 2\nbatch_size = 4\nlog_every = 1\n",
        dir.display()
    )
}

#[test]
fn trains_on_an_image_folder_with_captions() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("imgs");
    for (class, color) in [("cat", [200u8, 120, 40]), ("dog", [30, 90, 220])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..6u32 {
            let img = image::RgbImage::from_fn(24 + i, 20, |x, y| {
                let on = (x + y + i) % 7 < 3;
                image::Rgb(if on { color } else { [10, 10, 10] })
            });
            img.save(data.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(
        data.join("captions.jsonl"),
        "{\"file\": \"cat/0.png\", \"caption\": \"a cat\"}\n",
    )
    .unwrap();
    let cfg = t.path().join("c.toml");
    std::fs::write(&cfg, image_folder_config(&data)).unwrap();
    let out = t.path().join("run");
    let o = pipeline(&[
        "train-vae",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_ok(&o);
    let info = std::fs::read_to_string(out.join("vae.json")).unwrap();
    assert!(
        info.contains("\"cat\"") && info.contains("\"dog\""),
        "{info}"
    );
    assert!(info.contains("16"), "{info}");
}

#[test]
fn empty_image_folder_and_unreadable_image() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("imgs");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = t.path().join("c.toml");
    std::fs::write(&cfg, image_folder_config(&data)).unwrap();
    let run = |out: &str| {
        pipeline(&[
            "train-vae",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            t.path().join(out).to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    assert_error(&run("a"), "no class subfolders");
    std::fs::create_dir_all(data.join("cat")).unwrap();
    assert_error(&run("b"), "no training images found");
    std::fs::write(data.join("cat/broken.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    assert_error(&run("c"), "cat/broken.png: unreadable image");
}

#[test]
fn config_errors_name_the_key() {
    let t = TinyVae::new("");
    let base = std::fs::read_to_string(t.path("vae.toml")).unwrap();
    for (from, to, needles) in [
        (
            "[vae]",
            "[vae]\nlatent_chanels = 3",
            &["bad.toml: line", "unknown field `latent_chanels`"][..],
        ),
        (
            "batch_size = 8",
            "batch_size = \"eight\"",
            &["invalid type: string \"eight\", expected usize"],
        ),
        (
            "downsample_factor = 4",
            "downsample_factor = 3",
            &["vae.downsample_factor = 3: expected a power of two"],
        ),
        (
            "resolution = 32",
            "resolution = 34",
            &["vae.downsample_factor = 4: expected a divisor of the image resolution 34"],
        ),
    ] {
        std::fs::write(t.path("bad.toml"), base.replace(from, to)).unwrap();
        let o = t.train_vae("bad.toml", "r", &[]);
        for needle in needles {
            assert_error(&o, needle);
        }
    }
    let o = t.train_vae_on("nope.toml", "r", &[]);
    assert_error(&o, "nope.toml: no such file, and not a built-in config");
}

#[test]
fn zero_or_negative_steps_and_batch_size_are_refused() {
    let t = TinyVae::new("");
    for (flag, value) in [
        ("--batch-size", "0"),
        ("--batch-size", "-4"),
        ("--steps", "0"),
        ("--steps", "-1"),
    ] {
        let o = t.train_vae_on("vae.toml", "r", &[flag, value]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag}"))
                && err.contains("expected a positive integer"),
            "{err}"
        );
    }
    std::fs::write(
        t.path("zero.toml"),
        std::fs::read_to_string(t.path("vae.toml"))
            .unwrap()
            .replace("steps = 4", "steps = 0"),
    )
    .unwrap();
    let o = t.train_vae("zero.toml", "r", &[]);
    assert_error(&o, "train.steps = 0 (--steps): expected at least 1");
}

#[test]
fn unwritable_output_folder_is_named() {
    let t = TinyVae::new("");
    std::fs::write(t.path("afile"), b"").unwrap();
    let out = t.p("afile/run");
    let o = t.train_vae("vae.toml", "afile/run", &[]);
    assert_error(&o, &out);
    // The I/O error's message once, not again as its source.
    assert_eq!(stderr(&o).matches("(os error").count(), 1, "{}", stderr(&o));
    let o = t.train_vae("vae.toml", "afile", &[]);
    assert_error(
        &o,
        &format!(
            "{}: a file, where an output folder was expected",
            t.p("afile")
        ),
    );
}

#[test]
fn resume_from_another_architecture_is_refused() {
    let t = TinyVae::new("");
    assert_ok(&t.train_vae("vae.toml", "r", &["--steps", "2"]));
    std::fs::write(
        t.path("wider.toml"),
        std::fs::read_to_string(t.path("vae.toml"))
            .unwrap()
            .replace("base_channels = 8", "base_channels = 16"),
    )
    .unwrap();
    let o = t.train_vae("wider.toml", "r", &["--resume"]);
    assert_error(&o, "vae.base_channels = 16 (the run has 8)");
    let o = t.train_vae("vae.toml", "fresh", &["--resume"]);
    assert_error(&o, "--resume: no checkpoint in");
}

#[test]
fn cuda_without_the_tch_build_is_explained() {
    let t = TinyVae::new("");
    let o = t.train_vae_on("vae.toml", "r", &["--device", "cuda"]);
    if cfg!(feature = "tch") {
        return;
    }
    assert_error(
        &o,
        "--device cuda:0: this build has no libtorch/CUDA backend; rebuild with `cargo build --release -p ldm-pipeline --features tch`",
    );
}

#[test]
fn eval_vae_on_an_incomplete_run_says_what_is_missing() {
    let t = TinyVae::new("");
    std::fs::create_dir_all(t.path("half")).unwrap();
    std::fs::write(t.path("half/config.toml"), "").unwrap();
    let o = pipeline(&["eval-vae", "--vae", &t.p("half"), "--device", "cpu"]);
    assert_error(&o, "incomplete VAE run, vae.json is missing");
    let o = pipeline(&["eval-vae", "--vae", &t.p("nothing"), "--device", "cpu"]);
    assert_error(&o, "no such VAE run folder");
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let t = TinyVae::new("");
    let cfg = t.path("long.toml");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(t.path("vae.toml"))
            .unwrap()
            .replace("steps = 4", "steps = 100000")
            .replace("checkpoint_every = 2", "checkpoint_every = 100000"),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args([
            "train-vae",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            &t.p("r"),
            "--device",
            "cpu",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let csv = t.path("r/metrics.csv");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&csv)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 4
    {
        assert!(start.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("r/checkpoint/state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 3, "{state}");
    let steps = (step + 2).to_string();
    let o = t.train_vae("vae.toml", "r", &["--resume", "--steps", &steps]);
    assert_ok(&o);
    assert!(t.path("r/model.safetensors").exists());
}

/// `train.precision = "bf16"`: the run trains (forward and backward in bf16), records the key,
/// publishes f32 weights (the master copy), and ends near the f32 run's loss; stages without
/// mixed precision refuse the key, and an unknown precision is named.
#[test]
fn mixed_precision_trains_f32_weights_and_is_refused_where_unsupported() {
    let t = TinyVae::new("");
    assert_ok(&t.train_vae("vae.toml", "f32", &[]));
    // on burn-flex (`train_vae` passes `--device cpu`, burn-flex in every build), with a
    // warning that it is the slow path there
    let o = t.train_vae("vae.toml", "bf16", &["--set", "train.precision=bf16"]);
    assert_ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("warning: train.precision = \"bf16\" on burn-flex"),
        "{stderr}"
    );
    let config = std::fs::read_to_string(t.path("bf16/config.toml")).unwrap();
    assert!(config.contains("precision = \"bf16\""), "{config}");

    // every tensor of the published weights is f32 (safetensors: u64 header length, JSON)
    let bytes = std::fs::read(t.path("bf16/model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let dtypes: Vec<&str> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap())
        .collect();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|&d| d == "F32"),
        "{dtypes:?}"
    );

    let last_loss = |run: &str| *metrics(&t.path(run))["loss"].last().unwrap();
    let (full, mixed) = (last_loss("f32"), last_loss("bf16"));
    assert!(full != mixed, "identical losses: nothing ran in bf16");
    assert!(
        (full - mixed).abs() <= 0.05 * full,
        "f32 loss {full}, bf16 loss {mixed}"
    );

    let evaluator = tiny_evaluator_config(&t.path("data"), 4, "steps = 2\nbatch_size = 8\n");
    std::fs::write(t.path("ev.toml"), evaluator).unwrap();
    let o = t.train_evaluator("ev.toml", "ev", &["--set", "train.precision=bf16"]);
    assert_error(
        &o,
        "train.precision = \"bf16\": train-evaluator trains in f32 only",
    );
    let o = t.train_vae("vae.toml", "f16", &["--set", "train.precision=f16"]);
    assert_error(&o, "unknown variant `f16`, expected `f32` or `bf16`");
}
