//! PNG plots drawn with plotters' bitmap backend. Text uses an embedded DejaVu Sans, so the
//! images look the same on every machine and never depend on the system's fontconfig.

use crate::style::{marker_at, method_style};
use crate::summary::{
    budget_order, budget_rank, methods, tasks, SummaryRow, BYTES_PER_MB, FULL_FINETUNE, HEAD_ONLY,
};
use crate::{ReportError, RunRecord, RunStatus};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Pixel size of `score_vs_params_<task>.png`.
pub const SCORE_VS_PARAMS_SIZE: (u32, u32) = (1000, 650);
/// Pixel size of `curves_<task>.png`.
pub const CURVES_SIZE: (u32, u32) = (1000, 650);
/// Pixel size of `score_vs_budget_<task>.png`.
pub const SCORE_VS_BUDGET_SIZE: (u32, u32) = (1000, 650);
/// Pixel size of `time_memory.png`.
pub const TIME_MEMORY_SIZE: (u32, u32) = (1400, 600);
/// Pixel size of `adalora_ranks.png`.
pub const ADALORA_RANKS_SIZE: (u32, u32) = (900, 700);

/// The font family every text in the plots uses; registered from the embedded TTF.
const FAMILY: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// One image written, with what the Markdown needs to embed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// File name inside the output directory (what the Markdown links to).
    pub file_name: String,
    /// Full path of the image.
    pub path: PathBuf,
    /// Short description, used as the image's alt text.
    pub title: String,
    /// The task it belongs to; None for plots over all tasks.
    pub task: Option<String>,
}

pub(crate) type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Registers the embedded font under [`FAMILY`] once per process: plotters' `ab_glyph`
/// backend finds fonts only in its own registry, never on the system.
pub(crate) fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::Font(
            "embedded DejaVuSans.ttf could not be parsed".into(),
        ))
    }
}

pub(crate) fn font(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
}

/// A file-name-safe form of a task name (task names come from suite files, not from us).
pub fn file_stem(task: &str) -> String {
    task.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Range of the finite values padded by 10 % (or a fixed amount when they are all equal), so
/// a single point or a flat series still gets a drawable, non-empty axis.
fn padded_range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 && span.is_finite() {
        span * 0.1
    } else if lo != 0.0 {
        lo.abs() * 0.05
    } else {
        0.5
    };
    (lo - pad, hi + pad)
}

/// Range for a log axis over the positive finite values (others cannot be placed on it).
fn log_range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.into_iter().filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    // Whole decades: plotters labels a log axis at powers of ten, so a range inside one
    // decade would get no labels.
    lo.is_finite().then(|| {
        (
            10f64.powf((lo / 2.0).log10().floor()),
            10f64.powf((hi * 2.0).log10().ceil()),
        )
    })
}

/// Compact parameter counts for axis labels: 1.5k, 20k, 1.2M.
fn format_count(v: f64) -> String {
    let (scaled, suffix) = if v.abs() >= 1e9 {
        (v / 1e9, "G")
    } else if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{scaled:.1}");
    format!("{}{suffix}", s.strip_suffix(".0").unwrap_or(&s))
}

/// Label of category `v` on an axis whose categories sit at 0, 1, 2, …
fn category_label(labels: &[String], v: f64) -> String {
    let i = v.round();
    if (v - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).cloned().unwrap_or_default()
}

pub(crate) type Root<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// An image that says why there is nothing to plot, so every link in the report resolves.
fn placeholder(root: &Root, title: &str, message: &str) -> DrawResult {
    let (_, h) = root.dim_in_pixel();
    root.draw(&Text::new(title.to_string(), (30, 30), font(26)))?;
    root.draw(&Text::new(
        message.to_string(),
        (30, h as i32 / 2),
        font(22),
    ))?;
    Ok(())
}

