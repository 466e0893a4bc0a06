//! The reports' charts, as SVG (plotters): the suite's latency against throughput, latency
//! CDFs and distribution of batch sizes; `bench peers`' throughput and p99 against clients.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::load::Endpoint;
use crate::peers::{Frame, PeersReport, SERVERS};
use crate::report::{Point, Report};
use crate::server::Variant;

const SIZE: (u32, u32) = (960, 540);
const FONT: &str = "sans-serif";

fn colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLOURS[i % COLOURS.len()]
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// Every chart's frame: its title, margins and room for the axes' labels.
fn frame<'a, 'b>(root: &'a DrawingArea<SVGBackend<'b>, Shift>, title: &str) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder.caption(title, (FONT, 22)).margin(12).x_label_area_size(44).y_label_area_size(64);
    builder
}

fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Writes the three charts into `dir`; returns `(file name, title)` of each.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let charts = [
        ("latency-throughput.svg", "Latency against throughput (closed loop)"),
        ("latency-cdf.svg", "Latency distribution"),
        ("batch-sizes.svg", "Batch sizes that served the requests"),
    ];
    latency_throughput(report, &SVGBackend::new(&dir.join(charts[0].0), SIZE).into_drawing_area(), charts[0].1)?;
    latency_cdf(report, &SVGBackend::new(&dir.join(charts[1].0), SIZE).into_drawing_area(), charts[1].1)?;
    batch_sizes(report, &SVGBackend::new(&dir.join(charts[2].0), SIZE).into_drawing_area(), charts[2].1)?;
    Ok(charts.to_vec())
}

/// Closed-loop series worth a line: the standard appliance and the one without batching, on
/// both endpoints.
fn series(report: &Report) -> Vec<(String, Vec<&Point>)> {
    let mut out = Vec::new();
    let standard = Variant::standard().name;
    for variant in report.variants.iter().filter(|v| v.name == standard || !v.batching) {
        for endpoint in [Endpoint::V1, Endpoint::Oip] {
            let points: Vec<&Point> = report.points(&variant.name, endpoint, "closed").filter(|p| p.ok > 0).collect();
            if points.len() >= 2 {
                out.push((format!("{}, {}", endpoint.label(), variant.name), points));
            }
        }
    }
    out
}

/// Up to four closed-loop points spread over the standard appliance's `/v1` sweep (after the
/// first `skip`), and every open-loop point, with their legends.
fn sampled(report: &Report, skip: usize) -> Vec<(String, &Point)> {
    let standard = Variant::standard().name;
    let closed: Vec<&Point> = report
        .points
        .iter()
        .filter(|p| p.variant == standard && p.endpoint == Endpoint::V1 && p.mode == "closed" && p.ok > 0)
        .collect();
    let step = closed.len().div_ceil(4).max(1);
    let mut shown: Vec<(String, &Point)> = closed
        .into_iter()
        .skip(skip)
        .step_by(step)
        .map(|p| (format!("/v1, {} clients (closed)", p.clients), p))
        .collect();
    for p in report.points.iter().filter(|p| p.mode == "open" && p.ok > 0) {
        shown.push((
            format!("{}, {} robots at {} Hz (open)", p.endpoint.label(), p.clients, p.hz.unwrap_or_default()),
            p,
        ));
    }
    shown
}

fn latency_throughput(report: &Report, root: &DrawingArea<SVGBackend, Shift>, title: &str) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let series = series(report);
    let all = series.iter().flat_map(|(_, ps)| ps.iter());
    let x_max = all.clone().map(|p| p.throughput_rps).fold(1.0, f64::max) * 1.1;
    let y_max = all.clone().map(|p| p.latency_ms.p99).fold(1.0, f64::max) * 1.5;
    let y_min = all.map(|p| p.latency_ms.p50).fold(f64::INFINITY, f64::min).clamp(0.1, 1.0) * 0.8;
    let mut chart = frame(root, title).build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale()).map_err(err)?;
    chart.configure_mesh().x_desc("successful requests per second").y_desc("latency, ms (log)").draw().map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let c = colour(i);
        for (q, dashed) in [("p50", false), ("p99", true)] {
            let xy: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.throughput_rps, if q == "p50" { p.latency_ms.p50 } else { p.latency_ms.p99 }))
                .collect();
            let style = ShapeStyle { color: c.to_rgba(), filled: !dashed, stroke_width: if dashed { 1 } else { 2 } };
            chart
                .draw_series(LineSeries::new(xy.clone(), style).point_size(3))
                .map_err(err)?
                .label(format!("{name} {q}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            // Each point's client count beside it (on the p99 line).
            if dashed {
                chart
                    .draw_series(points.iter().zip(&xy).map(|(p, &(x, y))| {
                        Text::new(format!("{}", p.clients), (x, y * 1.08), (FONT, 11).into_font().color(&c))
                    }))
                    .map_err(err)?;
            }
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)
}

fn latency_cdf(report: &Report, root: &DrawingArea<SVGBackend, Shift>, title: &str) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let shown = sampled(report, 0);
    let x_max = shown.iter().map(|(_, p)| p.latency_ms.max).fold(1.0, f64::max) * 1.2;
    let x_min =
        shown.iter().map(|(_, p)| p.cdf.first().map_or(1.0, |c| c.0)).fold(f64::INFINITY, f64::min).clamp(0.1, 1.0)
            * 0.8;
    let mut chart = frame(root, title).build_cartesian_2d((x_min..x_max).log_scale(), 0.0..1.0).map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log)")
        .y_desc("fraction of requests at or below")
        .draw()
        .map_err(err)?;
    for (i, (name, p)) in shown.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(p.cdf.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)
}

