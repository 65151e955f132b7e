//! Data-parallel training (`--devices`) and gradient accumulation
//! (`--gradient-accumulation-steps`): two CPU devices over a global batch, the batch in two
//! parts, and both follow one device on the whole batch, for both stages; resume; and the bad
//! inputs.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

/// The tiny class-conditional DiT LDM config, sampling only at the end.
fn ldm_config() -> String {
    TinyLdmConfig {
        sample_every: 4,
        ..Default::default()
    }
    .toml()
}

/// Asserts both runs logged the same rows, each value within `rel` relative difference.
fn assert_same_metrics(a: &Path, b: &Path, rel: f64) {
    let (a, b) = (metrics(a), metrics(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert_eq!(a["step"], b["step"]);
    for (name, x) in &a {
        for (u, v) in x.iter().zip(&b[name]) {
            assert!(
                (u - v).abs() <= rel * u.abs().max(1e-12),
                "{name}: {u} on one device, {v} on two"
            );
        }
    }
}

/// `train-vae` of `vae.toml` into `out`; `flags` pick the devices.
fn train_vae(t: &TinyVae, out: &str, flags: &[&str]) -> Output {
    t.train_vae_on("vae.toml", out, flags)
}

/// `train-ldm` of `ldm.toml` on the VAE in `vae/` into `out`; `flags` pick the devices.
fn train_ldm(t: &TinyVae, out: &str, flags: &[&str]) -> Output {
    t.train_ldm_on("ldm.toml", "vae", out, flags)
}

// Tolerances. Two devices compute the same mean loss and gradient as one, but sum the batch in
// another order (two halves, then the halves), so float32 rounding differs at about 1e-7
// relative per step. AdamW divides each update by the root of the squared-gradient average, so
// a relative gradient difference d moves a weight by about lr * d: after 4 steps at lr 1e-3
// the weights differ by well under 1e-6. The bounds below (1e-5 on weights, 1e-4 relative on
// logged losses) leave room for that rounding and are still 100 times smaller than a single
// AdamW step (lr = 1e-3), which is what a wrong sample, a wrong noise draw or a wrong
// weighting of the shards changes.
const WEIGHT_TOLERANCE: f32 = 1e-5;
const METRIC_TOLERANCE: f64 = 1e-4;

#[test]
fn vae_and_ldm_on_two_cpu_devices_match_one_device() {
    let t = TinyVae::new("");
    let o = train_vae(&t, "vae", &["--device", "cpu"]);
    assert_ok(&o);
    let o = train_vae(&t, "vae2", &["--devices", "cpu,cpu"]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("data parallel over 2 devices"),
        "{}",
        stderr(&o)
    );
    let diff = max_weight_difference(
        &t.path("vae/model.safetensors"),
        &t.path("vae2/model.safetensors"),
    );
    eprintln!("VAE: largest weight difference, 1 vs 2 devices: {diff:e}");
    assert!(diff <= WEIGHT_TOLERANCE, "VAE weights differ by {diff}");
    assert_same_metrics(&t.path("vae"), &t.path("vae2"), METRIC_TOLERANCE);

    std::fs::write(t.path("ldm.toml"), ldm_config()).unwrap();
    let o = train_ldm(&t, "ldm", &["--device", "cpu"]);
    assert_ok(&o);
    let o = train_ldm(&t, "ldm2", &["--devices", "cpu,cpu"]);
    assert_ok(&o);
    // model.safetensors holds the EMA weights, which follow the trained ones
    let diff = max_weight_difference(
        &t.path("ldm/model.safetensors"),
        &t.path("ldm2/model.safetensors"),
    );
    eprintln!("LDM: largest EMA weight difference, 1 vs 2 devices: {diff:e}");
    assert!(diff <= WEIGHT_TOLERANCE, "LDM weights differ by {diff}");
    assert_same_metrics(&t.path("ldm"), &t.path("ldm2"), METRIC_TOLERANCE);
    let saved = std::fs::read_to_string(t.path("ldm2/config.toml")).unwrap();
    assert!(saved.contains("devices = ["), "{saved}");

    // Gradient accumulation: the batch of 8 in two parts of 4 (one device), or in two parts of
    // 2 on each of two devices, is the same step up to float rounding.
    for (out, flags, line) in [
        (
            "vae-k2",
            &["--gradient-accumulation-steps", "2", "--device", "cpu"][..],
            "each step's 8 samples, in 2 parts of 4 (gradient accumulation)",
        ),
        (
            "vae-d2k2",
            &["--devices", "cpu,cpu", "--gradient-accumulation-steps", "2"][..],
            "4 of the 8 samples of each step on each, in 2 parts of 2",
        ),
    ] {
        let o = train_vae(&t, out, flags);
        assert_ok(&o);
        assert!(stderr(&o).contains(line), "{}", stderr(&o));
        let diff = max_weight_difference(
            &t.path("vae/model.safetensors"),
            &t.path(&format!("{out}/model.safetensors")),
        );
        eprintln!("VAE: largest weight difference, {out}: {diff:e}");
        assert!(
            diff <= WEIGHT_TOLERANCE,
            "{out}: VAE weights differ by {diff}"
        );
        assert_same_metrics(&t.path("vae"), &t.path(out), METRIC_TOLERANCE);
    }
    let o = train_ldm(
        &t,
        "ldm-k2",
        &["--gradient-accumulation-steps", "2", "--device", "cpu"],
    );
    assert_ok(&o);
    let diff = max_weight_difference(
        &t.path("ldm/model.safetensors"),
        &t.path("ldm-k2/model.safetensors"),
    );
    eprintln!("LDM: largest EMA weight difference, 2 parts: {diff:e}");
    assert!(diff <= WEIGHT_TOLERANCE, "LDM weights differ by {diff}");
    assert_same_metrics(&t.path("ldm"), &t.path("ldm-k2"), METRIC_TOLERANCE);
    let saved = std::fs::read_to_string(t.path("ldm-k2/config.toml")).unwrap();
    assert!(saved.contains("gradient_accumulation_steps = 2"), "{saved}");
    // It may change on resume (memory, not what is learned).
    let o = train_ldm(
        &t,
        "ldm-k4",
        &[
            "--gradient-accumulation-steps",
            "4",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
    );
    assert_ok(&o);
    let o = train_ldm(&t, "ldm-k4", &["--resume", "--device", "cpu"]);
    assert_ok(&o);
    let diff = max_weight_difference(
        &t.path("ldm/model.safetensors"),
        &t.path("ldm-k4/model.safetensors"),
    );
    assert!(
        diff <= WEIGHT_TOLERANCE,
        "resumed LDM weights differ by {diff}"
    );

    // Resuming a two-device run gives the uninterrupted run's weights exactly.
    let o = train_ldm(&t, "ldm3", &["--devices", "cpu,cpu", "--steps", "2"]);
    assert_ok(&o);
    let o = train_ldm(&t, "ldm3", &["--devices", "cpu,cpu", "--resume"]);
    assert_ok(&o);
    assert_eq!(
        t.sha("ldm2/model.safetensors"),
        t.sha("ldm3/model.safetensors"),
        "the resumed run differs"
    );
}

#[test]
fn bad_device_lists_are_refused() {
    let t = TinyVae::new("");
    let o = train_vae(&t, "a", &["--devices", "cpu,cpu", "--batch-size", "5"]);
    assert_error(
        &o,
        "train.batch_size = 5 (--batch-size) is not divisible by the 2 devices of --devices cpu,cpu: expected a multiple of 2",
    );
    let o = train_vae(&t, "a", &["--devices", "cpu,gpu"]);
    assert_error(
        &o,
        "unknown device `gpu` in the list; expected cpu, libtorch, cuda or cuda:N",
    );
    let o = train_vae(&t, "a", &["--devices", "cpu,,cpu"]);
    assert_error(&o, "unknown device `` in the list");
    let o = train_vae(&t, "a", &["--devices", "cpu,cuda:1"]);
    assert_error(&o, "mixes cpu with cuda:1; expected devices of one kind");
    assert!(!t.path("a/checkpoint").exists(), "nothing was trained");
    let o = train_vae(&t, "a", &["--devices", "cpu,cpu", "--device", "cpu"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));

    let o = train_vae(&t, "a", &["--gradient-accumulation-steps", "3"]);
    assert_error(
        &o,
        "train.gradient_accumulation_steps = 3 (--gradient-accumulation-steps): train.batch_size = 8 (--batch-size) cannot be split into 3 equal parts; expected a divisor of 8",
    );
    let o = train_vae(&t, "a", &["--set", "train.gradient_accumulation_steps=0"]);
    assert_error(
        &o,
        "train.gradient_accumulation_steps = 0 (--gradient-accumulation-steps): expected at least 1",
    );
    assert!(!t.path("a/checkpoint").exists(), "nothing was trained");

    // A config list is checked the same way as the flag.
    let o = train_vae(&t, "a", &["--set", r#"train.devices=["cpu","gpu"]"#]);
    assert_error(&o, "unknown device `gpu` in the list");
    assert!(!t.path("a/checkpoint").exists(), "nothing was trained");

    // Other training commands train on one device and say so.
    let train = "steps = 2\nbatch_size = 8\ndevices = [\"cpu\", \"cpu\"]\n";
    let evaluator = tiny_evaluator_config(&t.path("data"), 4, train);
    std::fs::write(t.path("ev.toml"), evaluator).unwrap();
    let o = t.train_evaluator("ev.toml", "ev", &[]);
    assert_error(
        &o,
        "train.devices (--devices) = cpu,cpu: this stage trains on one device",
    );

    let train = "steps = 2\nbatch_size = 8\ngradient_accumulation_steps = 2\n";
    let evaluator = tiny_evaluator_config(&t.path("data"), 4, train);
    std::fs::write(t.path("ev.toml"), evaluator).unwrap();
    let o = t.train_evaluator("ev.toml", "ev", &[]);
    assert_error(
        &o,
        "train.gradient_accumulation_steps = 2: this stage computes each batch in one part",
    );

    // The U-Net's dropout masks do not come from --seed.
    let unet = ldm_config().replace(
        "kind = \"dit\"\npatch_size = 2\nhidden_size = 32\ndepth = 1\nnum_heads = 2",
        "kind = \"unet\"\nbase_channels = 8\nchannel_mult = [1]\ngroups = 4\ndropout = 0.1",
    );
    std::fs::write(t.path("ldm.toml"), unet).unwrap();
    let o = train_ldm(&t, "b", &["--devices", "cpu,cpu"]);
    assert_error(&o, "backbone.dropout = 0.1 with --devices cpu,cpu");
}
