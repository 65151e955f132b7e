//! `pipeline bench` on tiny configs: the table has every row, the JSON every setting the
//! PyTorch twin needs, bad input is one `error:` line, and the twin (scripts/bench/torch_twin.py)
//! builds networks with exactly the parameter counts of the Rust ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_error, pipeline_in, stderr, stdout};
use ldm_common::checkpoint::read_json;

const VAE: &str = r#"
[data]
source = "idx"
dir = "no-data-needed"
resolution = 16
channels = 1
[vae]
downsample_factor = 2
latent_channels = 4
base_channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
groups = 4
[train]
batch_size = 4
lr = 1e-3
"#;

const DIT: &str = r#"
[diffusion]
conditioning = "class"
[backbone]
kind = "dit"
patch_size = 2
hidden_size = 32
depth = 2
num_heads = 2
[train]
batch_size = 4
"#;

const UNET: &str = r#"
[diffusion]
conditioning = "class"
[backbone]
kind = "unet"
base_channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attention_levels = [1]
num_heads = 2
groups = 4
[train]
batch_size = 4
"#;

/// A folder with a tiny recipe (`recipe.toml` naming `vae.toml` and `dit.toml` beside it) and
/// a tiny U-Net config `unet.toml`.
fn tiny(vae: &str, dit: &str, unet: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    w("vae.toml", vae);
    w("dit.toml", dit);
    w("unet.toml", unet);
    w(
        "recipe.toml",
        "out = \"runs/tiny\"\nvae = \"vae.toml\"\nldm = \"dit.toml\"\n[grid]\ncfg = 3.0\n",
    );
    dir
}

/// `pipeline bench` in `dir` on the tiny recipe and U-Net, on the CPU, with `extra` flags.
fn bench_in(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "bench",
        "--config",
        "recipe.toml",
        "--unet",
        "unet.toml",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    pipeline_in(dir, &args)
}

