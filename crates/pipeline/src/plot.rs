//! `pipeline plot RUN_DIR`: the curves of a run's `metrics.csv` (any stage: VAE, LDM,
//! evaluator) as one PNG, drawn with plotters in pure Rust (the bitmap backend, text by
//! ab_glyph from the embedded DejaVu Sans; no system font library).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::chart::{self, Panel, Scale};

/// The columns of a `metrics.csv`: `step` and every numeric column after it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsTable {
    pub steps: Vec<f64>,
    /// (name, one value per row).
    pub columns: Vec<(String, Vec<f64>)>,
}

/// The smoothed line spans this fraction of a run: its time constant is rows / 40 logged rows.
pub const EMA_ROWS_PER_CONSTANT: f64 = 40.0;

/// Decay a of the EMA drawn over `rows` raw values: a time constant tau = max(1, rows / 40)
/// rows, a = 1 - 1 / tau (no smoothing up to 40 rows), so every plot is smoothed alike
/// whatever its `log_every`.
pub fn ema_decay(rows: usize) -> f64 {
    1.0 - 1.0 / (rows as f64 / EMA_ROWS_PER_CONSTANT).max(1.0)
}

/// Parses a metrics CSV. `source` names the file in errors. The first column must be `step`;
/// a column is numeric when its first row parses as a number (others are left out), after
/// which every row must hold a number there; line numbers in errors count the header as 1.
pub fn parse_metrics(text: &str, source: &str) -> Result<MetricsTable> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{source}: not a CSV file"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.iter().all(String::is_empty) {
        bail!("{source}: empty; expected a header line `step,<metric>,...` and rows of numbers");
    }
    if header[0] != "step" {
        bail!(
            "{source}: the first column is `{}`; expected `step` (a metrics.csv written by a training command)",
            header[0]
        );
    }
    let mut steps = Vec::new();
    let mut columns: Vec<(String, Vec<f64>)> = Vec::new();
    // index into the record of each kept column
    let mut kept: Vec<usize> = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{source}: unreadable row"))?;
        let line = record.position().map_or(row as u64 + 2, |p| p.line());
        if record.len() != header.len() {
            bail!(
                "{source}: line {line}: {} values for the {} columns of the header ({})",
                record.len(),
                header.len(),
                header.join(",")
            );
        }
        let number = |i: usize| record[i].trim().parse::<f64>().ok();
        if row == 0 {
            kept = (1..header.len()).filter(|&i| number(i).is_some()).collect();
            columns = kept
                .iter()
                .map(|&i| (header[i].clone(), Vec::new()))
                .collect();
        }
        let Some(step) = number(0) else {
            bail!(
                "{source}: line {line}: step `{}` is not a number",
                &record[0]
            );
        };
        steps.push(step);
        for (&i, (name, values)) in kept.iter().zip(columns.iter_mut()) {
            let Some(v) = number(i) else {
                bail!(
                    "{source}: line {line}: column `{name}` holds `{}`, not a number",
                    &record[i]
                );
            };
            values.push(v);
        }
    }
    if steps.is_empty() {
        bail!("{source}: no rows yet, only the header; a run logs one every `log_every` steps");
    }
    if columns.is_empty() {
        bail!("{source}: no numeric column besides `step`");
    }
    Ok(MetricsTable { steps, columns })
}

