//! The console's state and how keys change it. No I/O and no drawing here: the poller feeds
//! [`App::ingest`] and [`App::poll_failed`], keys go through [`App::on_key`], and an action the
//! operator confirmed comes back as a [`Command`] for the poller to run.

use std::collections::{BTreeMap, VecDeque};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use vla_api::{AuditRecord, PolicyInfo, PolicyPatch, ReplayReport};

use crate::client::{Command, Reply, Snapshot, Upload};
use crate::prom::{self, Scrape};

/// Points of history kept per series (two minutes at the default 1 s poll).
pub const HISTORY: usize = 120;
/// Scrapes that rates and latency percentiles are computed over (about 5 s).
const WINDOW: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Overview,
    Gpu,
    Queue,
    Robots,
    Policies,
    Models,
    Audit,
}

impl Tab {
    pub const ALL: [Tab; 7] =
        [Tab::Overview, Tab::Gpu, Tab::Queue, Tab::Robots, Tab::Policies, Tab::Models, Tab::Audit];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Overview => "Overview",
            Tab::Gpu => "GPU",
            Tab::Queue => "Queue",
            Tab::Robots => "Robots",
            Tab::Policies => "Policies",
            Tab::Models => "Models",
            Tab::Audit => "Audit",
        }
    }

    pub fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }

    fn filterable(self) -> bool {
        matches!(self, Tab::Robots | Tab::Policies | Tab::Audit)
    }

    /// The keys of this view: (key, short name for the footer, what it does for the help).
    pub fn keys(self) -> &'static [(&'static str, &'static str, &'static str)] {
        match self {
            Tab::Robots => &[
                ("j/k ↑/↓", "", "select robot"),
                ("/", "filter", "filter by robot, type or group"),
                ("s", "sort", "sort by robot, req/s, last seen, rejected, limited"),
                ("Esc", "", "clear the filter"),
            ],
            Tab::Policies => &[
                ("j/k ↑/↓", "", "select policy"),
                ("u", "upload", "upload a .wasm with its config (shadow mode first)"),
                ("m", "mode", "shadow → enforce, choosing the policy it replaces; enforce → shadow"),
                ("r", "replay", "replay against the recent requests, showing changed decisions"),
                ("e", "enable", "enable ⇄ disable"),
                ("d", "delete", "delete"),
                ("/", "filter", "filter by name"),
                ("Esc", "", "clear the filter"),
            ],
            Tab::Audit => &[
                ("j/k ↑/↓", "", "select record"),
                ("v", "envelope", "only the action envelope's violations ⇄ every record"),
                ("/", "filter", "filter: text, robot:<id>, policy:<name>, kind:envelope"),
                ("Esc", "", "clear the filter"),
            ],
            Tab::Queue | Tab::Models => &[("j/k ↑/↓", "", "select model")],
            Tab::Overview | Tab::Gpu => &[],
        }
    }
}

/// Keys of every view.
pub const GLOBAL_KEYS: &[(&str, &str, &str)] = &[
    ("1-7", "", "switch view"),
    ("Tab/S-Tab", "", "next/previous view"),
    ("?", "help", "this help"),
    ("q", "quit", "quit"),
];

#[derive(Debug, Clone, PartialEq)]
pub enum Conn {
    Connecting,
    Connected,
    /// The last poll failed, with why.
    Lost(String),
}

/// A bounded history of one series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series(pub VecDeque<f64>);

impl Series {
    pub fn push(&mut self, v: f64) {
        if self.0.len() == HISTORY {
            self.0.pop_front();
        }
        self.0.push_back(if v.is_finite() { v } else { 0.0 });
    }

    pub fn last(&self) -> Option<f64> {
        self.0.back().copied()
    }