pub(crate) fn draw_to(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Root) -> DrawResult,
) -> Result<(), ReportError> {
    let result = (|| -> DrawResult {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        // Explicitly, because dropping the backend swallows write errors.
        root.present()?;
        Ok(())
    })();
    result.map_err(|e| ReportError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A horizontal reference line on the score plots.
struct Reference {
    label: String,
    value: f64,
    color: RGBColor,
}

/// The task's reference lines: full fine-tuning's mean, the head-only floor and chance, so no
/// plot cuts them off.
fn references(rows: &[&SummaryRow], chance: Option<f64>) -> Vec<Reference> {
    let mean_of = |method: &str| {
        rows.iter()
            .filter(|r| r.method == method)
            .find_map(|r| r.primary_mean.filter(|v| v.is_finite()))
    };
    let mut out = Vec::new();
    if let Some(v) = mean_of(FULL_FINETUNE) {
        out.push(Reference {
            label: format!("{FULL_FINETUNE} (mean)"),
            value: v,
            color: BLACK,
        });
    }
    if let Some(v) = mean_of(HEAD_ONLY) {
        out.push(Reference {
            label: format!("{HEAD_ONLY} floor (mean)"),
            value: v,
            color: RGBColor(120, 120, 120),
        });
    }
    if let Some(v) = chance.filter(|v| v.is_finite()) {
        out.push(Reference {
            label: "chance".into(),
            value: v,
            color: RGBColor(200, 40, 40),
        });
    }
    out
}

struct ScorePoint<'a> {
    method: &'a str,
    x: f64,
    y: f64,
    /// The bar: the 95% interval where outcomes were kept, else mean ± std over seeds.
    lo: f64,
    hi: f64,
}

fn score_points<'a>(
    rows: &[&'a SummaryRow],
    x: impl Fn(&SummaryRow) -> f64,
) -> Vec<ScorePoint<'a>> {
    rows.iter()
        .filter(|r| r.method != FULL_FINETUNE && r.method != HEAD_ONLY)
        .filter_map(|r| {
            let y = r.primary_mean.filter(|y| y.is_finite())?;
            let (lo, hi) = match r.primary_ci {
                Some(c) => (c.lo.min(y), c.hi.max(y)),
                None => {
                    let e = r.primary_std.filter(|s| s.is_finite()).unwrap_or(0.0);
                    (y - e, y + e)
                }
            };
            Some(ScorePoint {
                method: &r.method,
                x: x(r),
                y,
                lo,
                hi,
            })
        })
        .collect()
}

/// Head-only's score with its bar; x is set by the caller.
fn head_only_point<'a>(rows: &[&'a SummaryRow]) -> Option<ScorePoint<'a>> {
    let r = rows.iter().find(|r| r.method == HEAD_ONLY)?;
    let y = r.primary_mean.filter(|y| y.is_finite())?;
    let (lo, hi) = match r.primary_ci {
        Some(c) => (c.lo.min(y), c.hi.max(y)),
        None => {
            let e = r.primary_std.filter(|s| s.is_finite()).unwrap_or(0.0);
            (y - e, y + e)
        }
    };
    Some(ScorePoint {
        method: &r.method,
        x: 0.0,
        y,
        lo,
        hi,
    })
}

/// The y-axis label: what the bars are.
fn bar_label(metric: &str) -> String {
    format!("{metric} (mean; bars: 95% CI, or ± std over seeds)")
}

fn distinct_methods<'a>(points: &[ScorePoint<'a>]) -> Vec<&'a str> {
    let mut m: Vec<&str> = points.iter().map(|p| p.method).collect();
    m.sort();
    m.dedup();
    m
}

