//! The one progress bar: step, throughput, ETA and a message with the current loss.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` units named `unit` (e.g. "step", "image").
pub fn bar(total: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let template = format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}s ({{per_sec}}, ETA {{eta}}) {{msg}}"
    );
    pb.set_style(ProgressStyle::with_template(&template).expect("valid template"));
    pb
}