    /// The history scaled to integers for a sparkline (`scale` per unit).
    pub fn bars(&self, scale: f64) -> Vec<u64> {
        self.0.iter().map(|v| (v * scale).round().max(0.0) as u64).collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuHistory {
    pub utilization: Series,
    pub memory: Series,
    pub temperature: Series,
    pub power: Series,
}

/// Derived figures over the last few scrapes, and their histories.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    pub requests_per_s: Series,
    /// `status="error"` answers over all, percent.
    pub error_percent: Series,
    /// Latency percentiles, ms.
    pub p50_ms: Series,
    pub p95_ms: Series,
    pub p99_ms: Series,
    /// Queued requests, all models.
    pub queue_depth: Series,
    /// Queued requests per model.
    pub model_queue_depth: BTreeMap<String, Series>,
    pub mean_batch: Series,
    /// Requests a policy denied, per second.
    pub denials_per_s: Series,
    pub gpu: BTreeMap<u32, GpuHistory>,
    /// Per robot: requests per second.
    pub robot_rate: BTreeMap<String, f64>,
    /// Per model: queue wait p95, ms, over the window.
    pub queue_wait_p95_ms: BTreeMap<String, f64>,
}

/// One row of the robot view.
#[derive(Debug, Clone, PartialEq)]
pub struct RobotRow {
    pub robot_id: String,
    pub robot_type: String,
    pub group: String,
    pub rate: f64,
    pub last_seen_unix_s: Option<f64>,
    pub rejected: u64,
    pub limited: u64,
    /// The tightest bucket: (bucket, remaining, limit, reset Unix ms).
    pub quota: Option<(String, u64, u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RobotSort {
    #[default]
    Id,
    Rate,
    LastSeen,
    Rejected,
    Limited,
}

impl RobotSort {
    fn next(self) -> RobotSort {
        match self {
            RobotSort::Id => RobotSort::Rate,
            RobotSort::Rate => RobotSort::LastSeen,
            RobotSort::LastSeen => RobotSort::Rejected,
            RobotSort::Rejected => RobotSort::Limited,
            RobotSort::Limited => RobotSort::Id,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            RobotSort::Id => "robot",
            RobotSort::Rate => "req/s",
            RobotSort::LastSeen => "last seen",
            RobotSort::Rejected => "rejected",
            RobotSort::Limited => "limited",
        }
    }
}

/// The upload form's fields, in order.
pub const UPLOAD_FIELDS: [&str; 6] = ["path", "name", "world", "mode", "order", "config"];

/// The audit filter that keeps the host's action-envelope records only.
pub const ENVELOPE_FILTER: &str = "kind:envelope";

#[derive(Debug, Clone, PartialEq)]
pub enum Modal {
    Help,
    Confirm {
        prompt: String,
        command: Command,
    },
    UploadForm {
        form: Upload,
        field: usize,
        error: Option<String>,
    },
    /// Which enforcing policy the shadow policy `name` takes over from, or stands in for.
    Choose {
        purpose: Purpose,
        name: String,
        choices: Vec<Choice>,
        selected: usize,
        error: Option<String>,
    },
    /// A replay's report: the decisions that would change, one selected.
    Replay {
        report: Box<ReplayReport>,
        selected: usize,
    },
}

/// What the chooser picks an installed policy for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Switch to enforce, removing the chosen policy in the same change (`replace`).
    Promote,
    /// Replay against the recent requests in the chosen policy's place (`replaces`).
    Replay,
}

/// One line of the chooser.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The installed policy; `None`: replace nothing (promote), or itself (replay).
    pub target: Option<String>,
    pub label: String,
    /// Why it cannot be chosen (a required policy cannot be replaced).
    pub blocked: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub text: String,
    pub error: bool,
    /// When it was said (Unix ms): the footer shows it for a while.
    pub at_ms: u64,
}

impl Status {
    /// Whether the footer still shows it at `now_ms`: errors 30 s, the rest 8 s.
    pub fn showing(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.at_ms) < if self.error { 30_000 } else { 8_000 }
    }
}

#[derive(Debug)]
pub struct App {
    pub url: String,
    pub tab: Tab,
    pub conn: Conn,
    /// When the shown data was read (Unix ms).
    pub updated_ms: Option<u64>,
    /// The clock the views are drawn at (Unix ms), set by the event loop.
    pub now_ms: u64,
    pub snapshot: Option<Snapshot>,
    pub live: Live,
    window: VecDeque<(u64, Scrape)>,
    pub selected: [usize; 7],
    pub filter: String,
    pub filter_editing: bool,
    pub robot_sort: RobotSort,
    pub modal: Option<Modal>,
    pub status: Option<Status>,
    pub quit: bool,
}

impl App {
    pub fn new(url: &str) -> App {
        App {
            url: url.to_string(),
            tab: Tab::Overview,
            conn: Conn::Connecting,
            updated_ms: None,
            now_ms: 0,
            snapshot: None,
            live: Live::default(),
            window: VecDeque::new(),
            selected: [0; 7],
            filter: String::new(),
            filter_editing: false,
            robot_sort: RobotSort::Id,
            modal: None,
            status: None,
            quit: false,
        }
    }

    /// A successful poll: keeps the history, adds the new points.
    pub fn ingest(&mut self, snapshot: Snapshot) {
        if let Conn::Lost(_) = self.conn {
            self.status = Some(Status { text: "reconnected".into(), error: false, at_ms: self.now_ms });
        }
        self.conn = Conn::Connected;
        self.updated_ms = Some(snapshot.at_ms);
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back((snapshot.at_ms, snapshot.metrics.clone()));
        self.derive(&snapshot);
        self.snapshot = Some(snapshot);
        self.clamp_selection();
    }