/// Runs the tiny bench in `dir` with `iters` timed steps, writing `bench.json`.
fn bench(dir: &Path, iters: &str) -> Output {
    let o = bench_in(
        dir,
        &[
            "--iters",
            iters,
            "--warmup",
            "1",
            "--sample-runs",
            "1",
            "--classes",
            "3",
            "--json",
            "bench.json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// Runs the tiny bench in `dir` and returns the JSON it wrote.
fn bench_json(dir: &Path, iters: &str) -> serde_json::Value {
    bench(dir, iters);
    read_json(&dir.join("bench.json")).unwrap()
}

fn row<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name} in {report}"))
}

const ROWS: [&str; 4] = [
    "vae-train",
    "ldm-train-unet",
    "ldm-train-dit",
    "sample-ddim50",
];

#[test]
fn bench_prints_a_table_with_every_row() {
    let dir = tiny(VAE, DIT, UNET);
    let o = bench(dir.path(), "2");
    let table = stdout(&o);
    assert!(table.contains("ms/step") && table.contains("items/s") && table.contains("params"));
    for name in ROWS {
        let line = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{table}"));
        assert!(
            line.contains("images") || line.contains("latents"),
            "{line}"
        );
    }
    // which networks: the DiT of the recipe, the U-Net given, the recipe's cfg
    assert!(
        table.contains("(unet.toml)") && table.contains("dit.toml"),
        "{table}"
    );
    assert!(table.contains("DiT DDIM 50, cfg 3"), "{table}");
    // achieved TFLOP/s of the DiT step: 3 forward passes of the batch over the step's time
    assert!(
        table.contains("ldm-train-dit: ") && table.contains("TFLOP/s achieved"),
        "{table}"
    );

    let report: serde_json::Value = read_json(&dir.path().join("bench.json")).unwrap();
    for name in ROWS {
        let r = row(&report, name);
        assert!(r["ms_per_step"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["items_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["params"].as_u64().unwrap() > 0, "{r}");
    }
    let dit = row(&report, "ldm-train-dit");
    let (forward, tflops, ms, b) = (
        dit["forward_flops"].as_f64().unwrap(),
        dit["tflops"].as_f64().unwrap(),
        dit["ms_per_step"].as_f64().unwrap(),
        dit["batch"].as_f64().unwrap(),
    );
    let expected = 3.0 * forward * b / (ms / 1000.0) / 1e12;
    assert!((tflops - expected).abs() <= 1e-9 * expected, "{dit}");
    assert!(row(&report, "ldm-train-unet").get("tflops").is_none());
    for name in &ROWS[..3] {
        let r = row(&report, name);
        assert_eq!(r["iters"], 2);
        assert!(r["last_loss"].as_f64().unwrap().is_finite(), "{r}");
        // ms/step and items/s describe the same timed seconds
        let (ms, items, b) = (
            r["ms_per_step"].as_f64().unwrap(),
            r["items_per_s"].as_f64().unwrap(),
            r["batch"].as_f64().unwrap(),
        );
        assert!((items - 1000.0 * b / ms).abs() < 1e-6 * items, "{r}");
    }
    assert_eq!(row(&report, "vae-train")["batch"], 4);
    // DiT, d = 32, 2 blocks, patch 2 on 4x8x8 latents, 3 classes (+ null), counted by hand:
    // patch embed 4*32*2*2+32, positions 16*32, t-MLP 256*32+32 + 32*32+32, labels 4*32,
    // per block qkv 32*96+96, out 32*32+32, MLP 32*128+128 + 128*32+32, adaLN 32*192+192,
    // final adaLN 32*64+64 and linear 32*16+16.
    let block =
        (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32) + (32 * 192 + 192);
    let dit = (4 * 32 * 4 + 32)
        + 16 * 32
        + (256 * 32 + 32)
        + (32 * 32 + 32)
        + 4 * 32
        + 2 * block
        + (32 * 64 + 64)
        + (32 * 16 + 16);
    assert_eq!(row(&report, "ldm-train-dit")["params"], dit);
    // the twin's input: every row's settings, the schedule and the DDIM timesteps
    let spec = &report["spec"];
    assert_eq!(spec["vae"]["image_shape"], serde_json::json!([1, 16, 16]));
    assert_eq!(spec["ldm"][1]["latent_shape"], serde_json::json!([4, 8, 8]));
    assert_eq!(spec["ldm"][0]["backbone"]["kind"], "unet");
    assert_eq!(
        spec["ldm"][1]["alphas_cumprod"].as_array().unwrap().len(),
        1000
    );
    assert_eq!(spec["sample"]["timesteps"].as_array().unwrap().len(), 50);
    assert_eq!(spec["sample"]["timesteps"][0], 999);
}

#[test]
fn rows_picks_the_rows_to_time() {
    let dir = tiny(VAE, DIT, UNET);
    let o = bench_in(
        dir.path(),
        &[
            "--iters",
            "1",
            "--warmup",
            "0",
            "--sample-runs",
            "1",
            "--json",
            "rows.json",
            "--rows",
            "ldm-train-unet,sample-ddim50",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = read_json(&dir.path().join("rows.json")).unwrap();
    let names: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    // the DiT is sampled with its initial weights; its training row is left out
    assert_eq!(names, ["ldm-train-unet", "sample-ddim50"]);
}

/// `--phases`: every training row splits its step into forward, backward, optimizer and EMA
/// (none for the VAE), the parts add up to about the step, the table shows them, and the twin
/// (when torch is installed) reports the same parts from the same spec.
#[test]
fn phases_split_each_training_step() {
    let dir = tiny(VAE, DIT, UNET);
    let o = bench_in(
        dir.path(),
        &[
            "--iters",
            "3",
            "--warmup",
            "1",
            "--sample-runs",
            "1",
            "--rows",
            "vae-train,ldm-train-dit",
            "--phases",
            "--json",
            "phases.json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("parts of a training step"),
        "{}",
        stdout(&o)
    );
    let report: serde_json::Value = read_json(&dir.path().join("phases.json")).unwrap();
    assert_eq!(report["spec"]["phases"], true);
    for name in ["vae-train", "ldm-train-dit"] {
        let r = row(&report, name);
        let p = &r["phases"];
        let part = |k: &str| {
            p[k].as_f64()
                .unwrap_or_else(|| panic!("{name}: no {k} in {p}"))
        };
        let sum = part("forward_ms") + part("backward_ms") + part("optimizer_ms") + part("ema_ms");
        for k in ["forward_ms", "backward_ms", "optimizer_ms"] {
            assert!(part(k) > 0.0, "{name}: {k} = {}", part(k));
        }
        // the parts are clocked inside the timed loop: together at most the step, and most of it
        let step = r["ms_per_step"].as_f64().unwrap();
        // the VAE keeps no EMA: its part is an empty call
        assert_eq!(
            part("ema_ms") > 0.002 * step,
            name != "vae-train",
            "{name}: {p}"
        );
        assert!(
            sum <= step * 1.001 && sum >= 0.7 * step,
            "{name}: parts {sum} ms, step {step} ms"
        );
    }
    // without the flag: no parts, no syncs
    bench(dir.path(), "1");
    let plain: serde_json::Value = read_json(&dir.path().join("bench.json")).unwrap();
    assert!(row(&plain, "ldm-train-dit").get("phases").is_none());
    assert_eq!(plain["spec"]["phases"], false);

    let Ok(python) = python_with_torch() else {
        eprintln!("twin part skipped: no python with torch");
        return;
    };
    let twin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench/torch_twin.py");
    let o = Command::new(&python)
        .arg(&twin)
        .args([
            "--spec",
            "phases.json",
            "--threads",
            "1",
            "--json",
            "twin.json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let twin: serde_json::Value = read_json(&dir.path().join("twin.json")).unwrap();
    for name in ["vae-train", "ldm-train-dit"] {
        let p = &row(&twin, name)["phases"];
        assert!(
            p["backward_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "twin {name}: {p}"
        );
    }
}

#[test]
fn bad_input_is_one_error_line() {
    let dir = tiny(VAE, DIT, UNET);
    let run = |args: &[&str]| {
        let mut all = vec!["bench", "--device", "cpu"];
        all.extend_from_slice(args);
        pipeline_in(dir.path(), &all)
    };
    assert_error(
        &run(&["--config", "nope"]),
        "--config nope: no such file, and not a built-in config",
    );
    assert_error(
        &run(&["--config", "recipe.toml", "--iters", "0"]),
        "--iters 0: expected at least 1",
    );
    assert_error(
        &run(&["--config", "recipe.toml", "--iters", "-3"]),
        "--iters -3: expected at least 1",
    );
    assert_error(
        &run(&["--config", "recipe.toml", "--sample-runs", "0"]),
        "--sample-runs 0: expected at least 1",
    );
    assert_error(
        &run(&["--config", "recipe.toml", "--rows", "vae-train,dit"]),
        "--rows vae-train,dit: unknown row 'dit'; expected some of vae-train, ldm-train-unet, ldm-train-dit, sample-ddim50",
    );
    assert_error(
        &run(&["--config", "vae.toml"]),
        "--config vae.toml: expected a recipe",
    );
    assert_error(
        &run(&["--config", "recipe.toml", "--unet", "dit.toml"]),
        "--unet dit.toml: its [backbone] is not kind = \"unet\"",
    );
    std::fs::write(
        dir.path().join("gone.toml"),
        "out = \"x\"\nvae = \"missing-vae.toml\"\nldm = \"dit.toml\"\n",
    )
    .unwrap();
    assert_error(
        &run(&["--config", "gone.toml"]),
        "gone.toml: vae = missing-vae.toml: no such file",
    );
    std::fs::write(
        dir.path().join("patch.toml"),
        DIT.replace("patch_size = 2", "patch_size = 3"),
    )
    .unwrap();
    assert_error(
        &run(&["--config", "recipe.toml", "--dit", "patch.toml"]),
        "dit.patch_size = 3",
    );
}

/// The Python with torch that runs the twin: `LDM_TWIN_PYTHON`, else the repository's `.venv`
/// (README, GPU), else `python3`; `None` with the reason when none imports torch.
fn python_with_torch() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates: Vec<PathBuf> = match std::env::var_os("LDM_TWIN_PYTHON") {
        Some(p) => vec![p.into()],
        None => vec![root.join(".venv/bin/python"), "python3".into()],
    };
    for python in &candidates {
        let ok = Command::new(python)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(python.clone());
        }
    }
    Err(format!("none of {candidates:?} can import torch"))
}

/// The twin's networks have the Rust networks' parameter counts, row by row, for two
/// architectures each (class-conditional and unconditional, sin-cos and learned positions,
/// attention at one or two U-Net levels, two or three resolution levels), and torch's FLOP
/// counter finds in the twin's DiT forward pass the matrix-product FLOPs that
/// `DiTConfig::forward_flops` counts from the config (the numerator of the TFLOP/s column).
///
/// Needs python3 with torch (`python3 -m venv .venv && .venv/bin/pip install torch==2.11.0`):
/// CI has no torch, so there the test prints why it is skipped and passes.
#[test]
fn the_torch_twin_has_the_same_parameter_counts() {
    let python = match python_with_torch() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipped: {why} (install torch to compare the twin)");
            return;
        }
    };
    let twin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench/torch_twin.py");
    let variants = [
        tiny(VAE, DIT, UNET),
        tiny(
            &VAE.replace("downsample_factor = 2", "downsample_factor = 4")
                .replace("channel_mult = [1, 2]", "channel_mult = [1, 2, 2]")
                .replace("num_res_blocks = 1", "num_res_blocks = 2"),
            &DIT.replace("conditioning = \"class\"", "conditioning = \"none\"")
                .replace(
                    "depth = 2",
                    "depth = 1\npos_embed = \"learned\"\nmlp_ratio = 2.5",
                ),
            &UNET
                .replace("channel_mult = [1, 2]", "channel_mult = [1, 1, 2]")
                .replace("num_res_blocks = 1", "num_res_blocks = 2")
                .replace("attention_levels = [1]", "attention_levels = [0, 2]"),
        ),
    ];
    for dir in &variants {
        let report = bench_json(dir.path(), "1");
        // the twin's JSON answer to `--spec bench.json FLAG`
        let twin_json = |flag: &str| -> serde_json::Value {
            let o = Command::new(&python)
                .arg(&twin)
                .args(["--spec", "bench.json", flag])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
            serde_json::from_str(stdout(&o).trim()).unwrap()
        };
        let counts = twin_json("--params-only");
        for name in ROWS {
            assert_eq!(
                counts[name],
                row(&report, name)["params"],
                "{name}: PyTorch {} against burn {}",
                counts[name],
                row(&report, name)["params"]
            );
        }
        let flops = twin_json("--flops-only");
        let ours = &row(&report, "ldm-train-dit")["forward_flops"];
        assert!(ours.as_u64().is_some_and(|f| f > 0), "{ours}");
        assert_eq!(
            &flops["ldm-train-dit"], ours,
            "DiT forward FLOPs: PyTorch against burn"
        );
    }
}
