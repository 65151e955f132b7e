//! `pipeline run RECIPE`: the three stages of a recipe (pipelines/*.toml) in a row. A stage
//! already finished is kept; one that was interrupted is resumed from its checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::{builtin, ldm_stage, overrides, resume_check, vae_stage};

/// A recipe file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Output folder: `<out>/vae`, `<out>/ldm`, `<out>/grid.png`.
    pub out: PathBuf,
    /// VAE config: a file or a built-in name.
    pub vae: String,
    /// LDM config: a file or a built-in name.
    pub ldm: String,
    /// Settings of either stage's config, `STAGE.KEY=VALUE` as `--set` takes them (applied
    /// before the command line's), so a recipe can vary a config without copying it.
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(default)]
    pub grid: GridSettings,
}

/// The closing grid: one row per class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridSettings {
    #[serde(default = "d_per_class")]
    pub per_class: usize,
    #[serde(default = "d_cfg")]
    pub cfg: f64,
}

fn d_per_class() -> usize {
    8
}
fn d_cfg() -> f64 {
    5.0
}

impl Default for GridSettings {
    fn default() -> Self {
        Self {
            per_class: d_per_class(),
            cfg: d_cfg(),
        }
    }
}

/// Overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    /// `--set vae.KEY=VALUE` / `--set ldm.KEY=VALUE`: a key of one stage's config.
    pub sets: Vec<String>,
    pub vae_steps: Option<u64>,
    pub ldm_steps: Option<u64>,
    pub out: Option<PathBuf>,
}

/// Where a finished recipe put things, and how long each stage took.
pub struct RunSummary {
    pub vae: PathBuf,
    pub ldm: PathBuf,
    pub grid: PathBuf,
    pub timing: RunTiming,
}

/// `<out>/run.json`: wall seconds of each stage of the last `pipeline run` (`None`: the stage
/// was trained before and kept; a resumed stage counts only the part after the checkpoint).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTiming {
    pub recipe: String,
    pub vae_seconds: Option<f64>,
    pub ldm_seconds: Option<f64>,
    pub grid_seconds: f64,
    pub total_seconds: f64,
}

/// Splits `STAGE.KEY=VALUE` settings (`what` names their source in errors: `--set`, or the
/// recipe's `set =`) into the VAE's and the LDM's `KEY=VALUE` settings, appended to `vae` and
/// `ldm`.
fn stage_sets(
    what: &str,
    sets: &[String],
    vae: &mut Vec<String>,
    ldm: &mut Vec<String>,
) -> Result<()> {
    for s in sets {
        let s = s.trim_start();
        if let Some(rest) = s.strip_prefix("vae.") {
            vae.push(rest.to_string());
        } else if let Some(rest) = s.strip_prefix("ldm.") {
            ldm.push(rest.to_string());
        } else {
            bail!(
                "{what} {s}: expected a key starting with vae. or ldm. (the stage whose config it changes), e.g. ldm.schedule.kind=cosine"
            );
        }
    }
    Ok(())
}

/// Whether a stage has a checkpoint to resume.
fn has_checkpoint(dir: &Path) -> bool {
    dir.join("checkpoint/state.json").exists()
}

