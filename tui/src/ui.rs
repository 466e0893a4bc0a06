//! Drawing: a pure function of [`App`] (no I/O, no clock of its own), so every view can be
//! snapshot-tested on ratatui's `TestBackend`.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Bar, BarChart, BarGroup, Block, Cell, Clear, Gauge, Paragraph, Row, Sparkline, Table, TableState, Tabs, Wrap,
};

use vla_api::{ReplayOutcome, ReplayReport};

use crate::app::{
    App, Choice, Conn, GLOBAL_KEYS, Modal, Purpose, Series, Tab, UPLOAD_FIELDS, is_envelope, upload_field,
};

const DIM: Style = Style::new().fg(Color::DarkGray);
const HEADER: Style = Style::new().add_modifier(Modifier::BOLD);
const SELECTED: Style = Style::new().add_modifier(Modifier::REVERSED);

pub fn draw(frame: &mut Frame, app: &App) {
    let [top, tabs, body, bottom] =
        Layout::vertical([Constraint::Length(1), Constraint::Length(1), Constraint::Min(0), Constraint::Length(1)])
            .areas(frame.area());
    frame.render_widget(header(app), top);
    let titles: Vec<String> = Tab::ALL.iter().enumerate().map(|(i, t)| format!("{} {}", i + 1, t.title())).collect();
    frame.render_widget(
        Tabs::new(titles).select(app.tab.index()).highlight_style(SELECTED).divider("│").padding("", ""),
        tabs,
    );
    match app.tab {
        Tab::Overview => overview(frame, app, body),
        Tab::Gpu => gpu(frame, app, body),
        Tab::Queue => queue(frame, app, body),
        Tab::Robots => robots(frame, app, body),
        Tab::Policies => policies(frame, app, body),
        Tab::Models => models(frame, app, body),
        Tab::Audit => audit(frame, app, body),
    }
    frame.render_widget(footer(app), bottom);
    match &app.modal {
        Some(Modal::Help) => help(frame, app),
        Some(Modal::Confirm { prompt, .. }) => confirm(frame, prompt),
        Some(Modal::Choose { purpose, name, choices, selected, error }) => {
            choose(frame, *purpose, name, choices, *selected, error.as_deref())
        }
        Some(Modal::Replay { report, selected }) => replay(frame, report, *selected),
        Some(Modal::UploadForm { form, field, error }) => {
            let mut form = form.clone();
            let lines: Vec<Line> = UPLOAD_FIELDS
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let value = upload_field(&mut form, i).clone();
                    let style = if i == *field { SELECTED } else { Style::new() };
                    let cursor = if i == *field { "▏" } else { "" };
                    Line::from(vec![
                        Span::styled(format!("{name:>7} "), HEADER),
                        Span::styled(format!("{value}{cursor}"), style),
                    ])
                })
                .chain([
                    Line::from(""),
                    match error {
                        Some(e) => Line::from(Span::styled(e.clone(), Style::new().fg(Color::Red))),
                        None => Line::styled("world: safety|admission  mode: shadow|enforce  config: JSON", DIM),
                    },
                    Line::styled("Tab/↑↓ field · Enter upload · Esc cancel", DIM),
                ])
                .collect();
            let area = centered(frame.area(), 70, lines.len() as u16 + 2);
            frame.render_widget(Clear, area);
            frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Upload policy ")), area);
        }
        None => {}
    }
}

fn header(app: &App) -> Line<'static> {
    let (dot, state, color) = match &app.conn {
        Conn::Connecting => ("○", "connecting", Color::Yellow),
        Conn::Connected => ("●", "connected", Color::Green),
        Conn::Lost(_) => ("●", "disconnected, retrying", Color::Red),
    };
    let age = app.updated_ms.map_or("no data yet".to_string(), |t| format!("updated {} ago", age(app.now_ms, t)));
    let mut spans = vec![
        Span::styled(format!("{dot} {state} "), Style::new().fg(color)),
        Span::raw(app.url.clone()),
        Span::styled(format!("  {age}"), DIM),
    ];
    if let Some(h) = app.snapshot.as_ref().map(|s| &s.health) {
        let status = h.get("status").and_then(|s| s.as_str()).unwrap_or("?").to_string();
        let up =
            h.get("uptime_seconds").and_then(|s| s.as_f64()).map_or(String::new(), |s| format!(" up {}", duration(s)));
        let color = if status == "ok" { Color::Green } else { Color::Yellow };
        spans.push(Span::raw("  "));
        spans.push(Span::styled(status, Style::new().fg(color)));
        spans.push(Span::styled(up, DIM));
    }
    Line::from(spans)
}

