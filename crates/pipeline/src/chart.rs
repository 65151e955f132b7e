//! Line charts as PNG files: panels in a grid, drawn by plotters' bitmap backend into a
//! buffer and encoded by ldm-common's PNG writer. Text uses DejaVu Sans, embedded in the
//! binary (assets/fonts, Bitstream Vera licence) and rasterised by ab_glyph: no system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// Size of one panel in pixels; a figure is `cols * PANEL_W` by `rows * PANEL_H`.
pub const PANEL_W: u32 = 560;
pub const PANEL_H: u32 = 340;
/// Panels side by side before a new row starts.
pub const MAX_COLS: usize = 2;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font as "sans-serif" once per process.
fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the embedded DejaVu Sans font could not be loaded")
    }
}

/// How y values are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// log10 of the values (all must be > 0); ticks are labelled with the values themselves.
    Log,
}

impl Scale {
    /// The values in axis coordinates.
    pub fn apply(&self, values: &[f64]) -> Vec<f64> {
        match self {
            Scale::Linear => values.to_vec(),
            Scale::Log => values.iter().map(|v| v.log10()).collect(),
        }
    }

    /// Axis coordinates back to values.
    pub fn unapply(&self, coords: &[f64]) -> Vec<f64> {
        match self {
            Scale::Linear => coords.to_vec(),
            Scale::Log => coords.iter().map(|c| 10f64.powf(*c)).collect(),
        }
    }
}

/// How a line is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Thin and light: raw values under their smoothed line.
    Raw,
    /// Colour `i` of the palette, 2 px, with a dot on each point.
    Main(usize),
    /// Colour `i`, 2 px, no dots: a smoothed curve.
    Smooth(usize),
    /// Colour `i`, 2 px dashed, with a dot on each point: a variant of the line drawn in
    /// `Main(i)` (another timestep spacing of the same sampler).
    Dashed(usize),
    /// Grey and dashed: a reference level such as an FID floor.
    Reference,
}

/// One line of a panel, in data coordinates (not yet scaled).
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend entry (none: no legend entry).
    pub label: Option<String>,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Line {
    /// The raw values `ys` against `xs`, unlabelled.
    pub fn raw(xs: &[f64], ys: &[f64]) -> Self {
        Self {
            label: None,
            points: xs.iter().copied().zip(ys.iter().copied()).collect(),
            style: Style::Raw,
        }
    }
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: Scale,
    pub scale: Scale,
    pub lines: Vec<Line>,
}

const GREY: RGBColor = RGBColor(110, 110, 110);
const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
];

/// A tick label: 3 significant digits, exponent form outside [0.01, 10^5).
pub fn tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(0.01..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let digits = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// Tick positions in axis coordinates for `range` (also in axis coordinates): the bold ones
/// (labelled) and the light ones (grid). Linear: multiples of 1, 2 or 5 x 10^k, about six.
/// Log: 1, 2, 5 x 10^k (or 1..9 x 10^k, or linear ticks of the values when the range spans
/// less than that).
pub fn ticks(range: &std::ops::Range<f64>, scale: Scale) -> (Vec<f64>, Vec<f64>) {
    match scale {
        Scale::Linear => {
            let bold = linear_ticks(range.start, range.end, 6);
            let light = match bold.as_slice() {
                [a, b, ..] => linear_ticks(
                    range.start,
                    range.end,
                    ((range.end - range.start) / (b - a) * 5.0) as usize,
                ),
                _ => Vec::new(),
            };
            (bold, light)
        }
        Scale::Log => {
            let (lo, hi) = (range.start, range.end);
            let decades = lo.floor() as i32..=hi.ceil() as i32;
            let at = |mantissas: &[f64]| -> Vec<f64> {
                decades
                    .clone()
                    .flat_map(|k| mantissas.iter().map(move |m| (m * 10f64.powi(k)).log10()))
                    .filter(|v| (lo..=hi).contains(v))
                    .collect()
            };
            let all: Vec<f64> = (1..10).map(f64::from).collect();
            let coarse = at(&[1.0, 2.0, 5.0]);
            let bold = if coarse.len() >= 3 {
                coarse
            } else if at(&all).len() >= 3 {
                at(&all)
            } else {
                let (a, b) = (10f64.powf(lo), 10f64.powf(hi));
                linear_ticks(a, b, 5)
                    .into_iter()
                    .filter(|v| *v > 0.0)
                    .map(f64::log10)
                    .collect()
            };
            (bold, at(&all))
        }
    }
}

/// The multiples inside [lo, hi] of the step of 1, 2 or 5 x 10^k nearest to (hi - lo) / n.
fn linear_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi.is_nan() || lo.is_nan() || hi <= lo || n == 0 {
        return Vec::new();
    }
    let raw = (hi - lo) / n as f64;
    let base = 10f64.powf(raw.log10().floor());
    // the nice step nearest to the raw one in ratio
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .min_by(|a, b| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs()))
        .unwrap_or(base);
    // a tolerance for values such as 1.1 / 0.1 = 11.000000000000002
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A linear f64 axis whose grid lines are the ticks chosen by [`ticks`] (plotters' own float
/// axis picks its ticks itself, which suits no log axis).
struct Axis {
    range: std::ops::Range<f64>,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Axis {
    fn new(range: std::ops::Range<f64>, scale: Scale) -> Self {
        let (bold, light) = ticks(&range, scale);
        Self { range, bold, light }
    }
}

impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        RangedCoordf64::from(self.range.clone()).map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format(value: &f64) -> String {
        tick(*value)
    }
}

/// The range of the finite values, widened when empty or flat.
fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        0.04 * (hi - lo)
    } else {
        lo.abs().max(1.0) * 0.1
    };
    lo - pad..hi + pad
}