fn draw_score_vs_params(
    root: &Root,
    task: &str,
    rows: &[&SummaryRow],
    chance: Option<f64>,
) -> DrawResult {
    let metric = rows.first().map_or("score", |r| r.primary_metric.as_str());
    let title = format!("{task}: {metric} vs trainable parameters");
    // Points at x ≤ 0 cannot sit on a log axis; they are left out rather than clamped.
    let points: Vec<ScorePoint> = score_points(rows, |r| r.trainable_params)
        .into_iter()
        .filter(|p| p.x.is_finite() && p.x > 0.0)
        .collect();
    let Some((x_lo, x_hi)) = log_range(points.iter().map(|p| p.x)) else {
        return placeholder(
            root,
            &title,
            "No parameter-efficient run with a score to plot.",
        );
    };
    // Head-only trains no backbone parameter, so it has no place on a log axis: it gets a
    // decade of its own at the left edge, with its own marker.
    let head = head_only_point(rows);
    let data_lo = x_lo;
    let x_lo = if head.is_some() { x_lo / 10.0 } else { x_lo };
    let head = head.map(|mut p| {
        p.x = x_lo * 3.0;
        p
    });
    let refs = references(rows, chance);
    let (y_lo, y_hi) = padded_range(
        points
            .iter()
            .chain(head.iter())
            .flat_map(|p| [p.lo, p.hi])
            .chain(refs.iter().map(|r| r.value)),
    );
    let mut chart = ChartBuilder::on(root)
        .caption(&title, font(26))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc("trainable parameters (log scale)")
        .y_desc(bar_label(metric))
        // The head-only decade is not a parameter count: its ticks stay unlabelled.
        .x_label_formatter(&|v| {
            if *v < data_lo * 0.999 {
                String::new()
            } else {
                format_count(*v)
            }
        })
        .label_style(font(15))
        .axis_desc_style(font(18))
        .draw()?;
    for method in distinct_methods(&points) {
        let style = method_style(method);
        let color = style.color;
        let mut mine: Vec<&ScorePoint> = points.iter().filter(|p| p.method == method).collect();
        mine.sort_by(|a, b| a.x.total_cmp(&b.x));
        chart.draw_series(LineSeries::new(
            mine.iter().map(|p| (p.x, p.y)),
            color.mix(0.4).stroke_width(1),
        ))?;
        chart.draw_series(mine.iter().flat_map(|p| {
            let (lo, hi) = (p.lo, p.hi);
            // Caps a few percent wide in x: on a log axis a ratio is a fixed pixel width.
            [
                PathElement::new(vec![(p.x, lo), (p.x, hi)], color.stroke_width(2)),
                PathElement::new(
                    vec![(p.x / 1.06, lo), (p.x * 1.06, lo)],
                    color.stroke_width(2),
                ),
                PathElement::new(
                    vec![(p.x / 1.06, hi), (p.x * 1.06, hi)],
                    color.stroke_width(2),
                ),
            ]
        }))?;
        chart
            .draw_series(mine.iter().map(|p| marker_at(style, (p.x, p.y), 6)))?
            .label(method)
            .legend(move |(x, y)| marker_at(style, (x, y), 6));
    }
    if let Some(p) = head {
        let style = method_style(HEAD_ONLY);
        chart.draw_series([PathElement::new(
            vec![(p.x, p.lo), (p.x, p.hi)],
            style.color.stroke_width(2),
        )])?;
        chart.draw_series(DashedLineSeries::new(
            [(data_lo, y_lo), (data_lo, y_hi)],
            4,
            4,
            BLACK.mix(0.5).stroke_width(1),
        ))?;
        chart.draw_series([Text::new(
            "0",
            (p.x, y_lo),
            font(15).pos(Pos::new(HPos::Center, VPos::Bottom)),
        )])?;
        chart
            .draw_series([marker_at(style, (p.x, p.y), 6)])?
            .label(format!("{HEAD_ONLY} (0 trainable)"))
            .legend(move |(x, y)| marker_at(style, (x, y), 6));
    }
    for r in &refs {
        let c = r.color;
        chart
            .draw_series(DashedLineSeries::new(
                [(x_lo, r.value), (x_hi, r.value)],
                10,
                6,
                c.stroke_width(2),
            ))?
            .label(r.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x - 10, y), (x + 10, y)], c.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(font(15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn draw_score_vs_budget(
    root: &Root,
    task: &str,
    rows: &[&SummaryRow],
    order: &[String],
    chance: Option<f64>,
) -> DrawResult {
    let metric = rows.first().map_or("score", |r| r.primary_metric.as_str());
    let title = format!("{task}: {metric} vs budget");
    let mut budgets: Vec<String> = rows
        .iter()
        .filter(|r| {
            r.method != FULL_FINETUNE
                && r.method != HEAD_ONLY
                && r.primary_mean.is_some_and(f64::is_finite)
        })
        .map(|r| r.budget.clone())
        .collect();
    budgets.sort_by_key(|b| budget_rank(order, b));
    budgets.dedup();
    let points = score_points(rows, |r| {
        budgets.iter().position(|b| *b == r.budget).unwrap_or(0) as f64
    });
    if points.is_empty() {
        return placeholder(
            root,
            &title,
            "No parameter-efficient run with a score to plot.",
        );
    }
    let refs = references(rows, chance);
    let (y_lo, y_hi) = padded_range(
        points
            .iter()
            .flat_map(|p| [p.lo, p.hi])
            .chain(refs.iter().map(|r| r.value)),
    );
    let n = budgets.len();
    let x_range = -0.5..(n as f64 - 0.5);
    let mut chart = ChartBuilder::on(root)
        .caption(&title, font(26))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range.clone(), y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| category_label(&budgets, *v))
        .disable_x_mesh()
        .x_desc("parameter budget")
        .y_desc(bar_label(metric))
        .label_style(font(15))
        .axis_desc_style(font(18))
        .draw()?;
    let methods = distinct_methods(&points);
    for (k, method) in methods.iter().enumerate() {
        let style = method_style(method);
        let color = style.color;
        // Side-by-side offsets so that error bars of different methods do not overlap.
        let shift = (k as f64 - (methods.len() as f64 - 1.0) / 2.0) * 0.06;
        let mine: Vec<(f64, f64, f64, f64)> = points
            .iter()
            .filter(|p| p.method == *method)
            .map(|p| (p.x + shift, p.y, p.lo, p.hi))
            .collect();
        chart.draw_series(LineSeries::new(
            mine.iter().map(|p| (p.0, p.1)),
            color.mix(0.5).stroke_width(1),
        ))?;
        chart.draw_series(
            mine.iter()
                .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color.stroke_width(2))),
        )?;
        chart
            .draw_series(mine.iter().map(|p| marker_at(style, (p.0, p.1), 6)))?
            .label(*method)
            .legend(move |(x, y)| marker_at(style, (x, y), 6));
    }
    for r in &refs {
        let c = r.color;
        chart
            .draw_series(DashedLineSeries::new(
                [(x_range.start, r.value), (x_range.end, r.value)],
                10,
                6,
                c.stroke_width(2),
            ))?
            .label(r.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x - 10, y), (x + 10, y)], c.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(font(15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A legend label, the method (for its colour) and the (step, loss) points.
struct LossLine {
    label: String,
    method: String,
    points: Vec<(f64, f64)>,
}

/// One training-loss line per method: the mean over ok seeds of the method's largest budget
/// (one line per method keeps the plot readable; the full data is in curves.csv).
fn loss_lines(records: &[RunRecord], task: &str, order: &[String]) -> Vec<LossLine> {
    let ok: Vec<&RunRecord> = records
        .iter()
        .filter(|r| r.task == task && r.status == RunStatus::Ok)
        .collect();
    let mut lines = Vec::new();
    for method in methods(records) {
        let mine: Vec<&&RunRecord> = ok.iter().filter(|r| r.method == method).collect();
        let Some(budget) = mine
            .iter()
            .map(|r| &r.budget)
            .max_by_key(|b| budget_rank(order, b))
        else {
            continue;
        };
        let mut by_step: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
        for r in mine.iter().filter(|r| r.budget == *budget) {
            for p in r.curve.iter().filter(|p| p.train_loss.is_finite()) {
                let e = by_step.entry(p.step).or_insert((0.0, 0));
                e.0 += p.train_loss;
                e.1 += 1;
            }
        }
        let points: Vec<(f64, f64)> = by_step
            .into_iter()
            .map(|(s, (sum, n))| (s as f64, sum / n as f64))
            .collect();
        if !points.is_empty() {
            lines.push(LossLine {
                label: format!("{method} @ {budget}"),
                method: method.clone(),
                points,
            });
        }
    }
    lines
}

fn draw_curves(root: &Root, task: &str, records: &[RunRecord], order: &[String]) -> DrawResult {
    let title = format!("{task}: training loss (mean over seeds, largest budget per method)");
    let lines = loss_lines(records, task, order);
    if lines.is_empty() {
        return placeholder(root, &title, "No ok run with a finite training loss.");
    }
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let (x_lo, x_hi) = padded_range(all().map(|p| p.0));
    let (y_lo, y_hi) = padded_range(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(root)
        .caption(&title, font(24))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("training loss")
        .x_label_formatter(&|v| {
            // Steps are integers; fractional ticks appear only on very short ranges.
            if (v - v.round()).abs() < 1e-9 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .label_style(font(15))
        .axis_desc_style(font(18))
        .draw()?;
    for LossLine {
        label,
        method,
        points,
    } in &lines
    {
        let style = method_style(method);
        let color = style.color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x - 10, y), (x + 10, y)], color.stroke_width(2))
            });
        // A one-point line draws nothing; a marker keeps it visible.
        if points.len() == 1 {
            chart.draw_series(points.iter().map(|p| marker_at(style, *p, 5)))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(font(15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Horizontal bars (method names on the y axis have room for long names like `prefix_tuning`).
/// A bar with several values is stacked in `parts`' colours (and gets a legend); a bar with one
/// is in its method's colour.
fn draw_bars(
    area: &Root,
    title: &str,
    unit: &str,
    bars: &[(String, Vec<f64>)],
    parts: &[(&str, RGBColor)],
) -> DrawResult {
    // Stacked bars get a key in a strip of their own below the chart, where no bar can hide it.
    let (area, key) = if parts.is_empty() {
        (area.clone(), None)
    } else {
        let h = area.dim_in_pixel().1 as i32;
        let (a, k) = area.split_vertically(h - 36);
        (a, Some(k))
    };
    let area = &area;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let total = |v: &[f64]| v.iter().filter(|x| x.is_finite() && **x > 0.0).sum::<f64>();
    let max = bars.iter().map(|b| total(&b.1)).fold(0.0, f64::max);
    let x_hi = if max > 0.0 { max * 1.25 } else { 1.0 };
    let n = bars.len();
    // Reversed y range: the first method (by name) at the top.
    let mut chart = ChartBuilder::on(area)
        .caption(title, font(22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(140)
        .build_cartesian_2d(0.0..x_hi, (n as f64 - 0.5)..-0.5)?;
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| category_label(&names, *v))
        .disable_y_mesh()
        .x_desc(unit)
        .label_style(font(15))
        .axis_desc_style(font(17))
        .draw()?;
    for (i, (method, values)) in bars.iter().enumerate() {
        let y = i as f64;
        let mut x = 0.0;
        for (k, v) in values.iter().enumerate() {
            if !v.is_finite() || *v <= 0.0 {
                continue;
            }
            let color = match parts.get(k) {
                Some((_, c)) if values.len() > 1 => *c,
                _ => method_style(method).color,
            };
            chart.draw_series([Rectangle::new(
                [(x, y - 0.35), (x + v, y + 0.35)],
                color.filled(),
            )])?;
            x += v;
        }
        if x > 0.0 {
            chart.draw_series([Text::new(
                format!(" {x:.1}"),
                (x, y),
                font(14).pos(Pos::new(HPos::Left, VPos::Center)),
            )])?;
        }
    }
    if let Some(key) = key {
        let mut x = 20;
        for (label, color) in parts {
            key.draw(&Rectangle::new([(x, 8), (x + 14, 22)], color.filled()))?;
            key.draw(&Text::new(
                label.to_string(),
                (x + 20, 15),
                font(14).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
            x += 28 + 8 * label.len() as i32;
        }
    }
    Ok(())
}

/// The parts of a peak, bottom to top, with their colours.
const MEMORY_PARTS: [(&str, RGBColor); 4] = [
    ("base weights", RGBColor(160, 160, 160)),
    ("trained parameters", RGBColor(31, 119, 180)),
    ("AdamW state", RGBColor(255, 127, 14)),
    ("activations, gradients, rest", RGBColor(44, 160, 44)),
];

fn draw_time_memory(root: &Root, records: &[RunRecord]) -> DrawResult {
    let title = "Training cost per method (mean over all ok runs)";
    // Seconds, peak MB, the peak's parts in MB (when every run recorded them), run count.
    type Sums = (f64, f64, Option<[f64; 4]>, usize);
    let mut per_method: BTreeMap<&str, Sums> = BTreeMap::new();
    for r in records.iter().filter(|r| r.status == RunStatus::Ok) {
        let e = per_method
            .entry(&r.method)
            .or_insert((0.0, 0.0, Some([0.0; 4]), 0));
        e.0 += r.train_seconds;
        e.1 += r.peak_memory_bytes as f64 / BYTES_PER_MB;
        e.2 = match (e.2, &r.memory) {
            (Some(acc), Some(m)) => {
                let parts = [
                    m.base_weights_bytes,
                    m.trainable_bytes,
                    m.optimizer_bytes,
                    m.other_bytes,
                ];
                Some(std::array::from_fn(|i| {
                    acc[i] + parts[i] as f64 / BYTES_PER_MB
                }))
            }
            _ => None,
        };
        e.3 += 1;
    }
    if per_method.is_empty() {
        return placeholder(root, title, "No ok runs.");
    }
    let seconds: Vec<(String, f64)> = per_method
        .iter()
        .map(|(m, v)| (m.to_string(), v.0 / v.3 as f64))
        .collect();
    let split = per_method.values().all(|v| v.2.is_some());
    let memory: Vec<(String, Vec<f64>)> = per_method
        .iter()
        .map(|(m, v)| {
            let n = v.3 as f64;
            let parts = match v.2 {
                Some(p) if split => p.iter().map(|x| x / n).collect(),
                _ => vec![v.1 / n],
            };
            (m.to_string(), parts)
        })
        .collect();
    let panels = root.split_evenly((1, 2));
    let time: Vec<(String, Vec<f64>)> = seconds.into_iter().map(|(m, s)| (m, vec![s])).collect();
    draw_bars(&panels[0], "Mean training time", "seconds", &time, &[])?;
    let parts: &[(&str, RGBColor)] = if split { &MEMORY_PARTS } else { &[] };
    draw_bars(
        &panels[1],
        "Mean peak memory",
        "MB (10^6 bytes)",
        &memory,
        parts,
    )?;
    Ok(())
}

/// Final rank per (layer, matrix) from the first ok AdaLoRA run that recorded them.
struct RankGrid {
    run_id: String,
    rows: Vec<String>,
    columns: Vec<String>,
    cells: BTreeMap<(usize, usize), f64>,
}

/// Column order of the usual projection names; other names follow alphabetically.
const PROJ_ORDER: [&str; 7] = ["query", "key", "value", "attn_out", "up", "gate", "down"];

fn rank_grid(records: &[RunRecord]) -> Option<RankGrid> {
    let (run, ranks) = records
        .iter()
        .filter(|r| r.method == "adalora" && r.status == RunStatus::Ok)
        .find_map(|r| {
            let m = r.extra.get("final_ranks")?.as_object()?;
            (!m.is_empty()).then_some((r, m))
        })?;
    // Keys are `layer{i}.{proj}`; a key without a dot is its own row with column "rank".
    let entries: Vec<(String, Option<usize>, String, f64)> = ranks
        .iter()
        .filter_map(|(k, v)| {
            let value = v.as_f64()?;
            let (row, col) = k.split_once('.').unwrap_or((k.as_str(), "rank"));
            let layer = row.strip_prefix("layer").and_then(|i| i.parse().ok());
            Some((row.to_string(), layer, col.to_string(), value))
        })
        .collect();
    let mut rows: Vec<(Option<usize>, String)> =
        entries.iter().map(|e| (e.1, e.0.clone())).collect();
    rows.sort_by(|a, b| (a.0.is_none(), a.0, &a.1).cmp(&(b.0.is_none(), b.0, &b.1)));
    rows.dedup();
    let mut columns: Vec<String> = entries.iter().map(|e| e.2.clone()).collect();
    let col_key = |c: &String| {
        (
            PROJ_ORDER
                .iter()
                .position(|p| p == c)
                .unwrap_or(PROJ_ORDER.len()),
            c.clone(),
        )
    };
    columns.sort_by_key(col_key);
    columns.dedup();
    let cells = entries
        .iter()
        .map(|(row, _, col, v)| {
            let r = rows.iter().position(|x| x.1 == *row).unwrap_or(0);
            let c = columns.iter().position(|x| x == col).unwrap_or(0);
            ((r, c), *v)
        })
        .collect();
    Some(RankGrid {
        run_id: run.run_id.clone(),
        rows: rows.into_iter().map(|r| r.1).collect(),
        columns,
        cells,
    })
}

fn draw_rank_heatmap(root: &Root, grid: &RankGrid) -> DrawResult {
    let (nr, nc) = (grid.rows.len(), grid.columns.len());
    let max = grid
        .cells
        .values()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("AdaLoRA final rank per matrix ({})", grid.run_id),
            font(22),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(-0.5..(nc as f64 - 0.5), (nr as f64 - 0.5)..-0.5)?;
    chart
        .configure_mesh()
        .x_labels(nc)
        .y_labels(nr)
        .x_label_formatter(&|v| category_label(&grid.columns, *v))
        .y_label_formatter(&|v| category_label(&grid.rows, *v))
        .disable_mesh()
        .x_desc("matrix")
        .y_desc("layer")
        .label_style(font(15))
        .axis_desc_style(font(17))
        .draw()?;
    for r in 0..nr {
        for c in 0..nc {
            let (x, y) = (c as f64, r as f64);
            let value = grid.cells.get(&(r, c)).copied().filter(|v| v.is_finite());
            let t = match value {
                Some(v) if max > 0.0 => (v / max).clamp(0.0, 1.0),
                _ => 0.0,
            };
            // White (rank 0) to dark blue (the largest rank); grey where the matrix is absent.
            let fill = match value {
                Some(_) => RGBColor(
                    (255.0 - t * (255.0 - 8.0)) as u8,
                    (255.0 - t * (255.0 - 48.0)) as u8,
                    (255.0 - t * (255.0 - 107.0)) as u8,
                ),
                None => RGBColor(200, 200, 200),
            };
            chart.draw_series([
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], fill.filled()),
                Rectangle::new(
                    [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                    WHITE.stroke_width(1),
                ),
            ])?;
            let label = value.map_or("–".to_string(), |v| format!("{v}"));
            let color = if t > 0.55 { WHITE } else { BLACK };
            chart.draw_series([Text::new(
                label,
                (x, y),
                font(16)
                    .color(&color)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            )])?;
        }
    }
    Ok(())
}

/// Draws every plot for the records into `out_dir` and returns them in report order: per task
/// (score vs params, score vs budget, curves), then time/memory, then AdaLoRA's ranks when an
/// ok AdaLoRA run recorded them. No records gives no plots.
pub fn write_plots(
    records: &[RunRecord],
    rows: &[SummaryRow],
    out_dir: &Path,
) -> Result<Vec<Plot>, ReportError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    ensure_font()?;
    let order = budget_order(records);
    let mut plots = Vec::new();
    let mut add = |file_name: String,
                   title: String,
                   task: Option<&str>,
                   size,
                   draw: &dyn Fn(&Root) -> DrawResult| {
        let path = out_dir.join(&file_name);
        draw_to(&path, size, draw)?;
        plots.push(Plot {
            file_name,
            path,
            title,
            task: task.map(str::to_string),
        });
        Ok::<(), ReportError>(())
    };
    for task in tasks(records) {
        let task_rows: Vec<&SummaryRow> = rows.iter().filter(|r| r.task == task).collect();
        let chance = records
            .iter()
            .filter(|r| r.task == task)
            .find_map(|r| crate::chance::recorded_chance(r).map(|c| c.value));
        let stem = file_stem(&task);
        add(
            format!("score_vs_params_{stem}.png"),
            format!("{task}: score vs trainable parameters"),
            Some(&task),
            SCORE_VS_PARAMS_SIZE,
            &|root| draw_score_vs_params(root, &task, &task_rows, chance),
        )?;
        add(
            format!("score_vs_budget_{stem}.png"),
            format!("{task}: score vs budget"),
            Some(&task),
            SCORE_VS_BUDGET_SIZE,
            &|root| draw_score_vs_budget(root, &task, &task_rows, &order, chance),
        )?;
        add(
            format!("curves_{stem}.png"),
            format!("{task}: training loss"),
            Some(&task),
            CURVES_SIZE,
            &|root| draw_curves(root, &task, records, &order),
        )?;
    }
    add(
        "time_memory.png".into(),
        "training time and peak memory per method".into(),
        None,
        TIME_MEMORY_SIZE,
        &|root| draw_time_memory(root, records),
    )?;
    if let Some(grid) = rank_grid(records) {
        add(
            "adalora_ranks.png".into(),
            "AdaLoRA final ranks".into(),
            None,
            ADALORA_RANKS_SIZE,
            &|root| draw_rank_heatmap(root, &grid),
        )?;
    }
    Ok(plots)
}