fn footer(app: &App) -> Line<'static> {
    if app.filter_editing {
        return Line::from(vec![
            Span::styled("/", HEADER),
            Span::raw(format!("{}▏", app.filter)),
            Span::styled("  Enter keep · Esc clear", DIM),
        ]);
    }
    if let Some(status) = app.status.as_ref().filter(|s| s.showing(app.now_ms)) {
        let style = if status.error { Style::new().fg(Color::Red) } else { Style::new().fg(Color::Green) };
        return Line::from(Span::styled(status.text.clone(), style));
    }
    if let Conn::Lost(e) = &app.conn {
        return Line::from(Span::styled(e.clone(), Style::new().fg(Color::Red)));
    }
    let mut hints: Vec<String> = app
        .tab
        .keys()
        .iter()
        .chain(GLOBAL_KEYS)
        .filter(|(_, short, _)| !short.is_empty())
        .map(|(k, short, _)| format!("{k} {short}"))
        .collect();
    if !app.filter.is_empty() {
        hints.insert(0, format!("filter \"{}\" (Esc clears)", app.filter));
    }
    Line::styled(hints.join("  "), DIM)
}

fn overview(frame: &mut Frame, app: &App, area: Rect) {
    let live = &app.live;
    let rows: [(&str, String, &Series, f64); 8] = [
        ("Requests/s", num(live.requests_per_s.last(), 1), &live.requests_per_s, 10.0),
        ("Errors", format!("{} %", num(live.error_percent.last(), 1)), &live.error_percent, 10.0),
        ("Latency p50", ms(live.p50_ms.last()), &live.p50_ms, 10.0),
        ("Latency p95", ms(live.p95_ms.last()), &live.p95_ms, 10.0),
        ("Latency p99", ms(live.p99_ms.last()), &live.p99_ms, 10.0),
        ("Queue depth", num(live.queue_depth.last(), 0), &live.queue_depth, 1.0),
        ("Mean batch", num(live.mean_batch.last(), 2), &live.mean_batch, 100.0),
        ("Denials/s", num(live.denials_per_s.last(), 1), &live.denials_per_s, 10.0),
    ];
    let gpus = app.snapshot.as_ref().and_then(|s| s.gpu.as_ref()).map_or(1, |g| g.devices.len().max(1)) as u16;
    // Taller terminals get taller sparklines.
    let row_height = (area.height.saturating_sub(gpus + 4) / rows.len() as u16).clamp(1, 4);
    let [traffic, gpu_area] =
        Layout::vertical([Constraint::Length(rows.len() as u16 * row_height + 2), Constraint::Length(gpus + 2)])
            .areas(area);
    let block = Block::bordered().title(" Traffic (last 5 s) ");
    let inner = block.inner(traffic);
    frame.render_widget(block, traffic);
    let lines = Layout::vertical(vec![Constraint::Length(row_height); rows.len()]).split(inner);
    for ((label, value, series, scale), line) in rows.iter().zip(lines.iter()) {
        let [l, v, s] =
            Layout::horizontal([Constraint::Length(13), Constraint::Length(11), Constraint::Min(0)]).areas(*line);
        let [l, v] = [l, v].map(|a| Rect { height: 1, ..a });
        frame.render_widget(Span::styled(*label, HEADER), l);
        frame.render_widget(Line::from(value.clone()).right_aligned(), v);
        let data = series.bars(*scale);
        let tail = data.len().saturating_sub(s.width.saturating_sub(1) as usize);
        frame.render_widget(
            Sparkline::default().data(&data[tail..]).style(Style::new().fg(Color::Cyan)),
            s.inner(ratatui::layout::Margin::new(1, 0)),
        );
    }
    let block = Block::bordered().title(" GPU ");
    let text: Vec<Line> = match app.snapshot.as_ref().and_then(|s| s.gpu.as_ref()) {
        Some(g) if g.available => g
            .devices
            .iter()
            .map(|d| {
                Line::from(format!(
                    "GPU{} {}  util {}  mem {}  {}  {}",
                    d.index,
                    d.name,
                    pct(d.utilization_percent),
                    pct(d.memory_utilization_percent),
                    d.temperature_celsius.map_or("—".into(), |t| format!("{t:.0} °C")),
                    d.power_watts.map_or("—".into(), |w| format!("{w:.0} W")),
                ))
            })
            .collect(),
        Some(g) => vec![Line::styled(
            format!("no GPU telemetry: {}", g.reason.as_deref().unwrap_or("unavailable")),
            Style::new().fg(Color::Yellow),
        )],
        None => vec![Line::styled("waiting for data", DIM)],
    };
    frame.render_widget(Paragraph::new(text).block(block), gpu_area);
}