    /// A failed poll: what is shown stays, marked stale, with why.
    pub fn poll_failed(&mut self, error: String) {
        self.conn = Conn::Lost(error);
    }

    /// The outcome of an action the poller ran. A replay's report opens over the view unless
    /// the operator is in the middle of a form or a confirmation.
    pub fn action_done(&mut self, result: Result<Reply, String>) {
        let text = match result {
            Ok(Reply::Done(text)) => text,
            Ok(Reply::Replay(report)) => {
                let text = format!(
                    "replay of {} in place of {}: {} replayed, {} would change",
                    report.policy,
                    report.replaces,
                    report.replayed,
                    report.changed.len()
                );
                if matches!(self.modal, None | Some(Modal::Help | Modal::Replay { .. })) {
                    self.modal = Some(Modal::Replay { report, selected: 0 });
                }
                text
            }
            Err(text) => {
                self.status = Some(Status { text: format!("refused: {text}"), error: true, at_ms: self.now_ms });
                return;
            }
        };
        self.status = Some(Status { text, error: false, at_ms: self.now_ms });
    }

    fn derive(&mut self, snapshot: &Snapshot) {
        let (Some((t0, first)), Some((t1, last))) = (self.window.front(), self.window.back()) else { return };
        let seconds = (t1.saturating_sub(*t0)) as f64 / 1000.0;
        let live = &mut self.live;
        let rate = |name: &str, keep: &dyn Fn(&prom::Sample) -> bool| -> f64 {
            if seconds <= 0.0 {
                return 0.0;
            }
            prom::counter_delta(first.sum(name, keep), last.sum(name, keep)) / seconds
        };
        let requests = "vla_inference_requests_total";
        let all = rate(requests, &|_| true);
        let errors = rate(requests, &|s| s.label("status") == Some("error"));
        live.requests_per_s.push(all);
        live.error_percent.push(if all > 0.0 { errors * 100.0 / all } else { 0.0 });
        live.denials_per_s.push(rate(requests, &|s| s.label("status") == Some("rejected")));
        let latency = prom::bucket_delta(
            &first.buckets("vla_inference_duration_seconds", |_| true),
            &last.buckets("vla_inference_duration_seconds", |_| true),
        );
        for (q, series) in [(0.5, &mut live.p50_ms), (0.95, &mut live.p95_ms), (0.99, &mut live.p99_ms)] {
            series.push(prom::quantile(q, &latency).map_or(0.0, |s| s * 1000.0));
        }
        let depth: usize = snapshot.queue.iter().flat_map(|q| &q.models).map(|m| m.queue_depth).sum();
        live.queue_depth.push(depth as f64);
        for m in snapshot.queue.iter().flat_map(|q| &q.models) {
            live.model_queue_depth.entry(m.model.clone()).or_default().push(m.queue_depth as f64);
        }
        let batches = rate("vla_inference_batch_size_count", &|_| true);
        let batched = rate("vla_inference_batch_size_sum", &|_| true);
        live.mean_batch.push(if batches > 0.0 { batched / batches } else { 0.0 });
        if let Some(gpu) = &snapshot.gpu {
            for d in &gpu.devices {
                let h = live.gpu.entry(d.index).or_default();
                h.utilization.push(d.utilization_percent.unwrap_or(0.0));
                h.memory.push(d.memory_utilization_percent.unwrap_or(0.0));
                h.temperature.push(d.temperature_celsius.unwrap_or(0.0));
                h.power.push(d.power_watts.unwrap_or(0.0));
            }
        }
        live.robot_rate.clear();
        for s in last.series("vla_robot_requests_total", |_| true) {
            let Some(robot) = s.label("robot_id") else { continue };
            *live.robot_rate.entry(robot.to_string()).or_default() += rate("vla_robot_requests_total", &|x| {
                x.label("robot_id") == Some(robot) && x.label("status") == s.label("status")
            });
        }
        live.queue_wait_p95_ms.clear();
        for q in snapshot.queue.iter().flat_map(|q| &q.models) {
            let keep = |s: &prom::Sample| s.label("model") == Some(q.model.as_str());
            let wait = prom::bucket_delta(
                &first.buckets("vla_inference_queue_wait_seconds", keep),
                &last.buckets("vla_inference_queue_wait_seconds", keep),
            );
            live.queue_wait_p95_ms.insert(q.model.clone(), prom::quantile(0.95, &wait).map_or(0.0, |s| s * 1000.0));
        }
    }

