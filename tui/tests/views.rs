//! Every view drawn from fixture data on ratatui's `TestBackend`, at 80×24 (the smallest
//! terminal the console supports) and larger, compared with reviewed snapshots
//! (`tests/snapshots/`; `cargo insta review` after an intended change).

#![allow(clippy::unwrap_used)]

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use serde_json::json;
use vla_console::app::{App, Tab};
use vla_console::client::Snapshot;
use vla_console::prom::Scrape;
use vla_console::ui;

/// 2026-11-23 10:00:00 UTC.
const T0: u64 = 1_795_428_000_000;

fn metrics(scale: u64) -> String {
    // Counters grow with `scale` (the poll number), so the second scrape shows rates.
    let ok = 100 * scale;
    let mut text = format!(
        "vla_inference_requests_total{{model=\"tiny-vla\",robot_type=\"ur5e\",status=\"success\"}} {ok}\n\
         vla_inference_requests_total{{model=\"tiny-vla\",robot_type=\"ur5e\",status=\"rejected\"}} {}\n\
         vla_inference_requests_total{{model=\"tiny-vla\",robot_type=\"ur5e\",status=\"error\"}} {}\n\
         vla_inference_requests_total{{model=\"tiny-vla\",robot_type=\"ur5e\",status=\"rate_limited\"}} {}\n\
         vla_inference_batch_size_sum{{model=\"tiny-vla\"}} {}\n\
         vla_inference_batch_size_count{{model=\"tiny-vla\"}} {}\n",
        5 * scale,
        scale,
        3 * scale,
        ok,
        ok / 4,
    );
    for (le, n) in [("0.005", 20), ("0.01", 70), ("0.025", 95), ("0.05", 100), ("+Inf", 100)] {
        text += &format!("vla_inference_duration_seconds_bucket{{model=\"tiny-vla\",le=\"{le}\"}} {}\n", n * scale);
    }
    for (le, n) in [("0.001", 60), ("0.005", 95), ("+Inf", 100)] {
        text += &format!("vla_inference_queue_wait_seconds_bucket{{model=\"tiny-vla\",le=\"{le}\"}} {}\n", n * scale);
    }
    for (le, n) in
        [("1", 5), ("2", 9), ("4", 20), ("8", 25), ("16", 25), ("32", 25), ("64", 25), ("128", 25), ("+Inf", 25)]
    {
        text += &format!("vla_inference_batch_size_bucket{{model=\"tiny-vla\",le=\"{le}\"}} {}\n", n * scale);
    }
    for (le, n) in [("0.0001", 50), ("0.0005", 99), ("+Inf", 100)] {
        text +=
            &format!("vla_safety_check_duration_seconds_bucket{{policy=\"joint-limits\",le=\"{le}\"}} {}\n", n * scale);
    }
    for (robot, ok, rejected, limited) in [("arm-1", 60, 5, 0), ("arm-2", 40, 0, 3)] {
        text += &format!("vla_robot_requests_total{{robot_id=\"{robot}\",status=\"success\"}} {}\n", ok * scale);
        text += &format!("vla_robot_requests_total{{robot_id=\"{robot}\",status=\"rejected\"}} {}\n", rejected * scale);
        text +=
            &format!("vla_robot_requests_total{{robot_id=\"{robot}\",status=\"rate_limited\"}} {}\n", limited * scale);
        text += &format!("vla_robot_last_request_timestamp_seconds{{robot_id=\"{robot}\"}} {}\n", (T0 - 2_000) / 1000);
    }
    text
}