fn gpu(frame: &mut Frame, app: &App, area: Rect) {
    let Some(g) = app.snapshot.as_ref().and_then(|s| s.gpu.as_ref()) else {
        frame.render_widget(Paragraph::new("waiting for data").block(Block::bordered().title(" GPU ")), area);
        return;
    };
    if !g.available {
        let text = vec![
            Line::styled("No GPU telemetry", HEADER.fg(Color::Yellow)),
            Line::from(""),
            Line::from(g.reason.clone().unwrap_or_else(|| "NVML is not available".into())),
            Line::from(""),
            Line::styled("Models run where /models/stats says (see the Models view); without NVML the", DIM),
            Line::styled("appliance cannot read utilization, memory, temperature or power.", DIM),
        ];
        frame.render_widget(
            Paragraph::new(text).wrap(Wrap { trim: true }).block(Block::bordered().title(" GPU ")),
            area,
        );
        return;
    }
    let areas = Layout::vertical(vec![Constraint::Length(7); g.devices.len()]).split(area);
    for (d, area) in g.devices.iter().zip(areas.iter()) {
        let history = app.live.gpu.get(&d.index).cloned().unwrap_or_default();
        let throttle = if d.throttle_reasons.is_empty() {
            String::new()
        } else {
            format!(" throttled: {} ", d.throttle_reasons.join(", "))
        };
        let block = Block::bordered()
            .title(format!(" GPU{} {} ", d.index, d.name))
            .title_bottom(Line::styled(throttle, Style::new().fg(Color::Red)));
        let inner = block.inner(*area);
        frame.render_widget(block, *area);
        let rows = Layout::vertical([Constraint::Length(1); 5]).split(inner);
        let memory = match (d.memory_used_gb, d.memory_total_gb) {
            (Some(u), Some(t)) => format!("{u:.1}/{t:.1} GB"),
            _ => "—".into(),
        };
        let lines = [
            ("util", pct(d.utilization_percent), d.utilization_percent, &history.utilization, 1.0),
            (
                "memory",
                format!("{} {memory}", pct(d.memory_utilization_percent)),
                d.memory_utilization_percent,
                &history.memory,
                1.0,
            ),
            (
                "temp",
                d.temperature_celsius.map_or("—".into(), |t| format!("{t:.0} °C")),
                d.temperature_celsius,
                &history.temperature,
                1.0,
            ),
            ("power", d.power_watts.map_or("—".into(), |w| format!("{w:.0} W")), None, &history.power, 1.0),
        ];
        for ((label, value, gauge, series, scale), row) in lines.iter().zip(rows.iter()) {
            let [l, g_area, s] =
                Layout::horizontal([Constraint::Length(8), Constraint::Length(28), Constraint::Min(0)]).areas(*row);
            frame.render_widget(Span::styled(*label, HEADER), l);
            match gauge {
                Some(p) if *label != "temp" => {
                    let color = if *p > 90.0 { Color::Red } else { Color::Green };
                    frame.render_widget(
                        Gauge::default()
                            .ratio((p / 100.0).clamp(0.0, 1.0))
                            .label(value.clone())
                            .gauge_style(Style::new().fg(color)),
                        g_area,
                    );
                }
                _ => frame.render_widget(Span::raw(value.clone()), g_area),
            }
            let data = series.bars(*scale);
            let tail = data.len().saturating_sub(s.width.saturating_sub(1) as usize);
            frame.render_widget(
                Sparkline::default().data(&data[tail..]).max(100).style(Style::new().fg(Color::Cyan)),
                s.inner(ratatui::layout::Margin::new(1, 0)),
            );
        }
    }
}