    /// The robots, filtered and sorted as the view shows them.
    pub fn robot_rows(&self) -> Vec<RobotRow> {
        let Some(snapshot) = &self.snapshot else { return Vec::new() };
        let m = &snapshot.metrics;
        let count = |robot: &str, status: &str| {
            m.sum("vla_robot_requests_total", |s| {
                s.label("robot_id") == Some(robot) && s.label("status") == Some(status)
            }) as u64
        };
        let mut rows: Vec<RobotRow> = snapshot
            .quotas
            .iter()
            .flat_map(|q| &q.robots)
            .filter(|r| self.matches(&[&r.robot_id, &r.robot_type, &r.group]))
            .map(|r| {
                let seen = m
                    .series("vla_robot_last_request_timestamp_seconds", |s| {
                        s.label("robot_id") == Some(r.robot_id.as_str())
                    })
                    .next();
                let tightest = r.buckets.iter().filter(|b| b.limit > 0).min_by(|a, b| {
                    (a.remaining as f64 / a.limit as f64).total_cmp(&(b.remaining as f64 / b.limit as f64))
                });
                RobotRow {
                    robot_id: r.robot_id.clone(),
                    robot_type: r.robot_type.clone(),
                    group: r.group.clone(),
                    rate: self.live.robot_rate.get(&r.robot_id).copied().unwrap_or(0.0),
                    last_seen_unix_s: seen.map(|s| s.value),
                    rejected: count(&r.robot_id, "rejected"),
                    limited: count(&r.robot_id, "rate_limited"),
                    quota: tightest
                        .map(|b| (format!("{}:{}", b.scope, b.bucket), b.remaining, b.limit, b.reset_unix_ms)),
                }
            })
            .collect();
        match self.robot_sort {
            RobotSort::Id => rows.sort_by(|a, b| a.robot_id.cmp(&b.robot_id)),
            RobotSort::Rate => rows.sort_by(|a, b| b.rate.total_cmp(&a.rate)),
            RobotSort::LastSeen => {
                rows.sort_by(|a, b| b.last_seen_unix_s.unwrap_or(0.0).total_cmp(&a.last_seen_unix_s.unwrap_or(0.0)))
            }
            RobotSort::Rejected => rows.sort_by_key(|r| std::cmp::Reverse(r.rejected)),
            RobotSort::Limited => rows.sort_by_key(|r| std::cmp::Reverse(r.limited)),
        }
        rows
    }

    /// The policies in evaluation order (admission first), filtered.
    pub fn policy_rows(&self) -> Vec<&PolicyInfo> {
        let Some(list) = self.snapshot.as_ref().and_then(|s| s.policies.as_ref()) else { return Vec::new() };
        let mut rows: Vec<&PolicyInfo> = list.policies.iter().filter(|p| self.matches(&[&p.name])).collect();
        rows.sort_by(|a, b| {
            (a.world != "admission", a.order, &a.name).cmp(&(b.world != "admission", b.order, &b.name))
        });
        rows
    }

    /// p99 of a policy's evaluation time since the appliance started, ms.
    pub fn policy_p99_ms(&self, policy: &str) -> Option<f64> {
        let m = &self.snapshot.as_ref()?.metrics;
        let buckets = m.buckets("vla_safety_check_duration_seconds", |s| s.label("policy") == Some(policy));
        prom::quantile(0.99, &buckets).map(|s| s * 1000.0)
    }

    /// Audit records, newest first, filtered (`robot:<id>`, `policy:<name>`, `kind:envelope`
    /// for the host's action-envelope records, or text in the robot, policy, code or reason).
    pub fn audit_rows(&self) -> Vec<&AuditRecord> {
        let Some(list) = self.snapshot.as_ref().and_then(|s| s.audit.as_ref()) else { return Vec::new() };
        list.records
            .iter()
            .filter(|r| {
                self.filter.split_whitespace().all(|term| {
                    if let Some(robot) = term.strip_prefix("robot:") {
                        r.robot_id.contains(robot)
                    } else if let Some(policy) = term.strip_prefix("policy:") {
                        r.policy.contains(policy)
                    } else if term == ENVELOPE_FILTER {
                        is_envelope(r)
                    } else {
                        [&r.robot_id, &r.policy, r.code.as_deref().unwrap_or(""), r.reason.as_deref().unwrap_or("")]
                            .iter()
                            .any(|f| f.contains(term))
                    }
                })
            })
            .collect()
    }

    fn matches(&self, fields: &[&str]) -> bool {
        self.filter.is_empty() || fields.iter().any(|f| f.contains(self.filter.as_str()))
    }

    fn row_count(&self) -> usize {
        match self.tab {
            Tab::Robots => self.robot_rows().len(),
            Tab::Policies => self.policy_rows().len(),
            Tab::Audit => self.audit_rows().len(),
            Tab::Queue => self.snapshot.as_ref().and_then(|s| s.queue.as_ref()).map_or(0, |q| q.models.len()),
            Tab::Models => self.snapshot.as_ref().and_then(|s| s.models.as_ref()).map_or(0, |m| m.health.len()),
            Tab::Overview | Tab::Gpu => 0,
        }
    }