fn batch_sizes(report: &Report, root: &DrawingArea<SVGBackend, Shift>, title: &str) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    // A lone client's batches are all of 1: start one point later.
    let shown = sampled(report, 1);
    let x_max = shown.iter().flat_map(|(_, p)| p.batch_sizes.keys().copied()).max().unwrap_or(1) as f64 + 1.0;
    let mut chart = frame(root, title).build_cartesian_2d(0.0..x_max, 0.0..1.0).map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("batch size (requests in one forward)")
        .y_desc("fraction of requests")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    let width = 0.8 / shown.len().max(1) as f64;
    for (i, (name, p)) in shown.iter().enumerate() {
        let c = colour(i);
        let ok = p.ok.max(1) as f64;
        chart
            .draw_series(p.batch_sizes.iter().map(|(&size, &n)| {
                let x0 = size as f64 - 0.4 + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, n as f64 / ok)], c.filled())
            }))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(err)
}

/// `bench peers`' charts: throughput and p99 latency against clients, one panel per model and
/// frame size, every server and the raw pipeline's best side by side. Returns `(file, title)`.
pub fn write_peers(report: &PeersReport, dir: &Path) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let charts = [
        ("peers-throughput.svg", "Throughput against clients (closed loop, /v1, one JPEG per request)"),
        ("peers-p99.svg", "p99 latency against clients (closed loop, /v1, one JPEG per request)"),
    ];
    let panels: Vec<(&str, &Frame)> =
        report.models.iter().flat_map(|m| m.frames.iter().map(move |f| (m.model.as_str(), f))).collect();
    let columns = report.models.iter().map(|m| m.frames.len()).max().unwrap_or(1).max(1);
    let rows = panels.len().div_ceil(columns).max(1);
    let size = (SIZE.0 / 2 * columns as u32, SIZE.1 * 3 / 4 * rows as u32 + 40);
    for (i, (file, title)) in charts.iter().enumerate() {
        let path = dir.join(file);
        let root = SVGBackend::new(&path, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, (FONT, 22)).map_err(err)?;
        for (area, (model, frame)) in root.split_evenly((rows, columns)).iter().zip(&panels) {
            peers_panel(area, &format!("{model}, {} JPEG", frame.image), frame, i == 0)?;
        }
        root.present().map_err(err)?;
    }
    Ok(charts.to_vec())
}

fn peers_panel(area: &DrawingArea<SVGBackend, Shift>, title: &str, f: &Frame, throughput: bool) -> anyhow::Result<()> {
    let value = |p: &Point| if throughput { p.throughput_rps } else { p.latency_ms.p99 };
    let ok: Vec<&Point> = f.points.iter().filter(|p| p.ok > 0).collect();
    let x_max = ok.iter().map(|p| p.clients).max().unwrap_or(1) as f64 * 1.08;
    let mut builder = ChartBuilder::on(area);
    builder.caption(title, (FONT, 16)).margin(10).x_label_area_size(36).y_label_area_size(56);
    let values = ok.iter().map(|p| value(p));
    if throughput {
        let y_max = values.chain([f.raw.best_samples_per_s]).fold(1.0, f64::max) * 1.15;
        let mut chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max).map_err(err)?;
        chart.configure_mesh().x_desc("clients").y_desc("requests per second").draw().map_err(err)?;
        let raw = f.raw.best_samples_per_s;
        let grey = RGBColor(110, 110, 110);
        chart
            .draw_series(LineSeries::new([(0.0, raw), (x_max, raw)], grey.stroke_width(1)))
            .map_err(err)?
            .label(format!("raw pipeline best ({raw:.0}/s)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(1)));
        peers_series(&mut chart, &ok, value)?;
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    } else {
        let (lo, hi) = values.fold((f64::INFINITY, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let mut chart =
            builder.build_cartesian_2d(0.0..x_max, (lo.clamp(0.1, 1.0) * 0.7..hi * 1.6).log_scale()).map_err(err)?;
        chart.configure_mesh().x_desc("clients").y_desc("p99 latency, ms (log)").draw().map_err(err)?;
        peers_series(&mut chart, &ok, value)?;
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    }
}

fn peers_series<'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    ok: &[&Point],
    value: impl Fn(&Point) -> f64,
) -> anyhow::Result<()> {
    for (i, server) in SERVERS.iter().enumerate() {
        // The appliance without policies runs at the largest client count only: a point.
        let sweep = *server != "appliance-no-policies";
        let xy: Vec<(f64, f64)> =
            ok.iter().filter(|p| p.variant == *server).map(|p| (p.clients as f64, value(p))).collect();
        if xy.is_empty() {
            continue;
        }
        let c = colour(i);
        let style = c.stroke_width(2);
        let series = if sweep {
            chart.draw_series(LineSeries::new(xy, style).point_size(4)).map_err(err)?
        } else {
            chart.draw_series(xy.into_iter().map(|xy| Cross::new(xy, 6, style))).map_err(err)?
        };
        series.label(*server).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    Ok(())
}