fn queue(frame: &mut Frame, app: &App, area: Rect) {
    let models = app.snapshot.as_ref().and_then(|s| s.queue.as_ref()).map(|q| q.models.clone()).unwrap_or_default();
    let [table_area, detail] =
        Layout::vertical([Constraint::Length(models.len() as u16 + 3), Constraint::Min(0)]).areas(area);
    let rows: Vec<Row> = models
        .iter()
        .map(|m| {
            Row::new(vec![
                m.model.clone(),
                m.device.clone(),
                format!("{}/{}", m.queue_depth, m.queue_capacity),
                format!("{:.0}%", m.queue_utilization_percent),
                m.batches.to_string(),
                format!("{:.2}", m.mean_batch_size),
                ms(app.live.queue_wait_p95_ms.get(&m.model).copied()),
                format!("{}/{}/{}", m.dropped_deadline, m.dropped_disconnect, m.rejected_queue_full),
            ])
        })
        .collect();
    let header =
        Row::new(["model", "device", "queue", "util", "batches", "mean", "wait p95", "dl/dc/full"]).style(HEADER);
    let widths = [Constraint::Min(14)].into_iter().chain([7, 9, 6, 8, 5, 9, 11].map(Constraint::Length));
    let selected = app.selected[Tab::Queue.index()];
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(SELECTED)
        .block(Block::bordered().title(" Queues and batching (dl: deadline, dc: disconnect drops) "));
    frame.render_stateful_widget(table, table_area, &mut TableState::default().with_selected(Some(selected)));
    let Some(m) = models.get(selected) else { return };
    let [bars, depth] = Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(detail);
    let metrics = app.snapshot.as_ref().map(|s| &s.metrics);
    let buckets = metrics
        .map(|s| s.buckets("vla_inference_batch_size", |x| x.label("model") == Some(m.model.as_str())))
        .unwrap_or_default();
    let mut previous = 0.0;
    let bars_data: Vec<Bar> = buckets
        .iter()
        .filter(|(le, _)| le.is_finite())
        .map(|(le, count)| {
            let n = (count - previous).max(0.0) as u64;
            previous = *count;
            Bar::default().value(n).label(Line::from(format!("≤{le}"))).text_value(compact(n))
        })
        .collect();
    frame.render_widget(
        BarChart::default()
            .data(BarGroup::default().bars(&bars_data))
            .bar_width(4)
            .bar_gap(1)
            .block(Block::bordered().title(format!(" {} batch sizes ", m.model))),
        bars,
    );
    let block = Block::bordered().title(format!(" depth (of {}) ", m.queue_capacity));
    let data = app.live.model_queue_depth.get(&m.model).map(|s| s.bars(1.0)).unwrap_or_default();
    let inner = block.inner(depth);
    let tail = data.len().saturating_sub(inner.width as usize);
    frame.render_widget(
        Sparkline::default()
            .data(&data[tail..])
            .max(m.queue_capacity.max(1) as u64)
            .block(block)
            .style(Style::new().fg(Color::Cyan)),
        depth,
    );
}

fn robots(frame: &mut Frame, app: &App, area: Rect) {
    let rows = app.robot_rows();
    let table_rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            let (quota, reset) = match &r.quota {
                Some((bucket, remaining, limit, reset_ms)) => {
                    let bucket = bucket.rsplit(':').next().unwrap_or(bucket);
                    let style = if *remaining == 0 { Style::new().fg(Color::Red) } else { Style::new() };
                    (Cell::from(format!("{bucket} {remaining}/{limit}")).style(style), until(app.now_ms, *reset_ms))
                }
                None => (Cell::from("—"), String::new()),
            };
            let flagged = |n: u64| {
                if n > 0 { Cell::from(n.to_string()).style(Style::new().fg(Color::Yellow)) } else { Cell::from("0") }
            };
            Row::new(vec![
                Cell::from(r.robot_id.clone()),
                Cell::from(r.robot_type.clone()),
                Cell::from(format!("{:.1}", r.rate)),
                Cell::from(r.last_seen_unix_s.map_or("never".into(), |s| age(app.now_ms, (s * 1000.0) as u64))),
                flagged(r.rejected),
                flagged(r.limited),
                quota,
                Cell::from(reset),
            ])
        })
        .collect();
    let header =
        Row::new(["robot", "type", "req/s", "seen", "rejected", "limited", "quota left", "reset"]).style(HEADER);
    let widths = [Constraint::Min(16)].into_iter().chain([9, 6, 7, 8, 7, 12, 6].map(Constraint::Length));
    let filter = filter_note(app);
    let title = format!(" Robots ({}) sorted by {}{} ", rows.len(), app.robot_sort.label(), filter);
    let table = Table::new(table_rows, widths)
        .header(header)
        .row_highlight_style(SELECTED)
        .block(Block::bordered().title(title));
    frame.render_stateful_widget(
        table,
        area,
        &mut TableState::default().with_selected(Some(app.selected[Tab::Robots.index()])),
    );
}