/// Runs the recipe; `None` if Ctrl-C stopped a stage (its checkpoint is saved).
pub fn run(recipe_arg: &str, o: &RunOverrides, device: &Device) -> Result<Option<RunSummary>> {
    let recipe_path = builtin::resolve(recipe_arg)?;
    let recipe: Recipe = crate::config::read(&recipe_path)?;
    // the configs it names: from the working folder, else beside the recipe, else built in
    let vae_config = builtin::beside(&recipe_path, &recipe.vae);
    let ldm_config = builtin::beside(&recipe_path, &recipe.ldm);
    if recipe.grid.per_class == 0 {
        bail!("grid.per_class = 0: expected at least 1");
    }
    let (mut vae_sets, mut ldm_sets) = (Vec::new(), Vec::new());
    let in_file = format!("{recipe_arg}: set =");
    stage_sets(&in_file, &recipe.set, &mut vae_sets, &mut ldm_sets)?;
    stage_sets("--set", &o.sets, &mut vae_sets, &mut ldm_sets)?;
    let out = o.out.clone().unwrap_or(recipe.out.clone());
    let start = Instant::now();
    let mut timing = RunTiming {
        recipe: recipe_arg.to_string(),
        ..RunTiming::default()
    };
    let (vae_dir, ldm_dir) = (out.join("vae"), out.join("ldm"));

    if !vae_dir.join("vae.json").exists() {
        eprintln!(
            "== stage 1/3: train-vae ({}) -> {}",
            recipe.vae,
            vae_dir.display()
        );
        let overrides = vae_stage::Overrides {
            data: None,
            train: crate::train::TrainOverrides {
                sets: vae_sets,
                steps: o.vae_steps,
                ..Default::default()
            },
        };
        let resume = has_checkpoint(&vae_dir);
        let stage = Instant::now();
        if vae_stage::train_vae(
            &builtin::resolve(&vae_config)?,
            &overrides,
            &vae_dir,
            device,
            resume,
        )?
        .is_none()
        {
            return Ok(None);
        }
        timing.vae_seconds = Some(stage.elapsed().as_secs_f64());
    } else {
        // a kept stage must have been trained with the settings asked for
        if !vae_sets.is_empty() {
            let config: vae_stage::VaeRunConfig =
                overrides::read(&builtin::resolve(&vae_config)?, &vae_sets)?;
            let kept = format!("{} is trained and kept", vae_dir.display());
            resume_check::compare(&vae_dir, &config, &kept)?;
        }
        eprintln!("== stage 1/3: {} is trained, kept", vae_dir.display());
    }
    if !ldm_dir.join("ldm.json").exists() {
        eprintln!(
            "== stage 2/3: train-ldm ({}) -> {}",
            recipe.ldm,
            ldm_dir.display()
        );
        let overrides = ldm_stage::Overrides {
            sets: ldm_sets,
            steps: o.ldm_steps,
            ..Default::default()
        };
        let resume = has_checkpoint(&ldm_dir);
        let stage = Instant::now();
        if ldm_stage::train_ldm(
            &builtin::resolve(&ldm_config)?,
            &vae_dir,
            &overrides,
            &ldm_dir,
            device,
            resume,
        )?
        .is_none()
        {
            return Ok(None);
        }
        timing.ldm_seconds = Some(stage.elapsed().as_secs_f64());
    } else {
        if !ldm_sets.is_empty() {
            let config: ldm_stage::LdmRunConfig =
                overrides::read(&builtin::resolve(&ldm_config)?, &ldm_sets)?;
            let kept = format!("{} is trained and kept", ldm_dir.display());
            resume_check::compare(&ldm_dir, &config, &kept)?;
        }
        eprintln!("== stage 2/3: {} is trained, kept", ldm_dir.display());
    }

    eprintln!("== stage 3/3: a grid with one row per class");
    let stage = Instant::now();
    let run = ldm_stage::LdmRun::load(&ldm_dir, device)?;
    let classes = run.info.class_names.len().max(1);
    let labels: Vec<usize> = (0..classes)
        .flat_map(|c| std::iter::repeat_n(c, recipe.grid.per_class))
        .collect();
    // a text model is prompted with each class name
    let labels = run.conditional().then_some(labels.as_slice());
    let n = classes * recipe.grid.per_class;
    let seed = run.config.train.seed;
    let images = run.sample_images(
        labels,
        n,
        recipe.grid.cfg,
        &run.config.sampler,
        seed,
        device,
        None,
    )?;
    let grid = out.join("grid.png");
    ldm_common::image_io::write_grid(&grid, images, recipe.grid.per_class)?;
    crate::generate::set_default_model(&ldm_dir)?;
    timing.grid_seconds = stage.elapsed().as_secs_f64();
    timing.total_seconds = start.elapsed().as_secs_f64();
    ldm_common::checkpoint::write_json(&out.join("run.json"), &timing)?;
    Ok(Some(RunSummary {
        vae: vae_dir,
        ldm: ldm_dir,
        grid,
        timing,
    }))
}
