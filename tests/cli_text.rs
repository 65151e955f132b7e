//! Text conditioning end to end on a tiny VAE and DiT: the tokenizer trained by `train-ldm`,
//! `generate --prompt` / `--negative-prompt`, unknown-word warnings, exact resume, `eval` of a
//! text model, and the bad inputs of text prompts.

mod common;

use common::*;

/// The tiny LDM config with a `[text]` section, trained 6 steps at lr 5e-3, of
/// `conditioning`, with `extra` lines in `[train]`.
fn ldm_config(conditioning: &str, extra: &str) -> String {
    TinyLdmConfig {
        conditioning,
        text_encoder: true,
        steps: 6,
        lr: "5e-3",
        sample_every: 3,
        checkpoint_every: 3,
        extra_train: extra,
        ..Default::default()
    }
    .toml()
}

/// A tiny VAE run in `vae/` and a text LDM config in `text.toml`.
fn setup() -> TinyVae {
    let t = TinyVae::trained();
    std::fs::write(t.path("text.toml"), ldm_config("text", "")).unwrap();
    t
}

/// `generate --model <t/model> --out <t/out> -n 3 --seed 7 --device cpu` plus `extra`.
fn generate(t: &TinyVae, model: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let (model, out) = (t.p(model), t.p(out));
    let mut args = vec![
        "generate", "--model", &model, "--out", &out, "-n", "3", "--seed", "7", "--device", "cpu",
    ];
    args.extend_from_slice(extra);
    pipeline(&args)
}

fn pixels(t: &TinyVae, file: &str) -> Vec<u8> {
    image::open(t.path(file)).unwrap().to_luma8().into_raw()
}

fn record(t: &TinyVae, dir: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(t.path(dir).join("generate.json")).unwrap())
        .unwrap()
}

