//! Evaluation tooling end to end: `train-evaluator` (deterministic), `eval` with per-class
//! FID, `plot` of any run's metrics.csv and `plot-sweep` of eval JSON files, with their
//! bad inputs.

mod common;

use std::path::Path;

use common::*;

/// The size of a PNG file, after a full decode.
fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

/// Number of distinct colours in a PNG: a blank canvas has one.
fn colours(path: &Path) -> usize {
    let img = image::open(path).unwrap().to_rgb8();
    let mut seen: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// A tiny evaluator trained on `n` images in `dir/<out>`.
fn train_evaluator(dir: &Path, n: usize, feature_dim: usize, out: &str) -> std::process::Output {
    if !dir.join("data").exists() {
        write_tiny_idx(&dir.join("data"), n);
    }
    std::fs::write(
        dir.join("ev.toml"),
        tiny_evaluator_config(&dir.join("data"), feature_dim, TINY_EVALUATOR_TRAIN),
    )
    .unwrap();
    pipeline(&[
        "train-evaluator",
        "--config",
        &dir.join("ev.toml").display().to_string(),
        "--out",
        &dir.join(out).display().to_string(),
        "--device",
        "cpu",
    ])
}

#[test]
fn train_evaluator_is_deterministic_and_plot_draws_its_curves() {
    let t = tempfile::tempdir().unwrap();
    let o = train_evaluator(t.path(), 64, 4, "ev");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(train_evaluator(t.path(), 64, 4, "ev2").status.success());
    let sha = |f: &str| ldm_common::checkpoint::sha256_file(&t.path().join(f)).unwrap();
    assert_eq!(sha("ev/model.safetensors"), sha("ev2/model.safetensors"));

    // step,loss,accuracy,lr,images_per_s: 4 panels, 2 x 2 of 560 x 340
    let o = pipeline(&["plot", &t.path().join("ev").display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let png = t.path().join("ev/metrics.png");
    assert!(
        stdout(&o).contains("metrics.png (1120x680)"),
        "{}",
        stdout(&o)
    );
    assert_eq!(png_size(&png), (1120, 680));
    assert!(colours(&png) > 20, "the plot looks blank");

    // --out, and a run with other columns (a VAE-like csv, 3 panels: 2 x 2 grid)
    let run = t.path().join("vae-like");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("metrics.csv"),
        "step,recon,kl,loss\n10,0.5,3.0,0.6\n20,0.3,3.2,0.4\n30,0.2,3.1,0.3\n",
    )
    .unwrap();
    let out = t.path().join("curves.png");
    let o = pipeline(&[
        "plot",
        &run.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out), (1120, 680));
    // a single metric: one panel
    std::fs::write(run.join("metrics.csv"), "step,loss\n1,0.9\n").unwrap();
    assert!(
        pipeline(&["plot", &run.display().to_string()])
            .status
            .success()
    );
    assert_eq!(png_size(&run.join("metrics.png")), (560, 340));
}

#[test]
fn plot_refuses_bad_input_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let p = |rel: &str| t.path().join(rel).display().to_string();
    assert_error(&pipeline(&["plot", &p("nope")]), "nope: no such run folder");
    std::fs::create_dir_all(t.path().join("run")).unwrap();
    assert_error(
        &pipeline(&["plot", &p("run")]),
        "metrics.csv: not found; expected the metrics.csv of a training run",
    );
    let csv = t.path().join("run/metrics.csv");
    std::fs::write(&csv, "").unwrap();
    assert_error(&pipeline(&["plot", &p("run")]), "metrics.csv: empty");
    std::fs::write(&csv, "step,loss\n").unwrap();
    assert_error(&pipeline(&["plot", &p("run")]), "no rows yet");
    std::fs::write(&csv, "step,loss\n1,0.5\n2\n").unwrap();
    assert_error(
        &pipeline(&["plot", &p("run")]),
        "metrics.csv: line 3: 1 values for the 2 columns",
    );
    std::fs::write(&csv, "step,loss\n1,0.5\n2,0.4\n3,oops\n").unwrap();
    assert_error(
        &pipeline(&["plot", &p("run")]),
        "line 4: column `loss` holds `oops`, not a number",
    );
    // an output under a regular file cannot be written
    std::fs::write(&csv, "step,loss\n1,0.5\n").unwrap();
    assert_error(
        &pipeline(&["plot", &p("run"), "--out", &p("run/metrics.csv/x.png")]),
        "metrics.csv",
    );
}

#[test]
fn plot_sweep_draws_fid_and_accuracy_and_prints_a_table() {
    let t = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    // Files before the Karras spacing have no `spacing`: trailing. Karras points form a line
    // of their own.
    for (steps, fid, acc, spacing) in [
        (10, 40.0, 0.5, ""),
        (50, 20.0, 0.7, r#", "spacing": "trailing""#),
        (20, 30.0, 0.6, ""),
        (10, 35.0, 0.55, r#", "spacing": "karras""#),
    ] {
        let path = t.path().join(format!("s{steps}{}.json", spacing.len()));
        let json = format!(
            r#"{{"per_class": 10, "cfg": 3.0, "sampler": {{"kind": "ddim", "steps": {steps}, "eta": 0.0{spacing}}},
            "accuracy": {acc}, "fid": {fid}, "fid_floor": 2.5, "precision": 0.5, "recall": 0.4,
            "images_per_second": 12.0, "accuracy_per_class": []}}"#
        );
        std::fs::write(&path, json).unwrap();
        files.push(path.display().to_string());
    }
    let out = t.path().join("sweep.png").display().to_string();
    let mut args = vec!["plot-sweep", "--x", "steps", "--out", &out];
    args.extend(files.iter().map(String::as_str));
    let o = pipeline(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(Path::new(&out)), (1120, 340));
    let table = stdout(&o);
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ddim")).collect();
    assert_eq!(
        rows,
        [
            "| ddim | 10 | 3 | 10 | 50.0% | 40.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
            "| ddim | 20 | 3 | 10 | 60.0% | 30.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
            "| ddim | 50 | 3 | 10 | 70.0% | 20.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
            "| ddim karras | 10 | 3 | 10 | 55.0% | 35.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
        ]
    );
    std::fs::write(t.path().join("bad.json"), "{\"fid\": 1}").unwrap();
    assert_error(
        &pipeline(&[
            "plot-sweep",
            "--x",
            "cfg",
            "--out",
            &out,
            &t.path().join("bad.json").display().to_string(),
        ]),
        "bad.json: not an eval JSON written by `pipeline eval --json`",
    );
}

/// `--x rescale` sweeps the guidance rescale (files without the key are phi 0); a cfg sweep
/// keeps rescaled and plain points on lines of their own.
#[test]
fn plot_sweep_over_guidance_rescale() {
    let t = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (cfg, phi, fid) in [
        (5.0, 0.7, 30.0),
        (5.0, 0.0, 40.0),
        (5.0, 0.35, 35.0),
        (3.0, 0.7, 25.0),
    ] {
        let path = t.path().join(format!("c{cfg}-r{phi}.json"));
        let rescale = if phi > 0.0 {
            format!(r#", "guidance_rescale": {phi}"#)
        } else {
            String::new()
        };
        let json = format!(
            r#"{{"per_class": 10, "cfg": {cfg}, "sampler": {{"kind": "ddim", "steps": 50{rescale}}},
            "accuracy": 0.9, "fid": {fid}, "fid_floor": 2.5, "precision": 0.5, "recall": 0.4,
            "images_per_second": 12.0}}"#
        );
        std::fs::write(&path, json).unwrap();
        files.push(path.display().to_string());
    }
    let out = t.path().join("sweep.png").display().to_string();
    let sweep = |x: &str| {
        let mut args = vec!["plot-sweep", "--x", x, "--out", &out];
        args.extend(files.iter().map(String::as_str));
        let o = pipeline(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
            .lines()
            .filter(|l| l.starts_with("| ddim"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // lines sorted by label: cfg 3 first, then cfg 5 by phi
    assert_eq!(
        sweep("rescale"),
        [
            "| ddim | 50 | 3 rescaled by 0.7 | 10 | 90.0% | 25.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
            "| ddim | 50 | 5 | 10 | 90.0% | 40.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
            "| ddim | 50 | 5 rescaled by 0.35 | 10 | 90.0% | 35.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
            "| ddim | 50 | 5 rescaled by 0.7 | 10 | 90.0% | 30.00 | 2.50 | 0.500 | 0.400 | 12.0 |",
        ]
    );
    // by cfg: plain (cfg 5), rescaled by 0.35 (cfg 5), rescaled by 0.7 (cfg 3, 5)
    assert_eq!(
        sweep("cfg")
            .iter()
            .map(|r| r.split(" | ").nth(2).unwrap().to_string())
            .collect::<Vec<_>>(),
        [
            "5",
            "5 rescaled by 0.35",
            "3 rescaled by 0.7",
            "5 rescaled by 0.7"
        ]
    );
}

/// A tiny class-conditional LDM config (DiT with 2x2 patches on 8x8x2 latents).
const LDM: &str = r#"
[schedule]
kind = "linear"
num_timesteps = 50

[diffusion]
conditioning = "class"

[backbone]
kind = "dit"
patch_size = 2
hidden_size = 16
depth = 1
num_heads = 2

[sampler]
kind = "ddim"
steps = 2

[train]
steps = 2
batch_size = 8
log_every = 1
"#;

#[test]
fn eval_reports_fid_per_class_with_its_floor_or_says_why_not() {
    let t = tempfile::tempdir().unwrap();
    let p = |rel: &str| t.path().join(rel).display().to_string();
    // 544 images: 136 held out, 34 per class -> floor halves of 17
    write_tiny_idx(&t.path().join("data"), 544);
    std::fs::write(
        t.path().join("vae.toml"),
        tiny_vae_config(&t.path().join("data"), ""),
    )
    .unwrap();
    std::fs::write(t.path().join("ldm.toml"), LDM).unwrap();
    for args in [
        vec!["train-vae", "--config", &p("vae.toml"), "--out", &p("vae")],
        vec![
            "train-ldm",
            "--config",
            &p("ldm.toml"),
            "--vae",
            &p("vae"),
            "--out",
            &p("ldm"),
        ],
    ] {
        let mut args = args.clone();
        args.extend(["--device", "cpu"]);
        let o = pipeline(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // d = 24 features: 20 images per class are too few for d but enough for k = 16
    assert!(train_evaluator(t.path(), 544, 24, "ev").status.success());
    let o = pipeline(&[
        "eval",
        "--model",
        &p("ldm"),
        "--evaluator",
        &p("ev"),
        "-n",
        "20",
        "--cfg",
        "2",
        "--json",
        &p("eval.json"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("FID d=24 (floor)")
            && out.contains("FID k=16 (floor)")
            && out.contains("KIDx1000 d=24 (floor)")
            && out.contains("KIDx1000 "),
        "{out}"
    );
    assert!(
        out.contains("- for top-left, top-right, bottom-left, bottom-right: FID in d = 24 needs more than 24 images per set, got 20 generated, floor halves of 17"),
        "{out}"
    );
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("eval.json")).unwrap())
            .unwrap();
    let r = &e["fid_per_class"];
    assert_eq!(
        (r["feature_dim"].as_u64(), r["pca_dim"].as_u64()),
        (Some(24), Some(16))
    );
    // the evaluator is recorded with the checksum of its weights
    assert_eq!(e["evaluator"].as_str(), Some(p("ev").as_str()));
    assert_eq!(
        e["evaluator_sha256"].as_str(),
        Some(
            ldm_common::checkpoint::sha256_file(&t.path().join("ev/model.safetensors"))
                .unwrap()
                .as_str()
        )
    );
    let v = r["pca_explained_variance"].as_f64().unwrap();
    assert!(v > 0.0 && v <= 1.0, "{v}");
    let classes = r["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 4);
    for c in classes {
        assert!(c["fid"].is_null() && c["fid_floor"].is_null(), "{c}");
        assert_eq!(
            (
                c["generated"].as_u64(),
                c["held_out"].as_u64(),
                c["real"].as_u64(),
                c["floor_size"].as_u64()
            ),
            (Some(20), Some(34), Some(20), Some(17))
        );
        let (f, floor) = (
            c["fid_pca"].as_f64().unwrap(),
            c["fid_pca_floor"].as_f64().unwrap(),
        );
        assert!(
            f.is_finite() && f >= 0.0 && floor.is_finite() && floor >= 0.0,
            "{c}"
        );
        assert!(c["note"].as_str().unwrap().contains("d = 24"), "{c}");
        // KID is defined per class where FID in d is not
        let (k, k_floor) = (c["kid"].as_f64().unwrap(), c["kid_floor"].as_f64().unwrap());
        assert!(k.is_finite() && k_floor.is_finite(), "{c}");
    }
    // without --evaluator, the reference evaluator of the model's data set: there is none for
    // these four classes, and the error names the references and the way out
    assert_error(
        &pipeline(&["eval", "--model", &p("ldm"), "--device", "cpu"]),
        "--evaluator auto: no reference evaluator for this model's classes (top-left, top-right, bottom-left, bottom-right) at 32x32x1; the references are animals-mnist (bear, bird, cat",
    );
    // too few images for FID over all classes: refused before sampling, with the -n that works
    let o = pipeline(&[
        "eval",
        "--model",
        &p("ldm"),
        "--evaluator",
        &p("ev"),
        "-n",
        "6",
        "--device",
        "cpu",
    ]);
    assert_error(
        &o,
        "FID needs more samples than feature dimensions: got n = 24 for d = 24 (4 classes x -n 6); use -n 7 or more",
    );
    // the floors of the four classes come from different real images
    let floors: Vec<f64> = classes
        .iter()
        .map(|c| c["fid_pca_floor"].as_f64().unwrap())
        .collect();
    assert!(floors.windows(2).any(|w| w[0] != w[1]), "{floors:?}");
}
