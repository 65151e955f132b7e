//! `pipeline generate`: sample from a trained model and write `000.png`, `001.png`, ...,
//! `grid.png` and `generate.json`. Every PNG carries its settings in a `tEXt` chunk named
//! `parameters`, as popular diffusion UIs do; the same seed gives identical files.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::Serialize;

use ldm_common::checkpoint::{ensure_writable_dir, write_json};
use ldm_common::image_io::{encode_png, grid, interleaved, to_pixels};
use ldm_diffusion::sampler::SamplerOptions;

use crate::ldm_stage::LdmRun;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub prompt: Option<String>,
    pub class: Option<String>,
    pub cfg: Option<f64>,
    pub sampler: SamplerOptions,
    pub n: usize,
    pub seed: u64,
    pub out: PathBuf,
}

/// Every setting of a generation, as written to `generate.json` and each PNG.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateRecord {
    pub model: PathBuf,
    pub model_sha256: String,
    pub vae_sha256: String,
    pub prompt: Option<String>,
    pub class: Option<String>,
    pub cfg: f64,
    pub sampler: SamplerOptions,
    pub n: usize,
    pub seed: u64,
    pub files: Vec<String>,
}

/// Normalises a prompt: lower case, single spaces.
pub fn normalize_prompt(prompt: &str) -> String {
    prompt
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The class a prompt names for a class-conditional model: the class name itself, or a
/// template around it ("a cat", "a silhouette of a cat", "cat silhouette").
fn class_of_prompt(prompt: &str, classes: &[String]) -> Option<usize> {
    let p = normalize_prompt(prompt);
    classes.iter().position(|c| {
        let c = c.to_lowercase();
        p == c
            || p.split(' ')
                .collect::<Vec<_>>()
                .windows(c.split(' ').count())
                .any(|w| w.join(" ") == c)
    })
}

/// Resolves `--class` / `--prompt` to class ids against the model, with clear errors.
fn resolve_class(run: &LdmRun, args: &GenerateArgs) -> Result<Option<usize>> {
    let classes = &run.info.class_names;
    let valid = || classes.join(", ");
    if !run.class_conditional() {
        if args.class.is_some() || args.prompt.as_deref().is_some_and(|p| !p.trim().is_empty()) {
            bail!(
                "{} was trained unconditionally: it cannot follow --prompt or --class (train with diffusion.conditioning = \"class\")",
                run.dir.display()
            );
        }
        return Ok(None);
    }
    if let Some(name) = &args.class {
        return classes
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name.trim()))
            .map(Some)
            .ok_or_else(|| {
                anyhow::anyhow!("--class {name}: unknown class; valid classes: {}", valid())
            });
    }
    match args.prompt.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(p) => match class_of_prompt(p, classes) {
            Some(c) => Ok(Some(c)),
            None => bail!(
                "--prompt {p:?}: this model is class-conditional and the prompt names none of its classes ({})",
                valid()
            ),
        },
    }
}

/// Runs a generation and writes its files; returns the record.
pub fn generate(run: &LdmRun, args: &GenerateArgs, device: &Device) -> Result<GenerateRecord> {
    if args.n == 0 {
        bail!("-n 0: expected at least one image");
    }
    args.sampler.validate(&run.schedule)?;
    let class = resolve_class(run, args)?;
    let cfg = args.cfg.unwrap_or(run.config.guidance.cfg);
    if !cfg.is_finite() || cfg < 0.0 {
        bail!("--cfg {cfg}: expected a number >= 0");
    }
    if class.is_none() && run.class_conditional() && cfg != 1.0 && args.cfg.is_some() {
        bail!(
            "--cfg {cfg} with an empty prompt: guidance pushes away from the unconditional prediction toward a condition, and there is none; give --prompt or --class, or use --cfg 1"
        );
    }
    ensure_writable_dir(&args.out)?;
    let labels = class.map(|c| vec![c; args.n]);
    let cfg = if class.is_some() { cfg } else { 1.0 };
    let bar = crate::progress::bar(args.sampler.steps as u64, "step");
    let mut progress = |done: usize, _total: usize| {
        bar.set_position(done as u64);
        true
    };
    let images = run.sample_images(
        labels.as_deref(),
        args.n,
        cfg,
        &args.sampler,
        args.seed,
        device,
        Some(&mut progress),
    )?;
    bar.finish_and_clear();
    let mut record = GenerateRecord {
        model: run.dir.clone(),
        model_sha256: run.info.weights_sha256.clone(),
        vae_sha256: run.info.vae_sha256.clone(),
        prompt: args.prompt.clone(),
        class: class.map(|c| run.info.class_names[c].clone()),
        cfg,
        sampler: args.sampler.clone(),
        n: args.n,
        seed: args.seed,
        files: vec![],
    };
    let pixels = to_pixels(images);
    let settings = serde_json::to_string(&record)?;
    for i in 0..args.n {
        let name = format!("{i:03}.png");
        let text = format!("{settings} index {i}");
        let png = encode_png(
            &interleaved(&pixels, i),
            pixels.width,
            pixels.height,
            pixels.channels,
            &[("parameters", &text)],
        );
        ldm_common::checkpoint::atomic_write(&args.out.join(&name), &png)?;
        record.files.push(name);
    }
    let (g, gw, gh) = grid(&pixels, (args.n as f64).sqrt().ceil() as usize);
    ldm_common::image_io::write_png(
        &args.out.join("grid.png"),
        &g,
        gw,
        gh,
        pixels.channels,
        &[("parameters", &settings)],
    )?;
    write_json(&args.out.join("generate.json"), &record)?;
    Ok(record)
}

/// Where the README's first command records its model, so `generate` needs no `--model`.
pub fn default_model_file() -> PathBuf {
    let home = std::env::var_os("PIPELINE_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share/latent-diffusion-rs"))
        })
        .unwrap_or_else(|| PathBuf::from(".latent-diffusion-rs"));
    home.join("default-model")
}

/// The model `generate` uses without `--model`.
pub fn default_model() -> Result<PathBuf> {
    let file = default_model_file();
    match std::fs::read_to_string(&file) {
        Ok(path) => Ok(PathBuf::from(path.trim())),
        Err(_) => bail!(
            "no --model given and no default model recorded in {} yet: run `bash scripts/setup.sh` (or `pipeline run pipelines/animals.toml`) first",
            file.display()
        ),
    }
}

/// Records `model` as the default of `generate`.
pub fn set_default_model(model: &Path) -> Result<()> {
    let abs = std::path::absolute(model)?;
    ldm_common::checkpoint::atomic_write(
        &default_model_file(),
        format!("{}\n", abs.display()).as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_name_classes() {
        let classes: Vec<String> = ["bear", "cat", "ankle boot"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(class_of_prompt("  A   Cat ", &classes), Some(1));
        assert_eq!(class_of_prompt("a silhouette of a cat", &classes), Some(1));
        assert_eq!(class_of_prompt("ankle boot", &classes), Some(2));
        assert_eq!(class_of_prompt("catapult", &classes), None);
        assert_eq!(normalize_prompt(" Two  Words "), "two words");
    }
}