#[test]
fn a_text_model_trains_and_follows_prompts() {
    let t = setup();
    let o = t.train_ldm("text.toml", "ldm", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for file in [
        "tokenizer.json",
        "model.safetensors",
        "ldm.json",
        "samples/step-000006.png",
        "checkpoint/ema.bpk",
    ] {
        assert!(t.path("ldm").join(file).exists(), "missing {file}");
    }
    // a standard tokenizer.json: the vocabulary of the templates, lower-cased
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("ldm/tokenizer.json")).unwrap())
            .unwrap();
    let vocab = &tok["model"]["vocab"];
    for word in [
        "[PAD]",
        "[UNK]",
        "[BOS]",
        "a",
        "silhouette",
        "top",
        "-",
        "right",
    ] {
        assert!(vocab.get(word).is_some(), "{word} not in {vocab}");
    }
    let info = std::fs::read_to_string(t.path("ldm/ldm.json")).unwrap();
    assert!(info.contains("tokenizer_sha256"), "{info}");

    // same prompt and seed: identical files; the prompt is recorded everywhere
    let prompt = ["--prompt", "A  Top-Right", "--cfg", "3"];
    let o = generate(&t, "ldm", "g1", &prompt);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert!(generate(&t, "ldm", "g2", &prompt).status.success());
    for f in ["000.png", "001.png", "002.png", "grid.png", "generate.json"] {
        let sha = |d: &str| ldm_common::checkpoint::sha256_file(&t.path(d).join(f)).unwrap();
        assert_eq!(sha("g1"), sha("g2"), "{f} differs between equal seeds");
    }
    let r = record(&t, "g1");
    assert_eq!(r["prompt"], "A  Top-Right");
    assert_eq!(r["negative_prompt"], serde_json::Value::Null);
    assert_eq!(r["cfg"], 3.0);
    let text = ldm_common::image_io::read_png_text(&t.path("g1/000.png")).unwrap();
    assert!(
        text[0].1.contains("\"prompt\":\"A  Top-Right\""),
        "{}",
        text[0].1
    );

    // the prompt reaches the model: another prompt, other pixels
    let o = generate(&t, "ldm", "g3", &["--prompt", "bottom-left", "--cfg", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(pixels(&t, "g1/000.png"), pixels(&t, "g3/000.png"));

    // in bf16 the text encoder runs on the cast weights too: other pixels, recorded
    let mut bf16 = prompt.to_vec();
    bf16.extend(["--precision", "bf16"]);
    let o = generate(&t, "ldm", "g-bf16", &bf16);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(pixels(&t, "g1/000.png"), pixels(&t, "g-bf16/000.png"));
    assert_eq!(record(&t, "g-bf16")["sampler"]["precision"], "bf16");

    // a negative prompt replaces the empty prompt of the unconditional branch
    let o = generate(
        &t,
        "ldm",
        "g4",
        &[
            "--prompt",
            "a top-right",
            "--negative-prompt",
            "Bottom-Left",
            "--cfg",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = record(&t, "g4");
    assert_eq!(r["negative_prompt"], "Bottom-Left");
    let text = ldm_common::image_io::read_png_text(&t.path("g4/001.png")).unwrap();
    assert!(
        text[0].1.contains("\"negative_prompt\":\"Bottom-Left\""),
        "{}",
        text[0].1
    );
    assert_ne!(pixels(&t, "g1/000.png"), pixels(&t, "g4/000.png"));

    // words never seen in training: a warning naming them, and the images still come
    let o = generate(
        &t,
        "ldm",
        "g5",
        &["--prompt", "a Zebra top-right giraffe", "--cfg", "3"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("warning: --prompt: words not seen in training: \"Zebra\", \"giraffe\""),
        "{}",
        stderr(&o)
    );
    assert!(t.path("g5/002.png").exists());
    let o = generate(
        &t,
        "ldm",
        "g6",
        &["--prompt", "top-right", "--negative-prompt", "blurry"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: --negative-prompt: words not seen in training: \"blurry\""),
        "{}",
        stderr(&o)
    );

    // no prompt: the empty prompt, unguided
    let o = generate(&t, "ldm", "g7", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(record(&t, "g7")["cfg"], 1.0);

    let o = pipeline(&["eval-ldm", "--model", &t.p("ldm"), "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn prompt_errors_are_one_line() {
    let t = setup();
    assert!(t.train_ldm("text.toml", "ldm", &[]).status.success());
    assert_error(
        &generate(
            &t,
            "ldm",
            "g",
            &["--prompt", "a picture of a top-left silhouette"],
        ),
        "has 8 tokens, more than this model reads (text.max_tokens = 6)",
    );
    assert_error(
        &generate(
            &t,
            "ldm",
            "g",
            &["--prompt", "top-left", "--negative-prompt", "a a a a a a a"],
        ),
        "--negative-prompt: \"a a a a a a a\" has 7 tokens",
    );
    assert_error(
        &generate(&t, "ldm", "g", &["--prompt", "", "--cfg", "5"]),
        "--cfg 5 with an empty prompt",
    );
    assert_error(
        &generate(&t, "ldm", "g", &["--class", "top-left"]),
        "is text-conditioned: give --prompt",
    );

    // an unconditional model refuses a negative prompt
    std::fs::write(t.path("none.toml"), ldm_config("none", "")).unwrap();
    assert!(
        t.train_ldm("none.toml", "u", &["--steps", "1"])
            .status
            .success()
    );
    assert_error(
        &generate(&t, "u", "g", &["--negative-prompt", "top-left"]),
        "was trained unconditionally: it cannot follow --negative-prompt",
    );

    // a class model takes a negative prompt naming a class, and nothing else
    std::fs::write(t.path("class.toml"), ldm_config("class", "")).unwrap();
    assert!(
        t.train_ldm("class.toml", "c", &["--steps", "2"])
            .status
            .success()
    );
    // model.safetensors names the backbone's tensors as before the text encoder existed
    // ("DiT.blocks..."), so older runs still load; a text model adds "text_encoder..."
    let header = |run: &str| {
        let bytes = std::fs::read(t.path(run).join("model.safetensors")).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        String::from_utf8(bytes[8..8 + len].to_vec()).unwrap()
    };
    let (class_names, text_names) = (header("c"), header("ldm"));
    assert!(class_names.contains("\"DiT.blocks.0.") && !class_names.contains("backbone"));
    assert!(!class_names.contains("text_encoder"));
    assert!(text_names.contains("\"DiT.blocks.0.") && text_names.contains("\"text_encoder."));
    let o = generate(
        &t,
        "c",
        "gc",
        &["--class", "top-left", "--negative-prompt", "a bottom-right"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = record(&t, "gc");
    assert_eq!(r["negative_prompt"], "a bottom-right");
    assert_eq!(r["negative_class"], "bottom-right");
    assert_error(
        &generate(
            &t,
            "c",
            "g",
            &["--class", "top-left", "--negative-prompt", "blurry"],
        ),
        "--negative-prompt \"blurry\": this model is class-conditional and the negative prompt names none of its classes (top-left, top-right, bottom-left, bottom-right)",
    );

    // the [text] section is checked
    std::fs::write(
        t.path("bad.toml"),
        ldm_config("text", "").replace("heads = 2", "heads = 3"),
    )
    .unwrap();
    assert_error(
        &t.train_ldm("bad.toml", "b", &[]),
        "text.heads = 3: expected a divisor of text.dim = 16",
    );
    std::fs::write(
        t.path("bad.toml"),
        ldm_config("text", "").replace("max_tokens = 6", "max_words = 6"),
    )
    .unwrap();
    assert_error(
        &t.train_ldm("bad.toml", "b", &[]),
        "unknown field `max_words`",
    );
    std::fs::write(
        t.path("bad.toml"),
        ldm_config("text", "").replace("max_tokens = 6", "max_tokens = 0"),
    )
    .unwrap();
    assert_error(&t.train_ldm("bad.toml", "b", &[]), "text.max_tokens = 0");

    // a model folder whose tokenizer.json was replaced
    std::fs::write(t.path("ldm/tokenizer.json"), "{}").unwrap();
    assert_error(
        &generate(&t, "ldm", "g", &["--prompt", "top-left"]),
        "tokenizer.json has changed since this model was trained",
    );
}

#[test]
fn resume_is_exact_for_a_text_model() {
    let t = setup();
    // a constant learning rate: the cosine schedule of a 3-step run differs from a 6-step one's
    std::fs::write(
        t.path("const.toml"),
        ldm_config("text", "lr_decay = \"constant\""),
    )
    .unwrap();
    assert!(t.train_ldm("const.toml", "a", &[]).status.success());
    assert!(
        t.train_ldm("const.toml", "b", &["--steps", "3"])
            .status
            .success()
    );
    let o = t.train_ldm("const.toml", "b", &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        t.sha("a/model.safetensors"),
        t.sha("b/model.safetensors"),
        "resumed EMA weights (backbone and text encoder) differ from the uninterrupted run"
    );
    assert_eq!(t.sha("a/tokenizer.json"), t.sha("b/tokenizer.json"));
}

#[test]
fn eval_prompts_a_text_model_with_each_class_name() {
    let t = setup();
    assert!(t.train_ldm("text.toml", "ldm", &[]).status.success());
    std::fs::write(
        t.path("ev.toml"),
        tiny_evaluator_config(&t.path("data"), 4, TINY_EVALUATOR_TRAIN),
    )
    .unwrap();
    assert_ok(&t.train_evaluator("ev.toml", "ev", &[]));
    let o = pipeline(&[
        "eval",
        "--model",
        &t.p("ldm"),
        "--evaluator",
        &t.p("ev"),
        "--device",
        "cpu",
        "--steps",
        "3",
        "-n",
        "3",
        "--json",
        &t.p("eval.json"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("eval.json")).unwrap()).unwrap();
    assert_eq!(e["accuracy_per_class"].as_array().unwrap().len(), 4);
    assert!((0.0..=1.0).contains(&e["accuracy"].as_f64().unwrap()));
}

/// The captions of an image folder's `captions.jsonl` join the templates in the vocabulary.
#[test]
fn captions_of_an_image_folder_are_learned() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("imgs");
    for (class, color) in [("cat", [200u8, 120, 40]), ("dog", [30, 90, 220])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..8u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                let on = (x + y + i) % 7 < 3;
                image::Rgb(if on { color } else { [10, 10, 10] })
            });
            img.save(data.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let lines: String = (0..8)
        .map(|i| {
            format!("{{\"file\": \"cat/{i}.png\", \"caption\": \"a fluffy cat, sleeping\"}}\n")
        })
        .collect();
    std::fs::write(data.join("captions.jsonl"), lines).unwrap();
    std::fs::write(
        t.path().join("vae.toml"),
        format!(
            "[data]\nsource = \"image-folder\"\ndir = \"{}\"\nresolution = 16\nchannels = 3\nheld_out_fraction = 0.25\n\n[vae]\nbase_channels = 8\ngroups = 4\nlatent_channels = 2\ndownsample_factor = 2\nchannel_mult = [1, 2]\n\n[train]\nsteps = 2\nbatch_size = 4\nlog_every = 1\n",
            data.display()
        ),
    )
    .unwrap();
    std::fs::write(t.path().join("text.toml"), ldm_config("text", "")).unwrap();
    let p = |rel: &str| t.path().join(rel).display().to_string();
    let o = pipeline(&[
        "train-vae",
        "--config",
        &p("vae.toml"),
        "--out",
        &p("vae"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pipeline(&[
        "train-ldm",
        "--config",
        &p("text.toml"),
        "--vae",
        &p("vae"),
        "--out",
        &p("ldm"),
        "--device",
        "cpu",
        "--steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tok = std::fs::read_to_string(t.path().join("ldm/tokenizer.json")).unwrap();
    assert!(
        tok.contains("\"fluffy\"") && tok.contains("\"sleeping\""),
        "{tok}"
    );
    let o = pipeline(&[
        "generate",
        "--model",
        &p("ldm"),
        "--prompt",
        "a fluffy cat",
        "-n",
        "2",
        "--out",
        &p("g"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// `pipeline run` with a text LDM config: the closing grid prompts each class name, and
/// `generate --prompt` then works without `--model`.
#[test]
fn a_recipe_with_a_text_model_runs_end_to_end() {
    let t = TinyVae::new("");
    std::fs::write(t.path("text.toml"), ldm_config("text", "")).unwrap();
    std::fs::write(
        t.path("recipe.toml"),
        format!(
            "out = \"{}\"\nvae = \"{}\"\nldm = \"{}\"\n\n[grid]\nper_class = 2\ncfg = 3.0\n",
            t.p("out"),
            t.p("vae.toml"),
            t.p("text.toml")
        ),
    )
    .unwrap();
    let home = t.path("home");
    let run = |args: &[&str]| pipeline_home(&std::env::temp_dir(), &home, args);
    let o = run(&["run", &t.p("recipe.toml"), "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(t.path("out/grid.png").exists() && t.path("out/ldm/tokenizer.json").exists());
    let grid = image::open(t.path("out/grid.png")).unwrap();
    // 4 classes x 2 per class, one row per class: taller than wide
    assert!(
        grid.height() > grid.width(),
        "{}x{}",
        grid.width(),
        grid.height()
    );
    let o = run(&[
        "generate",
        "--prompt",
        "a bottom-right",
        "-n",
        "2",
        "--out",
        &t.p("g"),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("prompt \"a bottom-right\""),
        "{}",
        stdout(&o)
    );
}
