//! Image-to-image, inpainting and classifier guidance end to end on a tiny VAE and DiT:
//! `generate --init-image/--strength/--mask`, `train-classifier`, `generate --classifier`,
//! `eval --classifier`, and their bad inputs.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

const CLASSIFIER: &str = r#"
[classifier]
channels = [8, 16]
num_res_blocks = 1
groups = 4
time_dim = 16

[train]
steps = 4
batch_size = 16
lr = 1e-3
warmup_steps = 1
log_every = 1
checkpoint_every = 2
"#;

/// Trains an LDM of `conditioning` with `timesteps` steps on `vae` into `out` (its config in
/// `<out>.toml`).
fn train_ldm(t: &TinyVae, vae: &str, out: &str, conditioning: &str, timesteps: usize) {
    let config = TinyLdmConfig {
        conditioning,
        timesteps,
        sample_every: 4,
        ..Default::default()
    };
    let file = format!("{out}.toml");
    std::fs::write(t.path(&file), config.toml()).unwrap();
    assert_ok(&t.train_ldm_on(&file, vae, out, &["--device", "cpu"]));
}

/// A tiny VAE and a class-conditional LDM (`ldm/`) on it.
fn setup() -> TinyVae {
    let t = TinyVae::trained();
    train_ldm(&t, "vae", "ldm", "class", 100);
    t
}

/// A `side x side` grayscale PNG: a bright square on a dark ground.
fn write_init(path: &Path, side: u32) {
    image::GrayImage::from_fn(side, side, |x, y| {
        let inside = (4..14).contains(&x) && (6..18).contains(&y);
        image::Luma([if inside { 220 } else { 15 }])
    })
    .save(path)
    .unwrap();
}

/// A `side x side` mask, white (repaint) where `x >= side / 2`.
fn write_mask(path: &Path, side: u32) {
    image::GrayImage::from_fn(side, side, |x, _| {
        image::Luma([if x >= side / 2 { 255 } else { 0 }])
    })
    .save(path)
    .unwrap();
}

/// `generate` of class top-left on `ldm/` into `out` (2 images unless `extra` says `-n`).
fn generate(t: &TinyVae, out: &str, extra: &[&str]) -> Output {
    let (model, out) = (t.p("ldm"), t.p(out));
    let mut args = vec![
        "generate", "--model", &model, "--class", "top-left", "--out", &out, "--device", "cpu",
    ];
    if !extra.contains(&"-n") {
        args.extend(["-n", "2"]);
    }
    args.extend_from_slice(extra);
    pipeline(&args)
}

fn luma(path: &Path) -> Vec<f64> {
    image::open(path)
        .unwrap()
        .to_luma8()
        .into_raw()
        .iter()
        .map(|&p| f64::from(p) / 255.0)
        .collect()
}

/// Mean absolute difference of two 32x32 images over the columns `cols`, in [0, 1].
fn mad(a: &Path, b: &Path, cols: std::ops::Range<usize>) -> f64 {
    let (a, b) = (luma(a), luma(b));
    let mut sum = 0.0;
    let mut count = 0;
    for y in 0..32 {
        for x in cols.clone() {
            sum += (a[y * 32 + x] - b[y * 32 + x]).abs();
            count += 1;
        }
    }
    sum / f64::from(count)
}

