//! `pipeline generate`: sample from a trained model and write `000.png`, `001.png`, ...,
//! `grid.png` and `generate.json`. Every PNG carries its settings in a `tEXt` chunk named
//! `parameters`, as popular diffusion UIs do; the same seed gives identical files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use serde::Serialize;

use ldm_common::checkpoint::{atomic_write, ensure_writable_dir, write_json};
use ldm_common::image_io::{encode_png, grid, interleaved, to_pixels};
use ldm_diffusion::clip::ill_conditioned_start_warning;
use ldm_diffusion::sampler::SamplerOptions;
use ldm_diffusion::schedule::Schedule;

use crate::classifier_stage::{ClassifierArgs, ClassifierRun};
use crate::cli::SamplerFlags;
use crate::img2img::Img2ImgArgs;
use crate::ldm_stage::{Condition, LdmRun};
use crate::sampling::{ClassifierGuide, SampleExtras, Trajectory};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub prompt: Option<String>,
    /// What guidance steers away from: a prompt for a text model (instead of the empty
    /// prompt), a prompt naming a class for a class model (instead of the null class).
    pub negative_prompt: Option<String>,
    pub class: Option<String>,
    pub cfg: Option<f64>,
    pub sampler: SamplerOptions,
    pub n: usize,
    pub seed: u64,
    /// Image-to-image / inpainting: `--init-image`, `--strength`, `--mask`.
    pub img2img: Option<Img2ImgArgs>,
    /// Classifier guidance: `--classifier`, `--classifier-scale`.
    pub classifier: Option<ClassifierArgs>,
    /// `--trajectory`: also draw the clean-latent estimate of the steps ([`TrajectoryRecord`]).
    pub trajectory: bool,
}

/// Rows (the first images) and columns (steps) of `trajectory.png`.
pub const TRAJECTORY_ROWS: usize = 8;
pub const TRAJECTORY_COLUMNS: usize = 10;

/// `trajectory.png`: how the clean-image estimate forms over the sampler's steps. One row per
/// image (the first [`TRAJECTORY_ROWS`]), one column per shown step: the VAE decode of the x0
/// the sampler's last network answer implied after that step (classifier-free guidance, a
/// guidance rescale, classifier guidance and clipping included), at up to
/// [`TRAJECTORY_COLUMNS`] steps evenly spread from the first to the last. The last column is
/// the final image for every sampler whose last step returns its x0 estimate (DDIM, PLMS,
/// DPM-Solver++, UniPC, Heun; DDPM and Langevin add their last noise-free update to it).
#[derive(Debug, Clone, Serialize)]
pub struct TrajectoryRecord {
    pub file: String,
    /// The steps the columns show, 1-based, out of `sampler_steps`.
    pub steps: Vec<usize>,
    pub sampler_steps: usize,
    pub rows: usize,
}

/// Every setting of a generation, as written to `generate.json` and each PNG.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateRecord {
    pub model: PathBuf,
    pub model_sha256: String,
    pub vae_sha256: String,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub class: Option<String>,
    /// The class a class model's negative prompt names (the unconditional branch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_class: Option<String>,
    pub cfg: f64,
    pub sampler: SamplerOptions,
    pub n: usize,
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub img2img: Option<Img2ImgRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classifier_guidance: Option<ClassifierRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trajectory: Option<TrajectoryRecord>,
    pub files: Vec<String>,
}

/// The image-to-image settings of a generation.
#[derive(Debug, Clone, Serialize)]
pub struct Img2ImgRecord {
    pub init_image_sha256: String,
    pub strength: f64,
    /// Inpainting: the mask's checksum (white = repainted).
    pub mask_sha256: Option<String>,
    /// The init image as the VAE reconstructs it: what img2img starts from.
    pub init_reconstruction: String,
}

