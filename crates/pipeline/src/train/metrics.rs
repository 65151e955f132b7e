//! `metrics.csv`: one row every `log_every` steps; on `--resume`, rows past the checkpoint are
//! dropped so the file reads as one uninterrupted run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Appends metric rows to a CSV file.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` with the given columns (after `step`), keeping rows up to `resume_step`
    /// when resuming and starting afresh otherwise.
    pub fn open(path: &Path, columns: &[&str], resume_step: Option<u64>) -> Result<Self> {
        let header = format!("step,{}", columns.join(","));
        let mut kept = vec![header.clone()];
        if let Some(limit) = resume_step
            && let Ok(text) = std::fs::read_to_string(path)
        {
            kept.extend(
                text.lines()
                    .skip(1)
                    .filter(|line| {
                        line.split(',')
                            .next()
                            .and_then(|s| s.parse::<u64>().ok())
                            .is_some_and(|s| s <= limit)
                    })
                    .map(String::from),
            );
        }
        ldm_common::checkpoint::atomic_write(path, format!("{}\n", kept.join("\n")).as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot append", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one row.
    pub fn row(&mut self, step: u64, values: &[f64]) -> Result<()> {
        let cells: Vec<String> = values.iter().map(|v| format!("{v:.6e}")).collect();
        writeln!(self.file, "{step},{}", cells.join(","))
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}