fn policies(frame: &mut Frame, app: &App, area: Rect) {
    let rows = app.policy_rows();
    let [table_area, detail] = Layout::vertical([Constraint::Min(5), Constraint::Length(6)]).areas(area);
    let table_rows: Vec<Row> = rows
        .iter()
        .map(|p| {
            let mode = if p.mode == "enforce" {
                Cell::from("enforce")
            } else {
                Cell::from("shadow").style(Style::new().fg(Color::Cyan))
            };
            let state = match (p.enabled, p.state.as_str()) {
                (false, _) => Cell::from("disabled").style(DIM),
                (true, "ready") => Cell::from("ready"),
                (true, other) => Cell::from(other.to_string()).style(Style::new().fg(Color::Red)),
            };
            Row::new(vec![
                Cell::from(p.order.to_string()),
                Cell::from(p.name.clone()),
                Cell::from(p.world.clone()),
                mode,
                Cell::from(format!("v{}", p.version)),
                state,
                Cell::from(compact(p.stats.evaluations)),
                Cell::from(compact(p.stats.denials)),
                Cell::from(ms(app.policy_p99_ms(&p.name))),
            ])
        })
        .collect();
    let header = Row::new(["order", "name", "world", "mode", "ver", "state", "evals", "denied", "p99"]).style(HEADER);
    let widths =
        [Constraint::Length(5), Constraint::Min(18)].into_iter().chain([9, 7, 4, 8, 6, 6, 8].map(Constraint::Length));
    let filter = filter_note(app);
    let table = Table::new(table_rows, widths)
        .header(header)
        .row_highlight_style(SELECTED)
        .block(Block::bordered().title(format!(" Policies ({}){filter} ", rows.len())));
    frame.render_stateful_widget(
        table,
        table_area,
        &mut TableState::default().with_selected(Some(app.selected[Tab::Policies.index()])),
    );
    let text = match app.selected_policy() {
        Some(p) => vec![
            Line::from(format!(
                "{} v{}  sha256 {}…  {}{}  {} B",
                p.name,
                p.version,
                p.sha256.get(..12).unwrap_or(&p.sha256),
                if p.signed { "signed" } else { "unsigned" },
                if p.required { "  required" } else { "" },
                p.size_bytes
            )),
            Line::from(format!(
                "allowed {}  modified {}  failed {}  mean {:.0} µs",
                p.stats.allows, p.stats.modifications, p.stats.failures, p.stats.mean_eval_us
            )),
            Line::styled(format!("config {}", p.config), DIM),
            match &p.problem {
                Some(problem) => Line::styled(problem.clone(), Style::new().fg(Color::Red)),
                None => Line::styled("u upload · m promote⇄shadow · r replay · e enable⇄disable · d delete", DIM),
            },
        ],
        None => vec![Line::styled("no policies · u uploads one", DIM)],
    };
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: true }).block(Block::bordered().title(" Selected ")),
        detail,
    );
}