    /// Keeps the current view's selection within its rows (the filter applies to this view
    /// only; switching views clears it and clamps the new one).
    fn clamp_selection(&mut self) {
        let n = self.row_count();
        let s = &mut self.selected[self.tab.index()];
        *s = (*s).min(n.saturating_sub(1));
    }

    pub fn selected_policy(&self) -> Option<&PolicyInfo> {
        self.policy_rows().get(self.selected[Tab::Policies.index()]).copied()
    }

    /// Handles one key; a confirmed action comes back for the poller to run.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Command> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return None;
        }
        if let Some(modal) = self.modal.take() {
            return self.on_modal_key(modal, key);
        }
        if self.filter_editing {
            match key.code {
                KeyCode::Enter => self.filter_editing = false,
                KeyCode::Esc => {
                    self.filter_editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.clamp_selection();
            return None;
        }
        let selected = &mut self.selected[self.tab.index()];
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') => self.modal = Some(Modal::Help),
            KeyCode::Char(c @ '1'..='7') => self.switch(Tab::ALL[c as usize - '1' as usize]),
            KeyCode::Tab => self.switch(Tab::ALL[(self.tab.index() + 1) % Tab::ALL.len()]),
            KeyCode::BackTab => self.switch(Tab::ALL[(self.tab.index() + Tab::ALL.len() - 1) % Tab::ALL.len()]),
            KeyCode::Down | KeyCode::Char('j') => *selected += 1,
            KeyCode::Up | KeyCode::Char('k') => *selected = selected.saturating_sub(1),
            KeyCode::Char('/') if self.tab.filterable() => self.filter_editing = true,
            KeyCode::Esc => self.filter.clear(),
            KeyCode::Char('s') if self.tab == Tab::Robots => self.robot_sort = self.robot_sort.next(),
            KeyCode::Char('u') if self.tab == Tab::Policies => {
                let form =
                    Upload { world: "safety".into(), mode: "shadow".into(), order: "100".into(), ..Upload::default() };
                self.modal = Some(Modal::UploadForm { form, field: 0, error: None });
            }
            KeyCode::Char(c @ ('m' | 'e' | 'd' | 'r')) if self.tab == Tab::Policies => self.ask_policy_action(c),
            KeyCode::Char('v') if self.tab == Tab::Audit => {
                if self.filter == ENVELOPE_FILTER {
                    self.filter.clear();
                } else {
                    self.filter = ENVELOPE_FILTER.into();
                }
            }
            _ => {}
        }
        self.clamp_selection();
        None
    }

    fn switch(&mut self, tab: Tab) {
        if tab != self.tab {
            self.tab = tab;
            self.filter.clear();
        }
    }

    fn ask_policy_action(&mut self, key: char) {
        let Some(p) = self.selected_policy() else {
            self.status = Some(Status { text: "no policy selected".into(), error: true, at_ms: self.now_ms });
            return;
        };
        let name = p.name.clone();
        let (prompt, command) = match key {
            'm' | 'r' if key == 'r' || p.mode != "enforce" => {
                let purpose = if key == 'm' { Purpose::Promote } else { Purpose::Replay };
                let (choices, selected) = self.choices(p, purpose);
                self.modal = Some(Modal::Choose { purpose, name, choices, selected, error: None });
                return;
            }
            'm' => {
                let patch = PolicyPatch { mode: Some("shadow".into()), ..PolicyPatch::default() };
                let prompt = format!("Switch {name} to shadow? Its decisions will only be recorded.");
                (prompt, Command::Patch { name, patch })
            }
            'e' => {
                let enable = !p.enabled;
                let patch = PolicyPatch { enabled: Some(enable), ..PolicyPatch::default() };
                (format!("{} {name}?", if enable { "Enable" } else { "Disable" }), Command::Patch { name, patch })
            }
            _ => (format!("Delete {name} (v{})? This cannot be undone.", p.version), Command::Delete { name }),
        };
        self.modal = Some(Modal::Confirm { prompt, command });
    }

    /// The chooser's lines for policy `p`: every enabled enforcing policy of its world, then
    /// "none" (promote: beside the others; replay: against its own decisions). The line
    /// selected at first is the policy whose name shares the longest start with `p`'s (a new
    /// version is usually named after the old one), or "none" when no name is alike.
    fn choices(&self, p: &PolicyInfo, purpose: Purpose) -> (Vec<Choice>, usize) {
        let all = self.snapshot.as_ref().and_then(|s| s.policies.as_ref()).map_or(&[][..], |l| &l.policies[..]);
        let mut others: Vec<&PolicyInfo> =
            all.iter().filter(|o| o.world == p.world && o.name != p.name && o.mode == "enforce" && o.enabled).collect();
        others.sort_by_key(|o| (o.order, o.name.clone()));
        let mut choices: Vec<Choice> = others
            .iter()
            .map(|o| Choice {
                target: Some(o.name.clone()),
                label: format!(
                    "{} {} (v{}, order {})",
                    if purpose == Purpose::Promote { "replace" } else { "in place of" },
                    o.name,
                    o.version,
                    o.order
                ),
                blocked: (purpose == Purpose::Promote && o.required)
                    .then(|| format!("{} is required (policy.required): it cannot be replaced", o.name)),
            })
            .collect();
        choices.push(Choice {
            target: None,
            label: match purpose {
                Purpose::Promote => "replace nothing: enforce beside the others".into(),
                Purpose::Replay => format!("as {} itself: against its own recorded decisions", p.name),
            },
            blocked: None,
        });
        let alike = |o: &str| o.chars().zip(p.name.chars()).take_while(|(a, b)| a == b).count();
        let selected = choices
            .iter()
            .enumerate()
            .filter(|(_, c)| c.blocked.is_none())
            .filter_map(|(i, c)| Some((i, alike(c.target.as_deref()?))))
            .filter(|(_, n)| *n >= 3)
            .max_by_key(|(i, n)| (*n, std::cmp::Reverse(*i)))
            .map_or(choices.len() - 1, |(i, _)| i);
        (choices, selected)
    }

    fn on_modal_key(&mut self, modal: Modal, key: KeyEvent) -> Option<Command> {
        match modal {
            Modal::Help => None,
            Modal::Replay { report, mut selected } => {
                match key.code {
                    KeyCode::Down | KeyCode::Char('j') => {
                        selected = (selected + 1).min(report.changed.len().saturating_sub(1))
                    }
                    KeyCode::Up | KeyCode::Char('k') => selected = selected.saturating_sub(1),
                    _ => return None,
                }
                self.modal = Some(Modal::Replay { report, selected });
                None
            }
            Modal::Choose { purpose, name, choices, mut selected, .. } => {
                let mut error = None;
                match key.code {
                    KeyCode::Esc | KeyCode::Char('q') => {
                        self.status = Some(Status { text: "cancelled".into(), error: false, at_ms: self.now_ms });
                        return None;
                    }
                    KeyCode::Down | KeyCode::Char('j') => selected = (selected + 1) % choices.len(),
                    KeyCode::Up | KeyCode::Char('k') => selected = (selected + choices.len() - 1) % choices.len(),
                    KeyCode::Enter => match (&choices[selected], purpose) {
                        (Choice { blocked: Some(why), .. }, _) => error = Some(why.clone()),
                        (Choice { target, .. }, Purpose::Replay) => {
                            let text = match target {
                                Some(t) => format!("replaying {name} in place of {t} against the recent requests…"),
                                None => format!("replaying {name} against its recent decisions…"),
                            };
                            self.status = Some(Status { text, error: false, at_ms: self.now_ms });
                            return Some(Command::Replay { name, replaces: target.clone() });
                        }
                        (Choice { target, .. }, Purpose::Promote) => {
                            let prompt = match target {
                                Some(t) => format!(
                                    "Promote {name} to enforce, replacing {t}? {t} is removed in the same change: \
                                     no moment with neither or both enforcing."
                                ),
                                None => format!(
                                    "Promote {name} to enforce beside the others? Its denials and changes will \
                                     apply to robots."
                                ),
                            };
                            let patch = PolicyPatch {
                                mode: Some("enforce".into()),
                                replace: target.clone(),
                                ..PolicyPatch::default()
                            };
                            self.modal = Some(Modal::Confirm { prompt, command: Command::Patch { name, patch } });
                            return None;
                        }
                    },
                    _ => {}
                }
                self.modal = Some(Modal::Choose { purpose, name, choices, selected, error });
                None
            }
            Modal::Confirm { prompt, command } => match key.code {
                KeyCode::Char('y' | 'Y') => {
                    self.status = Some(Status {
                        text: "sent, waiting for the appliance…".into(),
                        error: false,
                        at_ms: self.now_ms,
                    });
                    Some(command)
                }
                KeyCode::Char('n' | 'N') | KeyCode::Esc => {
                    self.status = Some(Status { text: "cancelled".into(), error: false, at_ms: self.now_ms });
                    None
                }
                _ => {
                    self.modal = Some(Modal::Confirm { prompt, command });
                    None
                }
            },
            Modal::UploadForm { mut form, mut field, .. } => {
                let mut error = None;
                match key.code {
                    KeyCode::Esc => return None,
                    KeyCode::Tab | KeyCode::Down => field = (field + 1) % UPLOAD_FIELDS.len(),
                    KeyCode::BackTab | KeyCode::Up => field = (field + UPLOAD_FIELDS.len() - 1) % UPLOAD_FIELDS.len(),
                    KeyCode::Enter => match check_upload(&mut form) {
                        Ok(()) => {
                            let prompt = format!(
                                "Upload {} as {} ({}, {} mode)?",
                                form.path.trim(),
                                form.name.trim(),
                                form.world.trim(),
                                form.mode.trim()
                            );
                            self.modal = Some(Modal::Confirm { prompt, command: Command::Upload(form) });
                            return None;
                        }
                        Err(e) => error = Some(e),
                    },
                    KeyCode::Backspace => {
                        upload_field(&mut form, field).pop();
                    }
                    KeyCode::Char(c) => upload_field(&mut form, field).push(c),
                    _ => {}
                }
                self.modal = Some(Modal::UploadForm { form, field, error });
                None
            }
        }
    }
}