/// The classifier-guidance settings of a generation.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifierRecord {
    pub classifier: PathBuf,
    pub classifier_sha256: String,
    /// The class the classifier's gradient pushes toward.
    pub class: String,
    pub scale: f64,
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

/// The class a class model's `--negative-prompt` names, with a clear error for none.
fn resolve_negative_class(run: &LdmRun, args: &GenerateArgs) -> Result<Option<usize>> {
    match args.negative_prompt.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(p) => match class_of_prompt(p, &run.info.class_names) {
            Some(c) => Ok(Some(c)),
            None => bail!(
                "--negative-prompt {p:?}: this model is class-conditional and the negative prompt names none of its classes ({})",
                run.info.class_names.join(", ")
            ),
        },
    }
}

/// A text model's prompt and negative prompt, each checked against `text.max_tokens`.
fn resolve_prompts(run: &LdmRun, args: &GenerateArgs) -> Result<(String, Option<String>)> {
    if let Some(name) = &args.class {
        bail!(
            "--class {name}: {} is text-conditioned: give --prompt instead (e.g. --prompt {name:?})",
            run.dir.display()
        );
    }
    let tokenizer = run
        .tokenizer
        .as_ref()
        .context("a text model without a tokenizer")?;
    let prompt = args.prompt.clone().unwrap_or_default();
    tokenizer.encode(&prompt).context("--prompt")?;
    if let Some(negative) = &args.negative_prompt {
        tokenizer.encode(negative).context("--negative-prompt")?;
    }
    Ok((prompt, args.negative_prompt.clone()))
}

/// Lines about the sampler settings: the warning for an epsilon model whose sampler starts
/// where its x0 estimate is ill-conditioned ([`ill_conditioned_start_warning`]; only
/// `from_noise`: image-to-image starts lower), and the note that Karras spacing runs fewer
/// steps than asked ([`SamplerOptions::fewer_steps_note`]).
pub fn sampler_warnings(run: &LdmRun, options: &SamplerOptions, from_noise: bool) -> Vec<String> {
    let start = from_noise
        .then(|| {
            ill_conditioned_start_warning(
                run.config.diffusion.parameterization,
                &run.schedule,
                options,
            )
        })
        .flatten();
    start
        .into_iter()
        .chain(options.fewer_steps_note(&run.schedule))
        .collect()
}

/// Warnings about a request, one line each: the sampler's ([`sampler_warnings`]), a guidance
/// rescale without classifier-free guidance to rescale, and the words of `--prompt` and
/// `--negative-prompt` that a text model's tokenizer never saw in training.
pub fn request_warnings(run: &LdmRun, args: &GenerateArgs) -> Result<Vec<String>> {
    let mut lines = sampler_warnings(run, &args.sampler, args.img2img.is_none());
    let cfg = args.cfg.unwrap_or(run.config.guidance.cfg);
    let phi = args.sampler.guidance_rescale;
    if phi > 0.0 && (cfg == 1.0 || !run.conditional()) {
        lines.push(format!(
            "warning: guidance rescale {phi} has no effect without classifier-free guidance (cfg {cfg}{}): it rescales the guided prediction",
            if run.conditional() { "" } else { ", an unconditional model" }
        ));
    }
    let Some(tokenizer) = &run.tokenizer else {
        return Ok(lines);
    };
    for (flag, text) in [
        ("--prompt", &args.prompt),
        ("--negative-prompt", &args.negative_prompt),
    ] {
        if let Some(text) = text {
            let words = tokenizer.unknown_words(text)?;
            lines.extend(crate::text::unknown_words_warning(flag, &words));
        }
    }
    Ok(lines)
}

