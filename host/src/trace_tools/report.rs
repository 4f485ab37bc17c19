//! `stepscope trace report`: one self-contained HTML file (inline SVG and CSS, no script, no
//! network fetch) with time-series charts of the traced steps, per-request swimlanes from the
//! snapshots, and the summary table.
//!
//! Charts are drawn by `plotters` into SVG strings (this module only feeds it the series):
//! batch composition (prefill and decode tokens per step, stacked), running and waiting
//! depth, KV usage, and step duration with the steps that preempted marked. The x axis is the
//! step id, so gaps between traced steps show as straight segments. Swimlanes put one lane per
//! snapshotted request (the first [`MAX_LANES`]), a cell per step that snapshotted it, coloured
//! by phase and shaded by the KV blocks it held.

use std::fmt::Write as _;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::load::TraceFile;
use super::summary::Summary;

/// Requests drawn in the swimlane chart at most.
pub const MAX_LANES: usize = 40;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 260;

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing the {chart} chart: {message}")]
pub struct ReportError {
    chart: &'static str,
    message: String,
}

/// The report for `trace` with its `summary`, as one HTML document.
pub fn render(trace: &TraceFile, summary: &Summary) -> Result<String, ReportError> {
    let charts = [
        ("Batch composition (tokens per step)", batch_chart(trace)?),
        ("Queue depths", queue_chart(trace)?),
        ("KV cache usage", kv_chart(trace)?),
        (
            "Step duration (red: steps that preempted)",
            duration_chart(trace)?,
        ),
        (
            "Requests (snapshots: orange prefill, blue decode, darker for more KV blocks)",
            swimlanes(trace)? + &request_table(trace),
        ),
    ];
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <title>stepscope trace report</title><style>{CSS}</style></head><body>\
         <h1>stepscope trace report</h1><p class=\"file\">{}</p>",
        escape(&summary.file)
    );
    let _ = write!(
        html,
        "<section><h2>Summary</h2>{}</section>",
        table(summary)
    );
    for (title, svg) in charts {
        let _ = write!(
            html,
            "<section class=\"chart\"><h2>{}</h2>{svg}</section>",
            escape(title)
        );
    }
    let _ = writeln!(
        html,
        "<p class=\"note\">{}</p></body></html>",
        escape(summary.note)
    );
    Ok(html)
}

const CSS: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:1000px}\
h1{font-size:22px}h2{font-size:16px;margin:18px 0 6px}\
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th:first-child,td:first-child{text-align:left}.file,.note{color:#555;font-size:12px}\
section.chart svg{border:1px solid #eee}";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn table(summary: &Summary) -> String {
    let mut out = quantity_table("per step", &summary.quantities);
    let _ = write!(
        out,
        "<p>{} steps traced ({} rich, {} snapshots); at least {} steps in the run, \
         estimated {:.0} [{:.0}, {:.0}]; {} traced steps preempted.</p>",
        summary.steps_traced,
        summary.steps_rich,
        summary.snapshots,
        summary.steps_seen_at_least,
        summary.steps_estimated.value,
        summary.steps_estimated.ci95_low,
        summary.steps_estimated.ci95_high,
        summary.preempting_steps_traced
    );
    if let Some(r) = &summary.requests {
        out += &quantity_table("per request", &r.quantities);
        let _ = write!(
            out,
            "<p>{} request journeys traced; requests in the run estimated {:.0} [{:.0}, {:.0}], \
             failed {:.0} [{:.0}, {:.0}].</p>",
            r.traced,
            r.estimated.value,
            r.estimated.ci95_low,
            r.estimated.ci95_high,
            r.failed.value,
            r.failed.ci95_low,
            r.failed.ci95_high
        );
    }
    out
}

/// One row per quantity: mean with its interval, total, percentiles.
fn quantity_table(what: &str, quantities: &[super::summary::Quantity]) -> String {
    let mut out = format!(
        "<table><tr><th>{what}</th><th>mean</th><th>95% CI</th><th>total</th>\
         <th>p50</th><th>p90</th><th>p99</th><th>max</th></tr>"
    );
    let num = |v: f64| format!("{v:.3}");
    for q in quantities {
        let total = q.total.map_or_else(String::new, |t| {
            format!(
                "{} [{}, {}]",
                num(t.value),
                num(t.ci95_low),
                num(t.ci95_high)
            )
        });
        let [p50, p90, p99, max] = q.percentiles;
        let _ = write!(
            out,
            "<tr><td>{} ({})</td><td>{}</td><td>[{}, {}]</td><td>{total}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            q.name,
            q.unit,
            num(q.mean.value),
            num(q.mean.ci95_low),
            num(q.mean.ci95_high),
            num(p50),
            num(p90),
            num(p99),
            num(max)
        );
    }
    out += "</table>";
    out
}

/// The steps' id range as the x axis (at least one unit wide).
fn x_range(trace: &TraceFile) -> std::ops::Range<f64> {
    let first = trace.steps.first().map_or(0, |s| s.step_id) as f64;
    let last = trace.steps.last().map_or(1, |s| s.step_id) as f64;
    first..last.max(first + 1.0)
}

fn y_top(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, f64::max).max(1.0) * 1.05
}