fn snapshot(poll: u64, gpu: bool) -> Snapshot {
    let gpu = if gpu {
        json!({"available": true, "updated_unix_ms": T0, "devices": [{
            "index": 0, "name": "NVIDIA H100 80GB HBM3", "utilization_percent": 40.0 + poll as f64 * 10.0,
            "memory_used_gb": 21.5, "memory_total_gb": 85.0, "memory_utilization_percent": 25.3,
            "temperature_celsius": 61.0, "power_watts": 212.4, "throttle_reasons": []}]})
    } else {
        json!({"available": false, "reason": "NVML unavailable: libnvidia-ml.so: cannot open shared object file", "devices": [], "updated_unix_ms": 0})
    };
    let quota = |robot: &str, remaining: u64| {
        json!({"robot_id": robot, "robot_type": "ur5e", "group": "cell-a", "overrides": {}, "configured": {},
               "buckets": [{"scope": "robot", "bucket": "rate", "limit": 50, "used": 50 - remaining, "remaining": remaining,
                            "reset_unix_ms": T0 + 4_000, "source": "policy"}]})
    };
    let policy = |name: &str, world: &str, order: i64, mode: &str, evaluations: u64, denials: u64| {
        json!({"name": name, "world": world, "version": 2, "order": order, "mode": mode, "enabled": true,
               "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "size_bytes": 81234,
               "signed": false, "config": {"max_velocity": 1.5}, "created_unix_ms": T0, "updated_unix_ms": T0,
               "state": "ready", "stats": {"evaluations": evaluations, "allows": evaluations - denials, "denials": denials,
               "modifications": 0, "failures": 0, "consecutive_failures": 0, "mean_eval_us": 41.0}})
    };
    let value = json!({
        "at_ms": T0 + poll * 1000,
        "health": {"status": "ok", "version": "0.1.0", "uptime_seconds": 3725.0},
        "gpu": gpu,
        "queue": {"models": [{"model": "tiny-vla", "queue_depth": poll * 3, "queue_capacity": 256, "queue_utilization_percent": poll as f64 * 1.2,
                  "max_batch_size": 8, "workers": 1, "device": "cpu", "batching": true, "computed": 1200 * poll, "batches": 300 * poll,
                  "mean_batch_size": 4.0, "rejected_queue_full": 0, "dropped_deadline": 2, "dropped_disconnect": 1, "failed": 0}]},
        "models": {"models": [{"name": "tiny-vla", "version": "1", "device": "cpu", "max_batch_size": 8, "batching": true,
                   "state_dim": 7, "action_dof": 7, "action_horizon": 4, "action_kind": "delta",
                   "platform": "pytorch_aoti", "cameras": ["base", "wrist"], "tokenizer": "tokenizer.json", "dt_ms": 20.0,
                   "stats": {"queue_depth": 0, "queue_capacity": 256, "computed": 1200, "batches": 300, "rejected_queue_full": 0,
                             "dropped_deadline": 2, "dropped_disconnect": 1, "failed": 0}}],
                   "health": [{"name": "tiny-vla", "version": "1", "state": "serving", "device": "cpu"},
                              {"name": "big-vla", "state": "failed", "error": "model.pt: not TorchScript"}]},
        "policies": {"policies": [policy("rate-limit", "admission", 0, "enforce", 1520, 12), policy("joint-limits", "safety", 10, "enforce", 1500, 31),
                                  policy("speed-cap", "safety", 20, "shadow", 800, 9)]},
        "quotas": {"robots": [quota("arm-1", 44), quota("arm-2", 0)]},
        "audit": {"records": [
            {"seq": 4, "time_unix_ms": T0 - 500, "request_id": "r-4", "robot_id": "arm-2", "robot_type": "ur5e", "model": "tiny-vla",
             "model_version": "1", "policy": "envelope", "version": 0, "world": "host", "mode": "enforce", "decision": "deny", "applied": true,
             "code": "out_of_envelope_max", "reason": "step 0, dof 2: 1e30 is above the envelope's max 1", "severity": "high",
             "original_action": [0.1, 0.2, 1e30, 0.0, 0.0, 0.0, 0.5]},
            {"seq": 3, "time_unix_ms": T0 - 1_000, "request_id": "r-3", "robot_id": "arm-1", "robot_type": "ur5e", "model": "tiny-vla",
             "policy": "speed-cap", "version": 2, "world": "safety", "mode": "shadow", "decision": "deny", "applied": false,
             "code": "too_fast", "reason": "joint 3 at 2.10 rad/s exceeds 1.50", "original_action": [0.1, 0.2, 2.1, 0.0, 0.0, 0.0, 0.5]},
            {"seq": 2, "time_unix_ms": T0 - 2_000, "request_id": "r-2", "robot_id": "arm-2", "robot_type": "ur5e", "model": "tiny-vla",
             "policy": "rate-limit", "version": 2, "world": "admission", "mode": "enforce", "decision": "deny", "applied": true,
             "code": "rate_limited", "reason": "robot arm-2: 50 requests per 1s; retry in 0.4 s"},
            {"seq": 1, "time_unix_ms": T0 - 3_000, "request_id": "r-1", "robot_id": "arm-1", "robot_type": "ur5e", "model": "tiny-vla",
             "policy": "joint-limits", "version": 2, "world": "safety", "mode": "enforce", "decision": "modify", "applied": true,
             "code": "clamped", "reason": "joint 1 clamped to 2.90", "original_action": [3.2, 0.0], "final_action": [2.9, 0.0]}]},
    });
    Snapshot {
        at_ms: value["at_ms"].as_u64().unwrap(),
        health: value["health"].clone(),
        gpu: serde_json::from_value(value["gpu"].clone()).unwrap(),
        queue: serde_json::from_value(value["queue"].clone()).unwrap(),
        models: serde_json::from_value(value["models"].clone()).unwrap(),
        policies: serde_json::from_value(value["policies"].clone()).unwrap(),
        quotas: serde_json::from_value(value["quotas"].clone()).unwrap(),
        audit: serde_json::from_value(value["audit"].clone()).unwrap(),
        metrics: Scrape::parse(&metrics(poll)),
    }
}

fn app(gpu: bool) -> App {
    let mut app = App::new("https://10.0.0.5:8443");
    for poll in 1..=4 {
        app.ingest(snapshot(poll, gpu));
    }
    app.now_ms = T0 + 4_500;
    app
}

fn render(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| ui::draw(f, app)).unwrap();
    terminal.backend().to_string()
}