fn models(frame: &mut Frame, app: &App, area: Rect) {
    let Some(stats) = app.snapshot.as_ref().and_then(|s| s.models.as_ref()) else {
        frame.render_widget(Paragraph::new("waiting for data").block(Block::bordered().title(" Models ")), area);
        return;
    };
    let [table_area, detail] = Layout::vertical([Constraint::Min(5), Constraint::Length(5)]).areas(area);
    let rows: Vec<Row> = stats
        .health
        .iter()
        .map(|h| {
            let info = stats.models.iter().find(|m| m.name == h.name);
            let state = match h.state.as_str() {
                "serving" => Cell::from("serving").style(Style::new().fg(Color::Green)),
                other => Cell::from(other.to_string()).style(Style::new().fg(Color::Red)),
            };
            Row::new(vec![
                Cell::from(h.name.clone()),
                Cell::from(h.version.clone().unwrap_or_default()),
                Cell::from(h.device.clone().unwrap_or_default()),
                state,
                Cell::from(info.map_or(String::new(), |m| m.max_batch_size.to_string())),
                Cell::from(info.map_or(String::new(), |m| m.cameras.len().to_string())),
                Cell::from(info.map_or(String::new(), |m| format!("{}×{}", m.action_horizon, m.action_dof))),
                Cell::from(info.map_or(String::new(), |m| compact(m.stats.computed))),
                Cell::from(h.error.clone().unwrap_or_default()).style(Style::new().fg(Color::Red)),
            ])
        })
        .collect();
    let header =
        Row::new(["model", "version", "device", "state", "batch", "cams", "action", "served", "error"]).style(HEADER);
    let widths = [
        Constraint::Length(14),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Min(10),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(SELECTED)
        .block(Block::bordered().title(" Models "));
    let selected = app.selected[Tab::Models.index()];
    frame.render_stateful_widget(table, table_area, &mut TableState::default().with_selected(Some(selected)));
    let health = stats.health.get(selected);
    let text = match health.and_then(|h| stats.models.iter().find(|m| m.name == h.name)) {
        Some(m) => vec![
            Line::from(format!(
                "{} v{}  {} on {}  max batch {}{}",
                m.name,
                m.version,
                if m.platform.is_empty() { "pytorch_torchscript" } else { &m.platform },
                m.device,
                m.max_batch_size,
                if m.batching { ", batching" } else { "" }
            )),
            Line::from(format!(
                "cameras {}  tokenizer {}  state {}",
                if m.cameras.is_empty() { "–".to_string() } else { m.cameras.join(", ") },
                if m.tokenizer.is_empty() { "–" } else { &m.tokenizer },
                m.state_dim
            )),
            Line::from(format!(
                "action {} · {} step{} × {} dof{}",
                m.action_kind,
                m.action_horizon,
                if m.action_horizon == 1 { "" } else { "s" },
                m.action_dof,
                m.dt_ms.map_or(String::new(), |dt| format!(" every {dt} ms"))
            )),
        ],
        None => match health {
            Some(h) => vec![Line::styled(
                format!("{}: {}", h.name, h.error.clone().unwrap_or_else(|| h.state.clone())),
                Style::new().fg(Color::Red),
            )],
            None => vec![Line::styled("no models", DIM)],
        },
    };
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: true }).block(Block::bordered().title(" Selected ")),
        detail,
    );
}

fn audit(frame: &mut Frame, app: &App, area: Rect) {
    let records = app.audit_rows();
    let envelope = records.iter().filter(|r| is_envelope(r)).count();
    let [table_area, detail] = Layout::vertical([Constraint::Min(5), Constraint::Length(5)]).areas(area);
    let rows: Vec<Row> = records
        .iter()
        .map(|r| {
            let decision = match (r.decision.as_str(), r.applied) {
                ("deny", true) => Cell::from("deny").style(Style::new().fg(Color::Red)),
                (d, false) => Cell::from(format!("{d}*")).style(Style::new().fg(Color::Cyan)),
                (d, true) => Cell::from(d.to_string()).style(Style::new().fg(Color::Yellow)),
            };
            let policy = if is_envelope(r) {
                Cell::from("⚠ envelope").style(Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD))
            } else {
                Cell::from(r.policy.clone())
            };
            Row::new(vec![
                Cell::from(clock(r.time_unix_ms)),
                Cell::from(r.robot_id.clone()),
                policy,
                decision,
                Cell::from(match r.code.as_deref() {
                    // The envelope's codes all start so; the kind (min, max, max_delta) is the news.
                    Some(code) if is_envelope(r) => code.trim_start_matches("out_of_envelope_").to_string(),
                    code => code.unwrap_or_default().to_string(),
                }),
                Cell::from(r.reason.clone().unwrap_or_default()),
            ])
        })
        .collect();
    let header = Row::new(["time UTC", "robot", "policy", "decision", "code", "reason"]).style(HEADER);
    let widths = [
        Constraint::Length(8),
        Constraint::Length(12),
        Constraint::Length(14),
        Constraint::Length(8),
        Constraint::Length(14),
        Constraint::Min(10),
    ];
    let filter = filter_note(app);
    let table = Table::new(rows, widths).header(header).row_highlight_style(SELECTED).block(
        Block::bordered()
            .title(format!(" Audit: denials and modifications ({}, {envelope} envelope){filter} ", records.len()))
            .title_bottom(Line::styled(
                " * shadow, not applied · ⚠ envelope: the host's limits, after every policy ",
                DIM,
            )),
    );
    frame.render_stateful_widget(
        table,
        table_area,
        &mut TableState::default().with_selected(Some(app.selected[Tab::Audit.index()])),
    );
    let text = match records.get(app.selected[Tab::Audit.index()]) {
        Some(r) if is_envelope(r) => vec![
            Line::from(format!(
                "action envelope of {} {} (host, after every policy) on {} [{}]",
                r.model,
                r.model_version.as_deref().map(|v| format!("v{v}")).unwrap_or_default(),
                r.robot_id,
                r.robot_type,
            )),
            Line::from(r.reason.clone().unwrap_or_default()),
            Line::styled(
                match r.decision.as_str() {
                    "deny" => format!(
                        "action {} → denied, nothing sent · request {}",
                        action(r.original_action.as_deref()),
                        r.request_id
                    ),
                    _ => format!(
                        "action {} → clamped {} · request {}",
                        action(r.original_action.as_deref()),
                        action(r.final_action.as_deref()),
                        r.request_id
                    ),
                },
                DIM,
            ),
        ],
        Some(r) => vec![
            Line::from(format!(
                "{} v{} ({}, {}) on {} [{}] request {}",
                r.policy, r.version, r.world, r.mode, r.robot_id, r.robot_type, r.request_id
            )),
            Line::from(r.reason.clone().unwrap_or_default()),
            Line::styled(
                format!("action {} → {}", action(r.original_action.as_deref()), action(r.final_action.as_deref())),
                DIM,
            ),
        ],
        None => vec![Line::styled("no denials or modifications recorded", DIM)],
    };
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: true }).block(Block::bordered().title(" Selected ")),
        detail,
    );
}