/// One line of a chart: its name, colour and points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// A chart being drawn: x is the step id, y a number.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A drawing error as text.
fn text<E: std::fmt::Debug>(error: E) -> String {
    format!("{error:?}")
}

/// One chart over the traced steps, as SVG: the axes (x the step id, y from 0 to `y_max`,
/// labelled `y_desc`), the series `draw` adds, and their legend.
fn chart_svg(
    chart_name: &'static str,
    trace: &TraceFile,
    (y_desc, y_max): (&str, f64),
    draw: impl FnOnce(&mut Chart<'_, '_>) -> Result<(), String>,
) -> Result<String, ReportError> {
    let mut svg = String::new();
    let drawn = (|| {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(text)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(x_range(trace), 0.0..y_max)
            .map_err(text)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(text)?;
        draw(&mut chart)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(text)?;
        root.present().map_err(text)
    })();
    drawn.map_err(|message| ReportError {
        chart: chart_name,
        message,
    })?;
    Ok(svg)
}

/// Draws one line chart of `series`, with `markers` as red dots.
fn lines(
    chart_name: &'static str,
    trace: &TraceFile,
    y_axis: (&str, f64),
    series: &[Series<'_>],
    markers: &[(f64, f64)],
) -> Result<String, ReportError> {
    chart_svg(chart_name, trace, y_axis, |chart| {
        for (name, color, points) in series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(text)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if !markers.is_empty() {
            chart
                .draw_series(
                    markers
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, RED.filled())),
                )
                .map_err(text)?
                .label("preempted")
                .legend(|(x, y)| Circle::new((x + 9, y), 4, RED.filled()));
        }
        Ok(())
    })
}

fn batch_chart(trace: &TraceFile) -> Result<String, ReportError> {
    let total: Vec<(f64, f64)> = trace
        .steps
        .iter()
        .map(|s| {
            (
                s.step_id as f64,
                (s.prefill_tokens + s.decode_tokens) as f64,
            )
        })
        .collect();
    let decode: Vec<(f64, f64)> = trace
        .steps
        .iter()
        .map(|s| (s.step_id as f64, s.decode_tokens as f64))
        .collect();
    let y_max = y_top(total.iter().map(|p| p.1));
    chart_svg("batch composition", trace, ("tokens", y_max), |chart| {
        // Stacked: decode at the bottom, prefill on top of it (the area up to the total).
        for (name, color, points) in [
            ("prefill", RGBColor(230, 140, 40), total),
            ("decode", RGBColor(50, 110, 190), decode),
        ] {
            chart
                .draw_series(AreaSeries::new(points, 0.0, color.mix(0.65)).border_style(color))
                .map_err(text)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled())
                });
        }
        Ok(())
    })
}

fn queue_chart(trace: &TraceFile) -> Result<String, ReportError> {
    let points = |f: fn(&super::load::TracedStep) -> u64| -> Vec<(f64, f64)> {
        trace
            .steps
            .iter()
            .map(|s| (s.step_id as f64, f(s) as f64))
            .collect()
    };
    let running = points(|s| s.running_depth);
    let waiting = points(|s| s.waiting_depth);
    let y_max = y_top(running.iter().chain(&waiting).map(|p| p.1));
    lines(
        "queue",
        trace,
        ("requests", y_max),
        &[
            ("running", RGBColor(50, 110, 190), running),
            ("waiting", RGBColor(230, 140, 40), waiting),
        ],
        &[],
    )
}

fn kv_chart(trace: &TraceFile) -> Result<String, ReportError> {
    let usage: Vec<(f64, f64)> = trace
        .steps
        .iter()
        .map(|s| (s.step_id as f64, s.kv_usage))
        .collect();
    lines(
        "KV usage",
        trace,
        ("share of blocks", 1.0),
        &[("KV usage", RGBColor(40, 150, 90), usage)],
        &[],
    )
}