/// Reads `run_dir/metrics.csv`.
pub fn read_metrics(run_dir: &Path) -> Result<MetricsTable> {
    if !run_dir.is_dir() {
        bail!(
            "{}: no such run folder; expected a folder written by train-vae, train-ldm or train-evaluator",
            run_dir.display()
        );
    }
    let path = run_dir.join("metrics.csv");
    if !path.is_file() {
        bail!(
            "{}: not found; expected the metrics.csv of a training run in {}",
            path.display(),
            run_dir.display()
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    parse_metrics(&text, &path.display().to_string())
}

/// A loss-like column (plotted on a log axis): its name says so and every value is > 0.
pub fn is_loss_like(name: &str, values: &[f64]) -> bool {
    const WORDS: [&str; 6] = ["loss", "recon", "kl", "mse", "nll", "vlb"];
    let lower = name.to_lowercase();
    WORDS.iter().any(|w| lower.contains(w))
        && values.iter().filter(|v| v.is_finite()).all(|&v| v > 0.0)
}

/// The exponential moving average s_i = a s_{i-1} + (1 - a) x_i, s_0 = x_0, with decay `a`;
/// non-finite values are skipped.
pub fn ema(values: &[f64], decay: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut s: Option<f64> = None;
    for &x in values {
        if x.is_finite() {
            s = Some(match s {
                Some(prev) => decay * prev + (1.0 - decay) * x,
                None => x,
            });
        }
        out.push(s.unwrap_or(f64::NAN));
    }
    out
}

/// `pipeline plot`: one panel per numeric column against step, raw values and their EMA;
/// returns the PNG's path and its size in pixels.
pub fn plot_run(run_dir: &Path, out: Option<&Path>) -> Result<(PathBuf, u32, u32)> {
    let table = read_metrics(run_dir)?;
    let out = out.map_or_else(|| run_dir.join("metrics.png"), Path::to_path_buf);
    let panels: Vec<Panel> = table
        .columns
        .iter()
        .map(|(name, values)| {
            let scale = if is_loss_like(name, values) {
                Scale::Log
            } else {
                Scale::Linear
            };
            // smoothed in axis coordinates: a geometric mean on a log axis
            let smooth = ema(&scale.apply(values), ema_decay(values.len()));
            Panel {
                title: format!("{} ({})", name, run_dir.display()),
                x_label: "step".into(),
                y_label: name.clone(),
                x_scale: Scale::Linear,
                scale,
                lines: vec![
                    chart::Line::raw(&table.steps, values),
                    chart::Line {
                        label: None,
                        points: table
                            .steps
                            .iter()
                            .zip(scale.unapply(&smooth))
                            .map(|(&s, v)| (s, v))
                            .collect(),
                        style: chart::Style::Smooth(0),
                    },
                ],
            }
        })
        .collect();
    let (w, h) = chart::draw_png(&panels, &out, &[("Source", "pipeline plot")])?;
    Ok((out, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_numeric_columns_of_any_run() {
        let t = parse_metrics(
            "step,loss,accuracy,lr,images_per_s\n20,2.1,0.3,1e-3,100\n40,1.5,0.5,2e-3,120.5\n",
            "m.csv",
        )
        .unwrap();
        assert_eq!(t.steps, vec![20.0, 40.0]);
        let names: Vec<&str> = t.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["loss", "accuracy", "lr", "images_per_s"]);
        assert_eq!(t.columns[2].1, vec![1e-3, 2e-3]);
        // a text column is left out
        let t = parse_metrics("step,phase,kl\n1,warmup,0.5\n2,main,0.4\n", "m.csv").unwrap();
        assert_eq!(t.columns, vec![("kl".to_string(), vec![0.5, 0.4])]);
    }

    #[test]
    fn bad_files_name_the_line_and_column() {
        let err = |text: &str| parse_metrics(text, "m.csv").unwrap_err().to_string();
        assert_eq!(
            err(""),
            "m.csv: empty; expected a header line `step,<metric>,...` and rows of numbers"
        );
        assert_eq!(
            err("step,loss\n"),
            "m.csv: no rows yet, only the header; a run logs one every `log_every` steps"
        );
        assert_eq!(
            err("step,loss\n1,0.5\n2,0.4,9\n"),
            "m.csv: line 3: 3 values for the 2 columns of the header (step,loss)"
        );
        assert_eq!(
            err("step,loss\n1,0.5\n2,abc\n"),
            "m.csv: line 3: column `loss` holds `abc`, not a number"
        );
        assert_eq!(
            err("step,loss\nx,0.5\n"),
            "m.csv: line 2: step `x` is not a number"
        );
        assert!(err("time,loss\n1,2\n").contains("expected `step`"));
        assert_eq!(
            err("step,phase\n1,a\n"),
            "m.csv: no numeric column besides `step`"
        );
    }

    #[test]
    fn loss_columns_go_on_a_log_axis_and_the_ema_smooths() {
        assert!(is_loss_like("loss", &[1.0, 0.5]));
        assert!(is_loss_like("recon", &[0.1]));
        assert!(!is_loss_like("loss", &[1.0, -0.5]));
        assert!(!is_loss_like("accuracy", &[0.5]));
        assert_eq!(ema_decay(10), 0.0);
        assert_eq!(ema_decay(400), 0.9);
        assert_eq!(ema(&[3.0, 1.0], ema_decay(2)), vec![3.0, 1.0]);
        let s = ema(&[1.0, 0.0, f64::NAN, 0.0], 0.9);
        assert_eq!(s[0], 1.0);
        assert!((s[1] - 0.9).abs() < 1e-12);
        assert!((s[2] - 0.9).abs() < 1e-12);
        assert!((s[3] - 0.81).abs() < 1e-12);
    }
}