/// Resolves `--class` / `--prompt` to class ids against the model, with clear errors.
fn resolve_class(run: &LdmRun, args: &GenerateArgs) -> Result<Option<usize>> {
    let classes = &run.info.class_names;
    let valid = || classes.join(", ");
    if !run.class_conditional() && args.negative_prompt.is_some() {
        bail!(
            "{} was trained unconditionally: it cannot follow --negative-prompt (train with diffusion.conditioning = \"class\" or \"text\")",
            run.dir.display()
        );
    }
    // An unconditional model follows a class only through a classifier's guidance.
    if !run.class_conditional() && args.classifier.is_none() {
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

/// A generation held in memory: one PNG per image (each with the `parameters` chunk), the grid
/// PNG, and the record (its `files` name the images in order: `000.png`, `001.png`, ...).
#[derive(Debug, Clone)]
pub struct Generation {
    pub record: GenerateRecord,
    pub images: Vec<Vec<u8>>,
    pub grid: Vec<u8>,
    /// img2img: the init image as the VAE reconstructs it (PNG), named
    /// `record.img2img.init_reconstruction`.
    pub init_reconstruction: Option<Vec<u8>>,
    /// `--trajectory`: the PNG named `record.trajectory.file`.
    pub trajectory: Option<Vec<u8>>,
}

/// The sampler of a request: the model's `[sampler]` (`defaults`) with the given overrides,
/// checked against its schedule (steps in 1..=T). Shared by `generate` and `serve`.
pub fn sampler_options(
    defaults: &SamplerOptions,
    schedule: &Schedule,
    flags: &SamplerFlags,
) -> Result<SamplerOptions> {
    let mut options = defaults.clone();
    if let Some(name) = &flags.sampler {
        options.kind = name.parse()?;
    }
    if let Some(spacing) = &flags.spacing {
        options.spacing = spacing.parse()?;
    }
    if let Some(c) = flags.clip_x0 {
        options.clip_x0 = Some(c);
    }
    if let Some(phi) = flags.guidance_rescale {
        options.guidance_rescale = phi;
    }
    if let Some(steps) = flags.steps {
        let t = schedule.num_timesteps();
        if steps < 1 || steps as usize > t {
            bail!("--steps {steps}: expected 1 to {t} (the model's number of timesteps)");
        }
        options.steps = steps as usize;
    }
    if let Some(eta) = flags.eta {
        options.eta = eta;
    }
    if let Some(precision) = flags.precision {
        options.precision = precision;
    }
    options.validate(schedule)?;
    Ok(options)
}

/// Resolves a request against the model, samples, and encodes the PNGs in memory: the one
/// library call behind `generate` and `serve`. `progress(done, total)` runs after every sampler
/// step; returning `false` cancels (the error is then `DiffusionError::Cancelled`).
pub fn generate_images(
    run: &LdmRun,
    args: &GenerateArgs,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Generation> {
    if args.n == 0 {
        bail!("-n 0: expected at least one image");
    }
    args.sampler.validate(&run.schedule)?;
    // The condition of every image, whether there is one, and whether a negative prompt
    // replaces the unconditional branch.
    let (condition, class, negative_class, guided) = if run.text_conditional() {
        let (prompt, negative) = resolve_prompts(run, args)?;
        let guided = !prompt.trim().is_empty() || negative.is_some();
        let condition = Condition::Text {
            prompts: vec![prompt; args.n],
            negative,
        };
        (condition, None, None, guided)
    } else {
        let class = resolve_class(run, args)?;
        let negative = resolve_negative_class(run, args)?;
        let condition = match (class, negative) {
            (None, None) => Condition::None,
            // an unconditional model asked for a class (by classifier guidance)
            _ if !run.class_conditional() => Condition::None,
            // a negative class alone: guidance from it toward the null class
            (c, negative) => Condition::Class {
                labels: vec![c.unwrap_or(run.info.class_names.len()); args.n],
                negative,
            },
        };
        let guided = run.class_conditional() && (class.is_some() || negative.is_some());
        (condition, class, negative, guided)
    };
    let cfg = args.cfg.unwrap_or(run.config.guidance.cfg);
    if !cfg.is_finite() || cfg < 0.0 {
        bail!("--cfg {cfg}: expected a number >= 0");
    }
    if !guided && run.conditional() && cfg != 1.0 && args.cfg.is_some() {
        bail!(
            "--cfg {cfg} with an empty prompt: guidance pushes away from the unconditional prediction toward a condition, and there is none; give --prompt or --class, or use --cfg 1"
        );
    }
    let cfg = if guided { cfg } else { 1.0 };
    let init = args
        .img2img
        .as_ref()
        .map(|a| crate::img2img::prepare(&run.vae, a, device))
        .transpose()?;
    let guide = args
        .classifier
        .as_ref()
        .map(|c| load_guide(run, args, c, class, device))
        .transpose()?;
    let trajectory = args.trajectory.then(Trajectory::default);
    let extras = SampleExtras {
        init: init.as_ref(),
        classifier: guide.as_ref().map(|g| ClassifierGuide {
            classifier: &g.classifier.model,
            labels: &g.labels,
            scale: g.scale,
        }),
        trajectory: trajectory.as_ref(),
    };
    let images = run.sample(
        &condition,
        args.n,
        cfg,
        &args.sampler,
        args.seed,
        extras,
        device,
        Some(progress),
    )?;
    let mut record = GenerateRecord {
        model: run.dir.clone(),
        model_sha256: run.info.weights_sha256.clone(),
        vae_sha256: run.info.vae_sha256.clone(),
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        class: class.map(|c| run.info.class_names[c].clone()),
        negative_class: negative_class.map(|c| run.info.class_names[c].clone()),
        cfg,
        sampler: args.sampler.clone(),
        n: args.n,
        seed: args.seed,
        img2img: init.as_ref().map(|i| Img2ImgRecord {
            init_image_sha256: i.init_sha256.clone(),
            strength: i.strength,
            mask_sha256: i.mask_sha256.clone(),
            init_reconstruction: "init.png".into(),
        }),
        classifier_guidance: guide.as_ref().map(|g| ClassifierRecord {
            classifier: g.classifier.dir.clone(),
            classifier_sha256: g.classifier.info.weights_sha256.clone(),
            class: run.info.class_names[g.labels[0]].clone(),
            scale: g.scale,
        }),
        trajectory: None,
        files: vec![],
    };
    let pixels = to_pixels(images);
    let settings = serde_json::to_string(&record)?;
    let mut pngs = Vec::with_capacity(args.n);
    for i in 0..args.n {
        let text = format!("{settings} index {i}");
        pngs.push(encode_png(
            &interleaved(&pixels, i),
            pixels.width,
            pixels.height,
            pixels.channels,
            &[("parameters", &text)],
        ));
        record.files.push(format!("{i:03}.png"));
    }
    let (g, gw, gh) = grid(&pixels, (args.n as f64).sqrt().ceil() as usize);
    let grid = encode_png(&g, gw, gh, pixels.channels, &[("parameters", &settings)]);
    // after the PNGs: their `parameters` hold what makes the image, not what else was drawn
    let trajectory = match trajectory.map(|t| t.take()) {
        Some(estimates) if !estimates.is_empty() => {
            let (steps, rows) = trajectory_columns(estimates.len(), args.n);
            let png = trajectory_png(run, &estimates, &steps, rows)?;
            record.trajectory = Some(TrajectoryRecord {
                file: "trajectory.png".into(),
                steps: steps.iter().map(|s| s + 1).collect(),
                sampler_steps: estimates.len(),
                rows,
            });
            Some(png)
        }
        _ => None,
    };
    let init_reconstruction = init.map(|i| {
        let p = to_pixels(crate::sampling::decode(&run.vae, i.z0));
        encode_png(&interleaved(&p, 0), p.width, p.height, p.channels, &[])
    });
    Ok(Generation {
        record,
        images: pngs,
        grid,
        init_reconstruction,
        trajectory,
    })
}

/// The 0-based steps `trajectory.png` shows out of `total` (up to [`TRAJECTORY_COLUMNS`],
/// evenly spread, first and last included) and its rows out of `n` images.
fn trajectory_columns(total: usize, n: usize) -> (Vec<usize>, usize) {
    let columns = total.min(TRAJECTORY_COLUMNS);
    let steps = (0..columns)
        .map(|j| match columns {
            1 => total - 1,
            _ => (j as f64 * (total - 1) as f64 / (columns - 1) as f64).round() as usize,
        })
        .collect();
    (steps, n.min(TRAJECTORY_ROWS))
}

/// The grid of [`TrajectoryRecord`]: image i's estimate after `steps[j]` at row i, column j.
fn trajectory_png(
    run: &LdmRun,
    estimates: &[Tensor<4>],
    steps: &[usize],
    rows: usize,
) -> Result<Vec<u8>> {
    let decoded: Vec<Tensor<4>> = steps
        .iter()
        .map(|&s| crate::sampling::decode(&run.vae, estimates[s].clone().narrow(0, 0, rows)))
        .collect();
    let cells = (0..rows)
        .flat_map(|i| decoded.iter().map(move |d| d.clone().narrow(0, i, 1)))
        .collect();
    let pixels = to_pixels(Tensor::cat(cells, 0));
    let (g, width, height) = grid(&pixels, steps.len());
    Ok(encode_png(&g, width, height, pixels.channels, &[]))
}

/// A loaded `--classifier`, the class of every image, and the scale.
struct Guide {
    classifier: ClassifierRun,
    labels: Vec<usize>,
    scale: f64,
}

/// Loads `--classifier` for `run` and picks the class it guides toward: `--class`, or the
/// class a prompt names.
fn load_guide(
    run: &LdmRun,
    args: &GenerateArgs,
    c: &ClassifierArgs,
    class: Option<usize>,
    device: &Device,
) -> Result<Guide> {
    let classifier = ClassifierRun::load(&c.dir, device)?;
    classifier.check_model(run)?;
    let class = class.or_else(|| {
        args.prompt
            .as_deref()
            .and_then(|p| class_of_prompt(p, &run.info.class_names))
    });
    match class {
        Some(y) => Ok(Guide {
            classifier,
            labels: vec![y; args.n],
            scale: c.scale,
        }),
        None => bail!(
            "--classifier needs a class to guide toward: give --class NAME or a prompt naming one ({})",
            run.info.class_names.join(", ")
        ),
    }
}

/// `pipeline generate`: runs [`generate_images`] with a progress bar and writes `000.png`, ...,
/// `grid.png` and `generate.json` to `out`; returns the record.
pub fn generate(
    run: &LdmRun,
    args: &GenerateArgs,
    out: &Path,
    device: &Device,
) -> Result<GenerateRecord> {
    ensure_writable_dir(out)?;
    for line in request_warnings(run, args)? {
        eprintln!("{line}");
    }
    let mut bar = None;
    let mut progress = |done: usize, total: usize| {
        bar.get_or_insert_with(|| crate::progress::bar(total as u64, "step"))
            .set_position(done as u64);
        true
    };
    let generation = generate_images(run, args, device, &mut progress)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for (name, png) in generation.record.files.iter().zip(&generation.images) {
        atomic_write(&out.join(name), png)?;
    }
    atomic_write(&out.join("grid.png"), &generation.grid)?;
    if let (Some(png), Some(r)) = (&generation.init_reconstruction, &generation.record.img2img) {
        atomic_write(&out.join(&r.init_reconstruction), png)?;
    }
    if let (Some(png), Some(r)) = (&generation.trajectory, &generation.record.trajectory) {
        atomic_write(&out.join(&r.file), png)?;
    }
    write_json(&out.join("generate.json"), &generation.record)?;
    Ok(generation.record)
}

/// Where the README's first command records its model, so `generate` needs no `--model`.
pub fn default_model_file() -> PathBuf {
    ldm_common::home::dir().join("default-model")
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