fn duration_chart(trace: &TraceFile) -> Result<String, ReportError> {
    // `last_step_duration_us` is the previous step's duration.
    let durations: Vec<(f64, f64)> = trace
        .steps
        .iter()
        .filter(|s| s.step_id > 1)
        .map(|s| {
            (
                (s.step_id - 1) as f64,
                s.last_step_duration_us as f64 / 1000.0,
            )
        })
        .collect();
    let y_max = y_top(durations.iter().map(|p| p.1));
    let markers: Vec<(f64, f64)> = trace
        .steps
        .iter()
        .filter(|s| s.num_preempted > 0)
        .map(|s| (s.step_id as f64, y_max * 0.95))
        .collect();
    lines(
        "step duration",
        trace,
        ("ms", y_max),
        &[("step duration", RGBColor(120, 80, 170), durations)],
        &markers,
    )
}

/// Per snapshotted request (the swimlanes' first [`MAX_LANES`]): the steps that snapshotted it,
/// the most KV blocks it held, and the tokens computed at its last snapshot.
fn request_table(trace: &TraceFile) -> String {
    let mut rows: Vec<(&str, u64, u64, usize, u64, u64)> = Vec::new();
    for step in &trace.steps {
        for s in &step.snapshots {
            let blocks = s.kv_blocks_allocated.unwrap_or(0);
            let computed = s.num_computed_tokens.unwrap_or(0);
            if let Some(row) = rows.iter_mut().find(|r| r.0 == s.request_id) {
                row.2 = step.step_id;
                row.3 += 1;
                row.4 = row.4.max(blocks);
                row.5 = computed;
            } else if rows.len() < MAX_LANES {
                rows.push((
                    &s.request_id,
                    step.step_id,
                    step.step_id,
                    1,
                    blocks,
                    computed,
                ));
            }
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "<table><tr><th>request</th><th>first step</th><th>last step</th><th>snapshots</th>\
         <th>most KV blocks</th><th>tokens computed (last)</th></tr>",
    );
    for (id, first, last, count, blocks, computed) in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{first}</td><td>{last}</td><td>{count}</td><td>{blocks}</td><td>{computed}</td></tr>",
            escape(id)
        );
    }
    out.push_str("</table>");
    out
}

fn swimlanes(trace: &TraceFile) -> Result<String, ReportError> {
    let err = |e: DrawingAreaErrorKind<std::io::Error>| ReportError {
        chart: "swimlanes",
        message: text(e),
    };
    let mut lanes: Vec<&str> = Vec::new();
    let mut cells = Vec::new();
    let mut max_blocks = 1u64;
    for step in &trace.steps {
        for snapshot in &step.snapshots {
            let lane = match lanes.iter().position(|l| *l == snapshot.request_id) {
                Some(lane) => lane,
                None if lanes.len() < MAX_LANES => {
                    lanes.push(&snapshot.request_id);
                    lanes.len() - 1
                }
                None => continue,
            };
            let blocks = snapshot.kv_blocks_allocated.unwrap_or(0);
            max_blocks = max_blocks.max(blocks);
            let prefill = snapshot.phase.as_deref() == Some("PREFILL");
            cells.push((step.step_id as f64, lane, prefill, blocks));
        }
    }
    let height = (60 + 18 * lanes.len().max(1)) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let lanes_f = lanes.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(90)
            .build_cartesian_2d(x_range(trace), -0.5..lanes_f - 0.5)
            .map_err(&err)?;
        let names: Vec<String> = lanes.iter().map(|l| l.to_string()).collect();
        // A step is a cell at least 1/300 of the axis wide, so sparse snapshots stay visible.
        let range = x_range(trace);
        let half = ((range.end - range.start) / 600.0).max(0.5);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_labels(lanes.len().max(1))
            .y_label_formatter(&|y| {
                names
                    .get(y.round().max(0.0) as usize)
                    .map_or_else(String::new, |n| n.chars().take(14).collect())
            })
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(&err)?;
        chart
            .draw_series(cells.iter().map(|&(x, lane, prefill, blocks)| {
                let shade = 0.3 + 0.7 * blocks as f64 / max_blocks as f64;
                let color = if prefill {
                    RGBColor(230, 140, 40)
                } else {
                    RGBColor(50, 110, 190)
                };
                let y = lane as f64;
                Rectangle::new(
                    [(x - half, y - 0.35), (x + half, y + 0.35)],
                    color.mix(shade).filled(),
                )
            }))
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    if lanes.is_empty() {
        svg.push_str("<p>No step in this trace carries request snapshots (rich sampling).</p>");
    }
    Ok(svg)
}