fn keys(app: &mut App, keys: &str) {
    for c in keys.chars() {
        app.on_key(KeyEvent::from(KeyCode::Char(c)));
    }
}

#[test]
fn every_view_at_80x24() {
    let mut app = app(true);
    for tab in Tab::ALL {
        keys(&mut app, &(tab.index() + 1).to_string());
        insta::assert_snapshot!(format!("{}_80x24", tab.title().to_lowercase()), render(&app, 80, 24));
    }
}

#[test]
fn larger_terminals_get_more_room() {
    let mut app = app(true);
    insta::assert_snapshot!("overview_120x36", render(&app, 120, 36));
    keys(&mut app, "5");
    insta::assert_snapshot!("policies_120x36", render(&app, 120, 36));
}

#[test]
fn no_gpu_telemetry_is_said_plainly() {
    let mut app = app(false);
    insta::assert_snapshot!("overview_no_gpu", render(&app, 80, 24));
    keys(&mut app, "2");
    insta::assert_snapshot!("gpu_no_gpu", render(&app, 80, 24));
}

#[test]
fn robots_filter_and_sort() {
    let mut app = app(true);
    keys(&mut app, "4ss");
    insta::assert_snapshot!("robots_sorted_by_last_seen", render(&app, 80, 24));
    keys(&mut app, "/arm-2");
    app.on_key(KeyEvent::from(KeyCode::Enter));
    insta::assert_snapshot!("robots_filtered", render(&app, 80, 24));
}

#[test]
fn audit_filters_by_robot_and_policy() {
    let mut app = app(true);
    keys(&mut app, "7/robot:arm-1 policy:speed");
    app.on_key(KeyEvent::from(KeyCode::Enter));
    let screen = render(&app, 80, 24);
    assert!(screen.contains("(1, 0 envelope)"), "{screen}");
    assert!(screen.contains("too_fast"), "{screen}");
}

#[test]
fn help_confirm_and_upload_overlays() {
    let mut app = app(true);
    keys(&mut app, "5?");
    insta::assert_snapshot!("help_policies", render(&app, 80, 24));
    keys(&mut app, " jjm");
    insta::assert_snapshot!("choose_replaced", render(&app, 80, 24));
    keys(&mut app, "k");
    app.on_key(KeyEvent::from(KeyCode::Enter));
    insta::assert_snapshot!("confirm_promote", render(&app, 80, 24));
    app.on_key(KeyEvent::from(KeyCode::Esc));
    keys(&mut app, "u/srv/policies/speed-cap.wasm");
    app.on_key(KeyEvent::from(KeyCode::Tab));
    app.on_key(KeyEvent::from(KeyCode::Tab));
    app.on_key(KeyEvent::from(KeyCode::Backspace));
    insta::assert_snapshot!("upload_form", render(&app, 80, 24));
}

#[test]
fn envelope_violations_stand_out_in_the_audit_view() {
    let mut app = app(true);
    keys(&mut app, "7v");
    let screen = render(&app, 80, 24);
    assert!(screen.contains("(1, 1 envelope) filter \"kind:envelope\""), "{screen}");
    assert!(screen.contains("⚠ envelope") && screen.contains("above the envelope's max 1"), "{screen}");
    assert!(screen.contains("action envelope of tiny-vla v1 (host, after every policy) on arm-2"), "{screen}");
    keys(&mut app, "v");
    assert!(render(&app, 80, 24).contains("(4, 1 envelope)"));
}

#[test]
fn a_replay_report_lists_the_changed_decisions() {
    use vla_api::{ReplayChange, ReplayOutcome, ReplayReport};
    let mut app = app(true);
    keys(&mut app, "5jj");
    let change = |seq: u64, robot: &str, code: &str| ReplayChange {
        seq,
        request_id: format!("r-{seq}"),
        robot_id: robot.into(),
        time_unix_ms: T0 - 60_000 + seq * 1000,
        recorded: ReplayOutcome { decision: "allow".into(), ..ReplayOutcome::default() },
        candidate: ReplayOutcome {
            decision: "deny".into(),
            code: Some(code.into()),
            reason: Some("joint 3 at 1.40 rad/s exceeds 1.20".into()),
            action: None,
        },
    };
    let report = ReplayReport {
        policy: "speed-cap".into(),
        world: "safety".into(),
        replaces: "joint-limits".into(),
        replayed: 120,
        unchanged: 118,
        skipped: 3,
        changed: vec![change(7, "arm-1", "too_fast"), change(9, "arm-2", "too_fast")],
        ..ReplayReport::default()
    };
    app.action_done(Ok(vla_console::client::Reply::Replay(Box::new(report))));
    keys(&mut app, "j");
    insta::assert_snapshot!("replay_report", render(&app, 80, 24));
}

#[test]
fn a_lost_connection_keeps_what_was_shown() {
    let mut app = app(true);
    app.poll_failed("GET /gpu/stats: error sending request: connection refused".into());
    app.now_ms += 8_000;
    insta::assert_snapshot!("overview_disconnected", render(&app, 80, 24));
}
