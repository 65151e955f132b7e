//! `pipeline plot-sweep`: FID and accuracy against the number of sampling steps, the guidance
//! scale or the guidance rescale, from the JSON files `pipeline eval --json` wrote for each setting; a PNG
//! and a Markdown table (stdout), so that a results page can be rebuilt from the files.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use ldm_diffusion::sampler::rescale_suffix;

use crate::chart::{self, Line, Panel, Scale, Style};

/// The x axis of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepAxis {
    /// Denoising steps (log axis); one line per sampler and guidance scale.
    Steps,
    /// Classifier-free guidance scale; one line per sampler and step count.
    Cfg,
    /// Guidance rescale phi (`--guidance-rescale`); one line per sampler, step count and
    /// guidance scale.
    Rescale,
}

#[derive(Debug, Clone, Deserialize)]
struct SamplerPart {
    kind: String,
    steps: usize,
    /// `trailing` (the default) in every file written so far but the Karras sweeps.
    #[serde(default = "trailing")]
    spacing: String,
    /// Absent in files of plain guidance.
    #[serde(default)]
    guidance_rescale: f64,
}

fn trailing() -> String {
    "trailing".into()
}

impl EvalPoint {
    /// The sampler as the labels and the table show it: `ddim`, or `ddim karras` where the
    /// timestep spacing is not the default trailing.
    fn sampler_text(&self) -> String {
        match self.sampler.spacing.as_str() {
            "trailing" => self.sampler.kind.clone(),
            spacing => format!("{} {spacing}", self.sampler.kind),
        }
    }

    /// `cfg` as the table and the labels show it: `5`, or `5 rescaled by 0.7`.
    fn cfg_text(&self) -> String {
        format!(
            "{}{}",
            self.cfg,
            rescale_suffix(self.sampler.guidance_rescale)
        )
    }

    /// `, rescaled by 0.7`, or nothing.
    fn rescale_text(&self) -> String {
        match rescale_suffix(self.sampler.guidance_rescale) {
            s if s.is_empty() => s,
            s => format!(",{s}"),
        }
    }
}

/// The fields of an `eval.json` a sweep reads.
#[derive(Debug, Clone, Deserialize)]
struct EvalPoint {
    per_class: usize,
    cfg: f64,
    sampler: SamplerPart,
    accuracy: f64,
    fid: f64,
    fid_floor: f64,
    precision: f64,
    recall: f64,
    images_per_second: f64,
}

fn read_point(path: &Path) -> Result<EvalPoint> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not an eval JSON written by `pipeline eval --json` ({e})",
            path.display()
        )
    })
}

/// Points grouped into lines: the label of the line and its points sorted by x.
fn group(
    points: Vec<(PathBuf, EvalPoint)>,
    axis: SweepAxis,
) -> BTreeMap<String, Vec<(f64, EvalPoint)>> {
    let mut lines: BTreeMap<String, Vec<(f64, EvalPoint)>> = BTreeMap::new();
    for (_, p) in points {
        let (label, x) = match axis {
            SweepAxis::Steps => (
                format!("{} cfg {}", p.sampler_text(), p.cfg_text()),
                p.sampler.steps as f64,
            ),
            SweepAxis::Cfg => (
                format!(
                    "{} {} steps{}",
                    p.sampler_text(),
                    p.sampler.steps,
                    p.rescale_text()
                ),
                p.cfg,
            ),
            SweepAxis::Rescale => (
                format!(
                    "{} {} steps cfg {}",
                    p.sampler_text(),
                    p.sampler.steps,
                    p.cfg
                ),
                p.sampler.guidance_rescale,
            ),
        };
        lines.entry(label).or_default().push((x, p));
    }
    for points in lines.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    lines
}

/// Writes the sweep's PNG to `out` and returns its Markdown table.
pub fn plot_sweep(files: &[PathBuf], axis: SweepAxis, out: &Path) -> Result<String> {
    if files.is_empty() {
        bail!("no eval JSON files given; expected the files `pipeline eval --json FILE` wrote");
    }
    let points = files
        .iter()
        .map(|f| read_point(f).map(|p| (f.clone(), p)))
        .collect::<Result<Vec<_>>>()?;
    let lines = group(points, axis);
    let x_label = match axis {
        SweepAxis::Steps => "sampling steps",
        SweepAxis::Cfg => "guidance scale w",
        SweepAxis::Rescale => "guidance rescale phi",
    };
    let x_scale = match axis {
        SweepAxis::Steps => Scale::Log,
        SweepAxis::Cfg | SweepAxis::Rescale => Scale::Linear,
    };
    // A line's colour is that of its label with the sampler's plain name: the same sampler on
    // another timestep spacing (`ddim karras`) is its line dashed.
    let plain = |label: &str, p: &EvalPoint| {
        format!("{}{}", p.sampler.kind, &label[p.sampler_text().len()..])
    };
    let colours: Vec<String> = lines
        .iter()
        .map(|(label, pts)| plain(label, &pts[0].1))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut fid = Vec::new();
    let mut acc = Vec::new();
    for (i, (label, pts)) in lines.iter().enumerate() {
        let xy = |f: fn(&EvalPoint) -> f64| pts.iter().map(|(x, p)| (*x, f(p))).collect();
        let first = &pts[0].1;
        let colour = colours
            .iter()
            .position(|c| *c == plain(label, first))
            .unwrap_or(i);
        let style = if first.sampler.spacing == "trailing" {
            Style::Main(colour)
        } else {
            Style::Dashed(colour)
        };
        fid.push(Line {
            label: Some(label.clone()),
            points: xy(|p| p.fid),
            style,
        });
        // the floors depend on the images per class only: one legend entry for all
        fid.push(Line {
            label: (i == 0).then(|| "real-vs-real floor (dashed)".to_string()),
            points: xy(|p| p.fid_floor),
            style: Style::Reference,
        });
        acc.push(Line {
            label: Some(label.clone()),
            points: xy(|p| 100.0 * p.accuracy),
            style,
        });
    }
    let panel = |title: &str, y: &str, scale, lines| Panel {
        title: title.into(),
        x_label: x_label.into(),
        y_label: y.into(),
        x_scale,
        scale,
        lines,
    };
    let panels = [
        panel(&format!("FID vs {x_label}"), "FID", Scale::Log, fid),
        panel(
            &format!("conditional accuracy vs {x_label}"),
            "accuracy (%)",
            Scale::Linear,
            acc,
        ),
    ];
    chart::draw_png(&panels, out, &[("Source", "pipeline plot-sweep")])?;
    Ok(table(&lines))
}

/// The sweep as a Markdown table, one row per file, grouped by line.
fn table(lines: &BTreeMap<String, Vec<(f64, EvalPoint)>>) -> String {
    let mut out = String::from(
        "| sampler | steps | cfg | images per class | accuracy | FID | FID floor | precision | recall | images/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (_, p) in lines.values().flatten() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1}% | {:.2} | {:.2} | {:.3} | {:.3} | {:.1} |",
            p.sampler_text(),
            p.sampler.steps,
            p.cfg_text(),
            p.per_class,
            100.0 * p.accuracy,
            p.fid,
            p.fid_floor,
            p.precision,
            p.recall,
            p.images_per_second
        );
    }
    out
}
