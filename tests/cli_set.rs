//! `--set KEY=VALUE` config overrides end to end: they reach the run folder's `config.toml`
//! (a whole backbone table included), `--resume` and `pipeline run` refuse other settings than
//! the run was started with, and bad settings are one-line errors naming the key.

mod common;

use common::*;
use toml::Table;

/// The ablation settings of `scripts/results.sh sweep-ablation`, on a tiny U-Net.
const V: &str = "diffusion.parameterization=v";
const COSINE: &str = "schedule.kind=cosine";
const MIN_SNR: &str = "diffusion.loss={kind=\"min-snr\",gamma=5.0}";
const UNET: &str = "backbone={kind=\"unet\", base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2, groups=4}";

fn config_of(run: &std::path::Path) -> Table {
    std::fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

/// `args` with `--set S` for each setting.
fn with_sets<'a>(args: &[&'a str], sets: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    for s in sets {
        all.extend(["--set", s]);
    }
    all
}

#[test]
fn settings_reach_the_run_and_resume_must_repeat_them() {
    let t = TinyVae::new("");
    std::fs::write(t.path("ldm.toml"), TinyLdmConfig::default().toml()).unwrap();
    assert_ok(&t.train_vae(
        "vae.toml",
        "vae",
        &with_sets(&[], &["train.lr=2e-3", "vae.latent_channels=2"]),
    ));
    assert_eq!(
        config_of(&t.path("vae"))["train"]["lr"].as_float(),
        Some(2e-3)
    );

    let train = |out: &str, sets: &[&str], extra: &[&str]| {
        let mut flags = with_sets(&[], sets);
        flags.extend_from_slice(extra);
        t.train_ldm("ldm.toml", out, &flags)
    };
    let all = [V, COSINE, MIN_SNR, UNET];
    assert_ok(&train("ldm", &all, &[]));
    let c = config_of(&t.path("ldm"));
    assert_eq!(c["diffusion"]["parameterization"].as_str(), Some("v"));
    assert_eq!(c["schedule"]["kind"].as_str(), Some("cosine"));
    assert_eq!(c["diffusion"]["loss"]["kind"].as_str(), Some("min-snr"));
    assert_eq!(c["diffusion"]["loss"]["gamma"].as_float(), Some(5.0));
    let backbone = c["backbone"].as_table().unwrap();
    assert_eq!(backbone["kind"].as_str(), Some("unet"));
    assert_eq!(backbone["base_channels"].as_integer(), Some(8));
    assert!(!backbone.contains_key("patch_size"), "{backbone:?}");
    // keys no setting touched keep the file's values
    assert_eq!(c["diffusion"]["ema_decay"].as_float(), Some(0.9));
    assert_eq!(c["train"]["lr"].as_float(), Some(1e-3));
    // the run loads and is scored with the resolved config
    let out = t.p("ldm");
    let e = pipeline(&["eval-ldm", "--model", &out, "-n", "8", "--device", "cpu"]);
    assert_ok(&e);
    assert!(stdout(&e).contains("variational bound"), "{}", stdout(&e));

    // --resume continues only under the settings the run began with (more steps allowed)
    assert_ok(&train("half", &all, &["--steps", "2"]));
    assert_error(
        &train("half", &[COSINE, MIN_SNR, UNET], &["--resume"]),
        "the config the run was started with: diffusion.parameterization = \"epsilon\" (the run has \"v\")",
    );
    assert_error(
        &train("half", &all, &["--resume", "--set", "train.lr=0.5"]),
        "train.lr = 0.5 (the run has 0.001)",
    );
    assert_ok(&train("half", &all, &["--resume"]));
    assert_eq!(
        t.sha("ldm/model.safetensors"),
        t.sha("half/model.safetensors"),
        "a resumed run with the same settings differs from the straight one"
    );

    // bad settings of train-classifier fail before any training
    let o = pipeline(&[
        "train-classifier",
        "--model",
        &out,
        "--out",
        &t.p("cls"),
        "--device",
        "cpu",
        "--set",
        "classifier.widht=3",
    ]);
    assert_error(
        &o,
        "--set classifier.widht=3: classifier.widht: unknown field `widht`, expected one of",
    );
}