fn choose(frame: &mut Frame, purpose: Purpose, name: &str, choices: &[Choice], selected: usize, error: Option<&str>) {
    let (title, question) = match purpose {
        Purpose::Promote => {
            (" Promote to enforce ", format!("{name} enforces from now on. Which policy does it replace?"))
        }
        Purpose::Replay => (
            " Replay against recent requests ",
            format!("Replay {name} on what the cell recently saw, in place of which policy?"),
        ),
    };
    let mut lines = vec![Line::from(question), Line::from("")];
    for (i, c) in choices.iter().enumerate() {
        let marker = if i == selected { "▶ " } else { "  " };
        let style = match (i == selected, &c.blocked) {
            (true, _) => SELECTED,
            (false, Some(_)) => DIM,
            (false, None) => Style::new(),
        };
        let note = if c.blocked.is_some() { "  (required)" } else { "" };
        lines.push(Line::styled(format!("{marker}{}{note}", c.label), style));
    }
    lines.push(Line::from(""));
    lines.push(match error {
        Some(e) => Line::styled(e.to_string(), Style::new().fg(Color::Red)),
        None => Line::styled("j/k choose · Enter select · Esc cancel", DIM),
    });
    let area = centered(frame.area(), 76, lines.len() as u16 + 2);
    frame.render_widget(Clear, area);
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(title)), area);
}

/// A replay's report over the whole body: the counts, the decisions that would change, and
/// the selected one's reasons and actions.
fn replay(frame: &mut Frame, report: &ReplayReport, selected: usize) {
    let full = frame.area();
    // The whole body, between the tabs and the footer.
    let area = Rect { x: full.x, y: full.y + 2, width: full.width, height: full.height.saturating_sub(3) };
    frame.render_widget(Clear, area);
    let title = if report.replaces == report.policy {
        format!(" Replay: {} against its own decisions ", report.policy)
    } else {
        format!(" Replay: {} in place of {} ", report.policy, report.replaces)
    };
    let block = Block::bordered().title(title).title_bottom(Line::styled(" j/k select · any other key closes ", DIM));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [summary, table_area, detail] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(4)]).areas(inner);
    let changed = report.changed.len();
    frame.render_widget(
        Line::from(vec![
            Span::raw(format!(
                "replayed {} · unchanged {} · skipped {} · ",
                report.replayed, report.unchanged, report.skipped
            )),
            Span::styled(
                format!("would change {changed}"),
                if changed > 0 {
                    Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
                } else {
                    Style::new().fg(Color::Green)
                },
            ),
        ]),
        summary,
    );
    let rows: Vec<Row> = report
        .changed
        .iter()
        .map(|c| {
            Row::new(vec![
                Cell::from(clock(c.time_unix_ms)),
                Cell::from(c.robot_id.clone()),
                Cell::from(c.request_id.clone()),
                Cell::from(outcome(&c.recorded)),
                Cell::from("→"),
                Cell::from(outcome(&c.candidate)).style(Style::new().fg(Color::Yellow)),
            ])
        })
        .collect();
    let header = Row::new(["time UTC", "robot", "request", "recorded", "", "candidate"]).style(HEADER);
    let widths = [
        Constraint::Length(8),
        Constraint::Length(12),
        Constraint::Length(16),
        Constraint::Min(12),
        Constraint::Length(1),
        Constraint::Min(12),
    ];
    frame.render_stateful_widget(
        Table::new(rows, widths).header(header).row_highlight_style(SELECTED),
        table_area,
        &mut TableState::default().with_selected((changed > 0).then_some(selected)),
    );
    let text = match report.changed.get(selected) {
        Some(c) => vec![
            Line::from(format!("recorded:  {}", outcome_detail(&c.recorded))),
            Line::from(format!("candidate: {}", outcome_detail(&c.candidate))),
        ],
        None => vec![Line::styled(
            format!("no recorded decision would change ({} requests in the ring were replayed)", report.replayed),
            DIM,
        )],
    };
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: true }).block(Block::new().borders(ratatui::widgets::Borders::TOP)),
        detail,
    );
}