/// Whether a record is the host's action envelope stopping or clamping an action (after every
/// policy), rather than a policy's decision.
pub fn is_envelope(r: &AuditRecord) -> bool {
    r.world == "host" && r.policy == "envelope"
}

pub fn upload_field(form: &mut Upload, field: usize) -> &mut String {
    match field {
        0 => &mut form.path,
        1 => &mut form.name,
        2 => &mut form.world,
        3 => &mut form.mode,
        4 => &mut form.order,
        _ => &mut form.config,
    }
}

/// What the form can tell before asking the appliance; the name defaults to the file's stem.
fn check_upload(form: &mut Upload) -> Result<(), String> {
    if form.path.trim().is_empty() {
        return Err("path: the .wasm file to upload".into());
    }
    if form.name.trim().is_empty() {
        let stem = std::path::Path::new(form.path.trim()).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        form.name = stem.to_string();
    }
    if !matches!(form.world.trim(), "safety" | "admission") {
        return Err("world: safety or admission".into());
    }
    if !matches!(form.mode.trim(), "shadow" | "enforce") {
        return Err("mode: shadow or enforce".into());
    }
    if !form.order.trim().is_empty() && form.order.trim().parse::<i64>().is_err() {
        return Err("order: a whole number".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(c: char) -> KeyEvent {
        KeyEvent::from(KeyCode::Char(c))
    }

    fn policy(name: &str, mode: &str, order: i64, required: bool) -> PolicyInfo {
        PolicyInfo {
            name: name.into(),
            world: "safety".into(),
            version: 1,
            order,
            mode: mode.into(),
            enabled: true,
            sha256: String::new(),
            size_bytes: 0,
            signed: false,
            revision: 1,
            required,
            wit: None,
            config: serde_json::json!({}),
            created_unix_ms: 0,
            updated_unix_ms: 0,
            state: "ready".into(),
            problem: None,
            stats: Default::default(),
        }
    }

    fn with_policies(policies: Vec<PolicyInfo>) -> App {
        let mut app = App::new("https://x");
        let list = vla_api::PolicyList { policies };
        app.ingest(Snapshot { at_ms: 1, policies: Some(list), ..Snapshot::default() });
        app.on_key(key('5'));
        app
    }

    #[test]
    fn promoting_a_shadow_policy_picks_the_one_it_replaces() {
        let mut app = with_policies(vec![
            policy("joint-limits", "enforce", 10, false),
            policy("speed-cap", "enforce", 20, true),
            policy("joint-limits-v2", "shadow", 30, false),
        ]);
        app.on_key(key('j'));
        app.on_key(key('j'));
        assert_eq!(app.selected_policy().unwrap().name, "joint-limits-v2");
        app.on_key(key('m'));
        let Some(Modal::Choose { purpose: Purpose::Promote, choices, selected, .. }) = &app.modal else {
            panic!("{:?}", app.modal)
        };
        // The old version by name, the required one marked, and "beside the others" last.
        assert_eq!(choices[*selected].target.as_deref(), Some("joint-limits"));
        assert!(choices[1].blocked.is_some());
        assert_eq!(choices[2].target, None);
        // A required policy cannot be chosen; the chooser says why and stays open.
        app.on_key(key('j'));
        app.on_key(KeyEvent::from(KeyCode::Enter));
        let Some(Modal::Choose { error: Some(e), .. }) = &app.modal else { panic!("{:?}", app.modal) };
        assert!(e.contains("required"), "{e}");
        app.on_key(key('k'));
        app.on_key(KeyEvent::from(KeyCode::Enter));
        let Some(Modal::Confirm { prompt, command: Command::Patch { name, patch } }) = &app.modal else {
            panic!("{:?}", app.modal)
        };
        assert!(prompt.contains("replacing joint-limits"), "{prompt}");
        assert_eq!(name, "joint-limits-v2");
        assert_eq!((patch.mode.as_deref(), patch.replace.as_deref()), (Some("enforce"), Some("joint-limits")));
        // An enforcing policy's `m` still switches it to shadow, with no chooser.
        app.on_key(key('n'));
        app.on_key(key('k'));
        app.on_key(key('k'));
        app.on_key(key('m'));
        assert!(matches!(&app.modal, Some(Modal::Confirm { prompt, .. }) if prompt.contains("to shadow")));
    }

    #[test]
    fn a_replay_runs_without_confirmation_and_its_report_opens() {
        let mut app = with_policies(vec![policy("a", "enforce", 10, false), policy("b", "shadow", 20, false)]);
        app.on_key(key('j'));
        app.on_key(key('r'));
        // No alike name: the default is the policy's own decisions.
        let Some(Modal::Choose { choices, selected, .. }) = &app.modal else { panic!("{:?}", app.modal) };
        assert_eq!(choices[*selected].target, None);
        app.on_key(key('k'));
        let command = app.on_key(KeyEvent::from(KeyCode::Enter));
        assert_eq!(command, Some(Command::Replay { name: "b".into(), replaces: Some("a".into()) }));
        let change = vla_api::ReplayChange { request_id: "r1".into(), ..Default::default() };
        let report = ReplayReport {
            policy: "b".into(),
            replaces: "a".into(),
            replayed: 3,
            changed: vec![change.clone(), change],
            ..Default::default()
        };
        app.action_done(Ok(Reply::Replay(Box::new(report))));
        assert!(matches!(&app.modal, Some(Modal::Replay { selected: 0, .. })));
        assert!(app.status.as_ref().unwrap().text.contains("3 replayed, 2 would change"));
        app.on_key(key('j'));
        app.on_key(key('j'));
        assert!(matches!(&app.modal, Some(Modal::Replay { selected: 1, .. })));
        app.on_key(KeyEvent::from(KeyCode::Esc));
        assert!(app.modal.is_none());
    }

    #[test]
    fn the_upload_form_checks_fields_then_asks_to_confirm() {
        let mut app = App::new("https://x");
        app.on_key(key('5'));
        assert_eq!(app.tab, Tab::Policies);
        app.on_key(key('u'));
        app.on_key(KeyEvent::from(KeyCode::Enter));
        let Some(Modal::UploadForm { error: Some(e), .. }) = &app.modal else { panic!("{:?}", app.modal) };
        assert!(e.starts_with("path"));
        for c in "/tmp/speed-cap.wasm".chars() {
            app.on_key(key(c));
        }
        app.on_key(KeyEvent::from(KeyCode::Enter));
        let Some(Modal::Confirm { prompt, command: Command::Upload(u) }) = &app.modal else {
            panic!("{:?}", app.modal)
        };
        assert_eq!(u.name, "speed-cap");
        assert!(prompt.contains("shadow mode"), "{prompt}");
        let command = app.on_key(key('y'));
        assert!(matches!(command, Some(Command::Upload(_))));
        assert!(app.modal.is_none());
    }

    #[test]
    fn a_refused_action_shows_the_appliance_message() {
        let mut app = App::new("https://x");
        app.action_done(Err("400 policy_invalid: world: unknown".into()));
        assert_eq!(
            app.status,
            Some(Status { text: "refused: 400 policy_invalid: world: unknown".into(), error: true, at_ms: 0 })
        );
    }

    #[test]
    fn history_survives_a_lost_connection() {
        let mut app = App::new("https://x");
        let mut snap = Snapshot { at_ms: 1000, ..Snapshot::default() };
        snap.metrics = Scrape::parse("vla_inference_requests_total{status=\"success\"} 10\n");
        app.ingest(snap.clone());
        snap.at_ms = 2000;
        snap.metrics = Scrape::parse("vla_inference_requests_total{status=\"success\"} 30\n");
        app.ingest(snap.clone());
        assert_eq!(app.live.requests_per_s.last(), Some(20.0));
        app.poll_failed("connection refused".into());
        assert!(matches!(app.conn, Conn::Lost(_)));
        // The appliance restarted: its counters start over, rates never go negative.
        snap.at_ms = 3000;
        snap.metrics = Scrape::parse("vla_inference_requests_total{status=\"success\"} 2\n");
        app.ingest(snap);
        assert_eq!(app.conn, Conn::Connected);
        assert_eq!(app.live.requests_per_s.0.len(), 3);
        assert!(app.live.requests_per_s.0.iter().all(|v| *v >= 0.0));
    }
}