fn sha(path: &Path) -> String {
    ldm_common::checkpoint::sha256_file(path).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn img2img_records_its_settings_and_follows_the_seed() {
    let t = setup();
    write_init(&t.path("init.png"), 32);
    let init = t.p("init.png");
    let flags = [
        "--init-image",
        &init,
        "--strength",
        "0.6",
        "-n",
        "3",
        "--seed",
        "7",
    ];
    assert_ok(&generate(&t, "a", &flags));
    assert_ok(&generate(&t, "b", &flags));
    for f in [
        "000.png",
        "001.png",
        "002.png",
        "grid.png",
        "init.png",
        "generate.json",
    ] {
        assert_eq!(
            sha(&t.path("a").join(f)),
            sha(&t.path("b").join(f)),
            "{f} differs between equal seeds"
        );
    }
    let record = json(&t.path("a/generate.json"));
    let i = &record["img2img"];
    assert_eq!(i["init_image_sha256"], sha(&t.path("init.png")));
    assert_eq!(i["strength"], 0.6);
    assert_eq!(i["mask_sha256"], serde_json::Value::Null);
    assert_eq!(i["init_reconstruction"], "init.png");
    assert_eq!(record["files"].as_array().unwrap().len(), 3);
    let text = ldm_common::image_io::read_png_text(&t.path("a/001.png")).unwrap();
    assert!(
        text[0].1.contains("\"strength\":0.6") && text[0].1.contains(&sha(&t.path("init.png"))),
        "{}",
        text[0].1
    );
    // Another seed, other images; without --strength the default 0.6 is used and recorded.
    assert_ok(&generate(
        &t,
        "c",
        &["--init-image", &init, "-n", "3", "--seed", "8"],
    ));
    assert_ne!(sha(&t.path("a/000.png")), sha(&t.path("c/000.png")));
    assert_eq!(json(&t.path("c/generate.json"))["img2img"]["strength"], 0.6);
}

/// With one step at t = 0 the output is the init image's reconstruction up to the model's
/// tiny correction; at strength 1 it is a fresh sample.
#[test]
fn small_strength_stays_at_the_reconstruction() {
    let t = setup();
    write_init(&t.path("init.png"), 32);
    let init = t.p("init.png");
    let near = [
        "--init-image",
        &init,
        "--steps",
        "100",
        "--strength",
        "0.015",
    ];
    assert_ok(&generate(&t, "near", &near));
    let far = ["--init-image", &init, "--steps", "100", "--strength", "1"];
    assert_ok(&generate(&t, "far", &far));
    let d_near = mad(&t.path("near/000.png"), &t.path("near/init.png"), 0..32);
    let d_far = mad(&t.path("far/000.png"), &t.path("far/init.png"), 0..32);
    eprintln!("mean |x - reconstruction|: strength 0.015 {d_near:.4}, strength 1 {d_far:.4}");
    assert!(d_near < 0.02, "strength 0.015: {d_near}");
    assert!(d_far > 5.0 * d_near, "strength 1: {d_far} vs {d_near}");
}

/// The kept latent cells are the init latent exactly after the last step (a unit test checks
/// the replacement); through the decoder, which mixes the whole image (GroupNorm statistics,
/// its receptive field), that shows as a kept region fixed by the init image whatever the
/// seed, while the repainted region follows the noise.
#[test]
fn inpainting_keeps_the_black_region_and_repaints_the_white() {
    let t = setup();
    write_init(&t.path("init.png"), 32);
    write_mask(&t.path("mask.png"), 32);
    let (init, mask) = (t.p("init.png"), t.p("mask.png"));
    for seed in ["3", "4"] {
        let masked = [
            "--init-image",
            &init,
            "--mask",
            &mask,
            "--strength",
            "1",
            "--seed",
            seed,
        ];
        assert_ok(&generate(&t, &format!("p{seed}"), &masked));
        let plain = ["--init-image", &init, "--strength", "1", "--seed", seed];
        assert_ok(&generate(&t, &format!("q{seed}"), &plain));
    }
    let record = json(&t.path("p3/generate.json"));
    assert_eq!(record["img2img"]["mask_sha256"], sha(&t.path("mask.png")));
    let d = |a: &str, b: &str, cols| mad(&t.path(a), &t.path(b), cols);
    for i in ["000", "001"] {
        let (p3, p4) = (format!("p3/{i}.png"), format!("p4/{i}.png"));
        let (q3, q4) = (format!("q3/{i}.png"), format!("q4/{i}.png"));
        // away from the mask's edge at x = 16
        let kept = d(&p3, &p4, 0..10);
        let repainted = d(&p3, &p4, 22..32);
        let unmasked = d(&q3, &q4, 0..10);
        eprintln!(
            "{i}: between seeds, kept {kept:.4}, repainted {repainted:.4}, the same columns without a mask {unmasked:.4}"
        );
        assert!(
            4.0 * kept < repainted,
            "kept {kept} vs repainted {repainted}"
        );
        assert!(2.0 * kept < unmasked, "kept {kept} vs unmasked {unmasked}");
    }
}

#[test]
fn img2img_bad_inputs() {
    let t = setup();
    write_init(&t.path("init.png"), 32);
    write_init(&t.path("small.png"), 16);
    write_mask(&t.path("mask16.png"), 16);
    std::fs::write(t.path("text.png"), "not an image").unwrap();
    std::fs::write(t.path("bomb.png"), ldm_common::image_io::bomb_png(60_000)).unwrap();
    let (init, small, mask16) = (t.p("init.png"), t.p("small.png"), t.p("mask16.png"));
    let (text, bomb, missing) = (t.p("text.png"), t.p("bomb.png"), t.p("missing.png"));
    let e = |extra: &[&str], needle: &str| assert_error(&generate(&t, "g", extra), needle);
    e(&["--mask", &mask16], "--mask needs --init-image");
    e(&["--strength", "0.5"], "--strength 0.5 needs --init-image");
    for s in ["0", "1.5", "-0.2", "nan"] {
        e(
            &["--init-image", &init, "--strength", s],
            "expected a number in (0, 1]",
        );
    }
    e(
        &["--init-image", &init, "--strength", "0.1"],
        "--strength 0.1 keeps no step of the 5-step sampler",
    );
    e(
        &["--init-image", &small],
        "small.png: 16x16 pixels, but the model makes 32x32 images",
    );
    e(
        &["--init-image", &init, "--mask", &mask16],
        "mask16.png: 16x16 pixels, but --init-image",
    );
    e(&["--init-image", &text], "text.png: unreadable image");
    e(&["--init-image", &missing], "missing.png");
    e(&["--init-image", &bomb], "bomb.png: refused to decode");
    e(
        &["--init-image", &init, "--mask", &bomb],
        "refused to decode",
    );
    assert!(!t.path("g/000.png").exists(), "a failed run wrote images");
}

fn train_classifier(t: &TinyVae, model: &str, out: &str, extra: &[&str]) -> Output {
    std::fs::write(t.path("cls.toml"), CLASSIFIER).unwrap();
    let (config, model, out) = (t.p("cls.toml"), t.p(model), t.p(out));
    let mut args = vec![
        "train-classifier",
        "--model",
        &model,
        "--config",
        &config,
        "--out",
        &out,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    pipeline(&args)
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_luma8().into_raw()
}

#[test]
fn classifier_trains_guides_generation_and_evaluation() {
    let t = setup();
    let o = train_classifier(&t, "ldm", "cls", &[]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("held-out accuracy on 16 latents: t=0 "),
        "{}",
        stdout(&o)
    );
    let info = json(&t.path("cls/classifier.json"));
    let table = info["held_out_accuracy"].as_array().unwrap();
    let ts: Vec<u64> = table.iter().map(|a| a["t"].as_u64().unwrap()).collect();
    assert_eq!(ts, [0, 25, 50, 75]);
    for a in table {
        assert!(
            (0.0..=1.0).contains(&a["accuracy"].as_f64().unwrap()),
            "{a}"
        );
    }
    assert_eq!(info["vae_sha256"], sha(&t.path("vae/model.safetensors")));
    let csv = std::fs::read_to_string(t.path("cls/metrics.csv")).unwrap();
    assert!(csv.starts_with("step,loss,accuracy,lr"), "{csv}");
    assert_eq!(csv.lines().count(), 5);

    let cls = t.p("cls");
    let guided = |out: &str, scale: &str| {
        generate(
            &t,
            out,
            &[
                "--classifier",
                &cls,
                "--classifier-scale",
                scale,
                "--seed",
                "4",
            ],
        )
    };
    assert_ok(&guided("g1", "20"));
    assert_ok(&guided("g2", "20"));
    assert_eq!(sha(&t.path("g1/000.png")), sha(&t.path("g2/000.png")));
    let r = json(&t.path("g1/generate.json"));
    let g = &r["classifier_guidance"];
    assert_eq!(g["scale"], 20.0);
    assert_eq!(g["class"], "top-left");
    assert_eq!(
        g["classifier_sha256"],
        sha(&t.path("cls/model.safetensors"))
    );
    // Scale 0 samples exactly as without a classifier; scale 20 moves the images.
    assert_ok(&guided("g0", "0"));
    assert_ok(&generate(&t, "plain", &["--seed", "4"]));
    assert_eq!(
        pixels(&t.path("g0/000.png")),
        pixels(&t.path("plain/000.png"))
    );
    assert_ne!(
        pixels(&t.path("g1/000.png")),
        pixels(&t.path("plain/000.png"))
    );
    // With cfg 1 classifier guidance works alone, also combined with img2img.
    write_init(&t.path("init.png"), 32);
    let init = t.p("init.png");
    assert_ok(&generate(
        &t,
        "g3",
        &["--classifier", &cls, "--cfg", "1", "--init-image", &init],
    ));

    // An unconditional model with the same VAE and schedule follows a class through the
    // classifier alone.
    train_ldm(&t, "vae", "uncond", "none", 100);
    let o = pipeline(&[
        "generate",
        "--model",
        &t.p("uncond"),
        "--class",
        "bottom-right",
        "--classifier",
        &cls,
        "-n",
        "2",
        "--out",
        &t.p("u"),
        "--device",
        "cpu",
    ]);
    assert_ok(&o);
    assert_eq!(
        json(&t.path("u/generate.json"))["classifier_guidance"]["class"],
        "bottom-right"
    );

    // `eval` records the classifier and its scale.
    let train = "steps = 4\nbatch_size = 16\nwarmup_steps = 1\n";
    let config = tiny_evaluator_config(&t.path("data"), 4, train);
    std::fs::write(t.path("ev.toml"), config).unwrap();
    assert_ok(&t.train_evaluator("ev.toml", "ev", &[]));
    let o = pipeline(&[
        "eval",
        "--model",
        &t.p("ldm"),
        "--evaluator",
        &t.p("ev"),
        "-n",
        "3",
        "--steps",
        "3",
        "--classifier",
        &cls,
        "--classifier-scale",
        "2",
        "--json",
        &t.p("e.json"),
        "--device",
        "cpu",
    ]);
    assert_ok(&o);
    let e = json(&t.path("e.json"));
    assert_eq!(e["classifier_scale"], 2.0);
    assert!(e["classifier"].as_str().unwrap().ends_with("cls"), "{e}");
    assert!((0.0..=1.0).contains(&e["accuracy"].as_f64().unwrap()));
}

#[test]
fn classifier_bad_inputs_and_other_models() {
    let t = setup();
    assert_ok(&train_classifier(&t, "ldm", "cls", &[]));
    let cls = t.p("cls");
    assert_error(
        &generate(&t, "g", &["--classifier-scale", "2"]),
        "--classifier-scale 2 needs --classifier",
    );
    assert_error(
        &generate(&t, "g", &["--classifier", &cls, "--classifier-scale", "-1"]),
        "--classifier-scale -1: expected a number >= 0",
    );
    assert_error(
        &generate(&t, "g", &["--classifier", &t.p("nothing")]),
        "no such trained classifier folder",
    );
    // No class to guide toward.
    let o = pipeline(&[
        "generate",
        "--model",
        &t.p("ldm"),
        "--classifier",
        &cls,
        "--out",
        &t.p("g"),
        "--device",
        "cpu",
    ]);
    assert_error(&o, "--classifier needs a class to guide toward");
    // The classifier on another model, toward class top-left.
    let guide = |model: &str| {
        pipeline(&[
            "generate",
            "--model",
            &t.p(model),
            "--class",
            "top-left",
            "--classifier",
            &cls,
            "--out",
            &t.p("g"),
            "--device",
            "cpu",
        ])
    };
    // A model with another noise schedule on the same VAE.
    train_ldm(&t, "vae", "ldm50", "class", 50);
    assert_error(&guide("ldm50"), "was trained for another noise schedule");
    // A model on another VAE.
    assert_ok(&t.train_vae("vae.toml", "vae2", &["--seed", "5"]));
    train_ldm(&t, "vae2", "ldm2", "class", 100);
    assert_error(&guide("ldm2"), "was trained on the latents of another VAE");
    // Config errors name the key; --resume continues exactly.
    std::fs::write(
        t.path("bad.toml"),
        CLASSIFIER.replace("groups = 4", "groups = 3"),
    )
    .unwrap();
    let o = pipeline(&[
        "train-classifier",
        "--model",
        &t.p("ldm"),
        "--config",
        &t.p("bad.toml"),
        "--out",
        &t.p("bad"),
        "--device",
        "cpu",
    ]);
    assert_error(&o, "classifier.groups = 3: must divide");
    assert_ok(&train_classifier(&t, "ldm", "half", &["--steps", "2"]));
    assert_ok(&train_classifier(&t, "ldm", "half", &["--resume"]));
    assert_eq!(
        sha(&t.path("half/model.safetensors")),
        sha(&t.path("cls/model.safetensors")),
        "a resumed classifier differs from the uninterrupted run"
    );
}