/// `deny joint_limit`, `modify`, `allow` for a table cell.
fn outcome(o: &ReplayOutcome) -> String {
    match &o.code {
        Some(code) => format!("{} {code}", o.decision),
        None => o.decision.clone(),
    }
}

fn outcome_detail(o: &ReplayOutcome) -> String {
    let mut text = outcome(o);
    if let Some(reason) = &o.reason {
        text.push_str(&format!(": {reason}"));
    }
    if o.action.is_some() {
        text.push_str(&format!("  action {}", action(o.action.as_deref())));
    }
    text
}

fn help(frame: &mut Frame, app: &App) {
    let mut lines = vec![Line::styled(format!("{} view", app.tab.title()), HEADER)];
    for (k, _, what) in app.tab.keys().iter().chain(GLOBAL_KEYS) {
        lines
            .push(Line::from(vec![Span::styled(format!("{k:>10}  "), Style::new().fg(Color::Cyan)), Span::raw(*what)]));
    }
    lines.push(Line::styled("any key closes", DIM));
    let area = centered(frame.area(), 72, lines.len() as u16 + 2);
    frame.render_widget(Clear, area);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Help ")), area);
}

fn confirm(frame: &mut Frame, prompt: &str) {
    let lines = vec![Line::from(prompt.to_string()), Line::from(""), Line::styled("y confirm · n / Esc cancel", DIM)];
    let area = centered(frame.area(), 64, 6);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(Block::bordered().title(" Confirm ")),
        area,
    );
}

/// ` filter "…" ` for a view's title while a filter applies.
fn filter_note(app: &App) -> String {
    if app.filter.is_empty() { String::new() } else { format!(" filter \"{}\" ", app.filter) }
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [v] = Layout::vertical([Constraint::Length(height.min(area.height))]).flex(Flex::Center).areas(area);
    let [h] = Layout::horizontal([Constraint::Length(width.min(area.width))]).flex(Flex::Center).areas(v);
    h
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.decimals$}"))
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) if v >= 10.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.0} %"))
}

/// 1234 → 1.2k, for narrow columns.
fn compact(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn age(now_ms: u64, then_ms: u64) -> String {
    let ms = now_ms.saturating_sub(then_ms);
    if ms < 10_000 { format!("{:.1}s", ms as f64 / 1000.0) } else { duration(ms as f64 / 1000.0) }
}

fn until(now_ms: u64, then_ms: u64) -> String {
    if then_ms <= now_ms { "now".into() } else { duration((then_ms - now_ms) as f64 / 1000.0 + 0.999) }
}

/// `HH:MM:SS` (UTC) of a Unix time in ms.
fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn action(a: Option<&[f32]>) -> String {
    match a {
        None => "none".into(),
        Some(a) => {
            // Far-out values (what the envelope stops) in exponent form, to stay readable.
            let value = |v: &f32| if v.abs() >= 1e4 { format!("{v:.1e}") } else { format!("{v:.2}") };
            let head: Vec<String> = a.iter().take(4).map(value).collect();
            format!("[{}{}]", head.join(", "), if a.len() > 4 { ", …" } else { "" })
        }
    }
}