/// Draws `panels` on a grid of at most [`MAX_COLS`] columns and writes the PNG atomically
/// with the `text` chunks; returns its width and height.
pub fn draw_png(panels: &[Panel], path: &Path, text: &[(&str, &str)]) -> Result<(u32, u32)> {
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    register_font()?;
    let cols = panels.len().min(MAX_COLS);
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (cols as u32 * PANEL_W, rows as u32 * PANEL_H);
    let mut buffer = vec![0u8; (w * h * 3) as usize];
    {
        let draw_err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        for (area, panel) in root.split_evenly((rows, cols)).iter().zip(panels) {
            draw_panel(area, panel).map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))?;
    }
    ldm_common::image_io::write_png(path, &buffer, w as usize, h as usize, 3, text)
        .with_context(|| format!("cannot write the plot {}", path.display()))?;
    Ok((w, h))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type PanelResult = std::result::Result<
    (),
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
>;

fn draw_panel(area: &Area<'_>, panel: &Panel) -> PanelResult {
    let scaled: Vec<Vec<(f64, f64)>> = panel
        .lines
        .iter()
        .map(|l| {
            let xs = panel
                .x_scale
                .apply(&l.points.iter().map(|p| p.0).collect::<Vec<_>>());
            let ys = panel
                .scale
                .apply(&l.points.iter().map(|p| p.1).collect::<Vec<_>>());
            xs.into_iter()
                .zip(ys)
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let x_range = range(scaled.iter().flatten().map(|p| p.0));
    let mut y_range = range(scaled.iter().flatten().map(|p| p.1));
    // room above the data for the legend box (about 8% of the height per entry)
    let entries = panel.lines.iter().filter(|l| l.label.is_some()).count();
    if entries > 0 {
        y_range.end += (y_range.end - y_range.start) * (0.05 + 0.09 * entries as f64);
    }
    let (x_scale, scale) = (panel.x_scale, panel.scale);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(Axis::new(x_range, x_scale), Axis::new(y_range, scale))?;
    let desc = |label: &str, s: Scale| match s {
        Scale::Linear => label.to_string(),
        Scale::Log => format!("{label} (log scale)"),
    };
    chart
        .configure_mesh()
        .x_desc(desc(&panel.x_label, x_scale))
        .y_desc(desc(&panel.y_label, scale))
        .x_label_formatter(&|v| tick(x_scale.unapply(&[*v])[0]))
        .y_label_formatter(&|v| tick(scale.unapply(&[*v])[0]))
        .label_style(("sans-serif", 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    let mut legend = false;
    for (line, points) in panel.lines.iter().zip(scaled) {
        let series = match line.style {
            Style::Raw => chart.draw_series(LineSeries::new(
                points,
                RGBColor(170, 185, 215).stroke_width(1),
            ))?,
            Style::Main(i) => {
                let colour = PALETTE[i % PALETTE.len()];
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
                chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            }
            Style::Smooth(i) => {
                let colour = PALETTE[i % PALETTE.len()];
                chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            }
            Style::Dashed(i) => {
                let colour = PALETTE[i % PALETTE.len()];
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
                chart.draw_series(DashedLineSeries::new(points, 7, 4, colour.stroke_width(2)))?
            }
            Style::Reference => {
                chart.draw_series(DashedLineSeries::new(points, 6, 4, GREY.stroke_width(1)))?
            }
        };
        if let Some(label) = &line.label {
            legend = true;
            let colour = match line.style {
                Style::Raw => RGBColor(170, 185, 215),
                Style::Main(i) | Style::Smooth(i) | Style::Dashed(i) => PALETTE[i % PALETTE.len()],
                Style::Reference => GREY,
            };
            let series = series.label(label.as_str());
            if let Style::Dashed(_) = line.style {
                series.legend(move |(x, y)| {
                    DashedPathElement::new([(x, y), (x + 18, y)], 5, 3, colour.stroke_width(2))
                });
            } else {
                series.legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            }
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(1500.0), "1500");
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.001), "1.0e-3");
        assert_eq!(tick(123456.0), "1.2e5");
    }

    #[test]
    fn ticks_are_round_numbers() {
        let (bold, light) = ticks(&(0.0..1500.0), Scale::Linear);
        assert_eq!(
            bold,
            vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0, 1200.0, 1400.0]
        );
        assert!(light.len() > bold.len());
        // log: 0.04 .. 0.7 -> 0.05, 0.1, 0.2, 0.5
        let (bold, _) = ticks(&(0.04f64.log10()..0.7f64.log10()), Scale::Log);
        let values: Vec<String> = Scale::Log.unapply(&bold).iter().map(|v| tick(*v)).collect();
        assert_eq!(values, ["0.05", "0.1", "0.2", "0.5"]);
        // less than a factor 2: linear ticks of the values
        let (bold, _) = ticks(&(1.1f64.log10()..1.6f64.log10()), Scale::Log);
        let values: Vec<String> = Scale::Log.unapply(&bold).iter().map(|v| tick(*v)).collect();
        assert_eq!(values, ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]);
    }

    #[test]
    fn log_scale_round_trips() {
        let v = [0.01, 1.0, 250.0];
        let back = Scale::Log.unapply(&Scale::Log.apply(&v));
        for (a, b) in v.iter().zip(back) {
            assert!((a - b).abs() < 1e-12 * a.max(1.0));
        }
    }
}