#[test]
fn bad_settings_are_one_line_errors_naming_the_key() {
    let t = TinyVae::new("");
    std::fs::write(t.path("ldm.toml"), TinyLdmConfig::default().toml()).unwrap();
    assert_ok(&t.train_vae("vae.toml", "vae", &["--steps", "1"]));
    let train = |set: &str| t.train_ldm("ldm.toml", "r", &["--set", set]);
    for (set, needle) in [
        (
            "diffusion.parameterization",
            "--set diffusion.parameterization: expected KEY=VALUE",
        ),
        (
            "diffusion.paramterization=v",
            "--set diffusion.paramterization=v: diffusion.paramterization: unknown field `paramterization`, expected one of `parameterization`",
        ),
        (
            "diffusion.parameterization=score",
            "--set diffusion.parameterization=score: diffusion.parameterization: unknown variant `score`, expected one of `epsilon`",
        ),
        (
            "train.steps.max=3",
            "--set train.steps.max=3: train.steps is an integer (4), not a table with keys",
        ),
        (
            "train.lr=fast",
            "--set train.lr=fast: train.lr: invalid type: string \"fast\", expected f64",
        ),
        (
            "train.lr=[1, ",
            "--set train.lr=[1, : \"[1,\" is not a TOML value",
        ),
        ("a..b=1", "--set a..b=1: \"a..b\" is not a dotted TOML key"),
        // switching the backbone keeps the DiT's keys: a whole table is needed
        (
            "backbone.kind=unet",
            "--set backbone.kind=unet: backbone: unknown field `depth`, expected one of `base_channels`",
        ),
        // checks after deserializing still name the key
        (
            "diffusion.ema_decay=2",
            "diffusion.ema_decay = 2: expected a number in [0, 1)",
        ),
    ] {
        assert_error(&train(set), needle);
    }
    assert!(
        !t.path("r/config.toml").exists(),
        "a refused run wrote its config"
    );

    let config = tiny_evaluator_config(&t.path("data"), 4, "steps = 2\nbatch_size = 16\n");
    std::fs::write(t.path("ev.toml"), config).unwrap();
    let o = t.train_evaluator("ev.toml", "ev", &["--set", "evaluator.feature_dims=8"]);
    assert_error(
        &o,
        "--set evaluator.feature_dims=8: evaluator.feature_dims: unknown field",
    );
    assert_ok(&t.train_evaluator("ev.toml", "ev", &["--set", "evaluator.feature_dim=6"]));
    assert_eq!(
        config_of(&t.path("ev"))["evaluator"]["feature_dim"].as_integer(),
        Some(6)
    );
}

#[test]
fn run_takes_stage_settings_and_keeps_only_matching_stages() {
    let t = TinyVae::new("");
    std::fs::write(t.path("ldm.toml"), TinyLdmConfig::default().toml()).unwrap();
    std::fs::write(
        t.path("recipe.toml"),
        format!(
            "out = \"{}\"\nvae = \"{}\"\nldm = \"{}\"\n\n[grid]\nper_class = 1\ncfg = 2.0\n",
            t.p("run"),
            t.p("vae.toml"),
            t.p("ldm.toml")
        ),
    )
    .unwrap();
    let run = |sets: &[&str]| {
        pipeline_home(
            &std::env::temp_dir(),
            &t.path("home"),
            &with_sets(&["run", &t.p("recipe.toml"), "--device", "cpu"], sets),
        )
    };
    assert_error(
        &run(&["schedule.kind=cosine"]),
        "--set schedule.kind=cosine: expected a key starting with vae. or ldm.",
    );
    assert_ok(&run(&["ldm.schedule.kind=cosine", "vae.train.lr=2e-3"]));
    assert_eq!(
        config_of(&t.path("run/ldm"))["schedule"]["kind"].as_str(),
        Some("cosine")
    );
    assert_eq!(
        config_of(&t.path("run/vae"))["train"]["lr"].as_float(),
        Some(2e-3)
    );
    assert!(t.path("run/grid.png").exists());
    let timing = |dir: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(t.path(dir).join("run.json")).unwrap())
            .unwrap()
    };
    let first = timing("run");
    assert!(first["ldm_seconds"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["total_seconds"].as_f64() >= first["ldm_seconds"].as_f64());
    // the same settings keep both stages; other ones are refused, naming the key
    assert_ok(&run(&["ldm.schedule.kind=cosine", "vae.train.lr=2e-3"]));
    let kept = timing("run");
    assert!(
        kept["vae_seconds"].is_null() && kept["ldm_seconds"].is_null(),
        "{kept}"
    );
    let o = run(&["ldm.schedule.kind=scaled-linear"]);
    assert_error(&o, "run/ldm is trained and kept: the settings differ from ");
    assert_error(
        &o,
        "schedule.kind = \"scaled-linear\" (the run has \"cosine\")",
    );
}

#[test]
fn a_recipe_sets_config_keys_before_the_command_line() {
    let t = TinyVae::new("");
    std::fs::write(t.path("ldm.toml"), TinyLdmConfig::default().toml()).unwrap();
    let recipe = |set: &str| {
        format!(
            "out = \"{}\"\nvae = \"{}\"\nldm = \"{}\"\nset = [{set}]\n\n[grid]\nper_class = 1\n",
            t.p("run"),
            t.p("vae.toml"),
            t.p("ldm.toml")
        )
    };
    std::fs::write(t.path("bad.toml"), recipe("\"train.steps=3\"")).unwrap();
    let home = t.path("home");
    let run = |args: &[&str]| pipeline_home(&std::env::temp_dir(), &home, args);
    let o = run(&["run", &t.p("bad.toml"), "--device", "cpu"]);
    assert_error(
        &o,
        "bad.toml: set = train.steps=3: expected a key starting with vae. or ldm.",
    );
    std::fs::write(
        t.path("r.toml"),
        recipe("\"ldm.schedule.kind=cosine\", \"ldm.train.steps=3\""),
    )
    .unwrap();
    // the command line's settings come after the recipe's
    let o = run(&[
        "run",
        &t.p("r.toml"),
        "--device",
        "cpu",
        "--set",
        "ldm.schedule.kind=scaled-linear",
    ]);
    assert_ok(&o);
    let config = config_of(&t.path("run/ldm"));
    assert_eq!(config["schedule"]["kind"].as_str(), Some("scaled-linear"));
    assert_eq!(config["train"]["steps"].as_integer(), Some(3));
}
