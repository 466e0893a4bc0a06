//! The operator console end to end: the real `vla-console` binary in a real tmux, against a
//! live appliance over HTTPS, read back with `tmux capture-pane`.
//!
//! An operator watches live traffic (queue and GPU views), spots a rate-limited robot, uploads
//! a policy in shadow mode through the console's form, sees its decisions in the audit view,
//! promotes it to enforce, sees the robot refused, and the console reconnects after the
//! appliance restarts. Another replays a shadow candidate against the recent requests, promotes
//! it in the place of the policy it replaces, and finds the action envelope's violations.
//!
//! The console binary is built by `cargo test --workspace` (the `vla-console` package has
//! integration tests, so its binary is built beside ours); with `cargo test -p appliance`
//! alone, build it first: `cargo build -p vla-console`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::TestAppliance;
use reqwest::StatusCode;

/// The console binary beside this test's own build.
fn console_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/console-<hash> → target/<profile>/vla-console
    let path = exe.parent().and_then(|d| d.parent()).unwrap().join("vla-console");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p vla-console` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str, width: u16, height: u16) -> Tmux {
        // One server per test: the tests of this file run side by side in one process.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmux = Tmux { socket: format!("vla-console-test-{}-{n}", std::process::id()) };
        // The pane stays after the console exits, so its exit status (or a crash) can be read.
        let status = Command::new("tmux")
            .args([
                "-L",
                &tmux.socket,
                "-f",
                "/dev/null",
                "start-server",
                ";",
                "set-option",
                "-g",
                "remain-on-exit",
                "on",
                ";",
            ])
            .args(["new-session", "-d", "-s", "console", "-x", &width.to_string(), "-y", &height.to_string(), command])
            .env("TERM", "xterm-256color")
            .status()
            .expect("tmux is installed (scripts/setup.sh installs it)");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `#{pane_dead} #{pane_dead_status}`: `1 0` once the console exited cleanly.
    fn pane_state(&self) -> String {
        self.run(&["display-message", "-p", "-t", "console", "#{pane_dead} #{pane_dead_status}"]).trim().to_string()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "console"])
    }

    /// Types text literally.
    fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-t", "console", "-l", text]);
    }

    /// Sends named keys (`Enter`, `Tab`, `BSpace`, …).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "console"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until the screen satisfies `check`, failing with the last screen after 30 s.
    async fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}; the console shows:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

/// The number in column `column` (0-based, whitespace-separated) of the first row that
/// starts (after the border) with `first`.
fn cell(screen: &str, first: &str, column: usize) -> Option<u64> {
    screen.lines().find_map(|line| {
        let fields: Vec<&str> = line.trim_matches(|c: char| c == '│' || c.is_whitespace()).split_whitespace().collect();
        if fields.first() != Some(&first) {
            return None;
        }
        fields.get(column)?.parse().ok()
    })
}

fn console_command(app: &TestAppliance) -> String {
    let data = app.data.path();
    format!(
        "{} --url https://localhost:{} --token-file {} --ca-file {} --interval-ms 250",
        console_binary().display(),
        app.addr.port(),
        data.join("admin.token").display(),
        data.join("tls/cert.pem").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_uploads_promotes_and_audits_from_the_console() {
    let app = TestAppliance::start(|config, _| {
        let limits = serde_json::json!({"robot": {"rate": "100/s"}});
        config.policy.preload = vec![common::preload("rate-limit", "admission", 0, limits)];
    })
    .await;
    // arm-3 may send one request an hour: its second is rate limited.
    app.robot_key("arm-3").await;
    let r =
        app.admin(reqwest::Method::PUT, "/admin/quotas/arm-3").json(&serde_json::json!({"rate": "1/h", "burst": 1}));
    assert_eq!(r.send().await.unwrap().status(), StatusCode::OK);
    for seed in 1..=3 {
        assert_eq!(app.infer(common::robot_request(seed)).await.status(), StatusCode::OK);
    }
    let tmux = Tmux::start(&console_command(&app), 100, 30);
    tmux.wait_for("the overview, connected", |s| s.contains("● connected") && s.contains("Requests/s")).await;

    // Queue view: live numbers, growing with traffic.
    tmux.keys(&["3"]);
    let screen = tmux.wait_for("the queue view", |s| cell(s, "tiny-vla", 4).is_some_and(|b| b >= 1)).await;
    let batches = cell(&screen, "tiny-vla", 4).unwrap();
    for seed in 1..=2 {
        assert_eq!(app.infer(common::robot_request(seed)).await.status(), StatusCode::OK);
    }
    assert_eq!(app.infer(common::robot_request(3)).await.status(), StatusCode::TOO_MANY_REQUESTS);
    tmux.wait_for("more batches in the queue view", |s| cell(s, "tiny-vla", 4).is_some_and(|b| b > batches)).await;

    // GPU view: the device's live readings, or plainly no telemetry on a machine without one.
    tmux.keys(&["2"]);
    let gpu: vla_api::GpuStats =
        app.admin(reqwest::Method::GET, "/gpu/stats").send().await.unwrap().json().await.unwrap();
    if gpu.available {
        let name = gpu.devices[0].name.clone();
        tmux.wait_for("the GPU's readings", |s| s.contains(&name) && s.contains("util") && s.contains(" %")).await;
    } else {
        tmux.wait_for("the no-telemetry state", |s| s.contains("No GPU telemetry")).await;
    }

    // Upload a policy through the console's form: shadow mode is the form's default.
    tmux.keys(&["5"]);
    tmux.wait_for("the policy view", |s| s.contains("Policies (1)") && s.contains("rate-limit")).await;
    tmux.keys(&["u"]);
    tmux.wait_for("the upload form", |s| s.contains("Upload policy")).await;
    tmux.type_text(&common::policy_path("instruction-filter").display().to_string());
    tmux.keys(&["Tab"]);
    tmux.type_text("no-forbidden");
    tmux.keys(&["Tab"]);
    tmux.keys(&["BSpace"; 6]);
    tmux.type_text("admission");
    tmux.keys(&["Tab", "Tab", "Tab"]);
    tmux.type_text(r#"{"deny": ["*forbidden*"]}"#);
    tmux.keys(&["Enter"]);
    tmux.wait_for("the confirmation", |s| s.contains("Confirm") && s.contains("shadow mode")).await;
    tmux.keys(&["y"]);
    tmux.wait_for("the new policy, in shadow mode", |s| {
        s.lines().any(|l| l.contains("no-forbidden") && l.contains("admission") && l.contains("shadow"))
    })
    .await;

    // A refused change shows the appliance's own message and breaks nothing.
    tmux.keys(&["u"]);
    tmux.wait_for("the upload form", |s| s.contains("Upload policy")).await;
    tmux.type_text("/nonexistent/policy.wasm");
    tmux.keys(&["Enter"]);
    tmux.wait_for("the confirmation", |s| s.contains("Confirm")).await;
    tmux.keys(&["y"]);
    tmux.wait_for("the refusal", |s| s.contains("refused: cannot read /nonexistent/policy.wasm")).await;

    // In shadow mode the robot is served; the audit view shows the decision, not applied.
    let mut forbidden = common::robot_request(1);
    forbidden.instruction = "hand over the forbidden part".into();
    assert_eq!(app.infer(forbidden.clone()).await.status(), StatusCode::OK);
    tmux.keys(&["7"]);
    tmux.wait_for("the shadow denial in the audit view", |s| {
        s.lines().any(|l| l.contains("arm-1") && l.contains("no-forbidden") && l.contains("deny*"))
    })
    .await;

    // Promote to enforce from the console; the robot is now refused and the audit says so.
    tmux.keys(&["5"]);
    tmux.wait_for("the policy view", |s| s.contains("Policies (2)")).await;
    // Admission policies are listed first: the upload (order 100) is the second row.
    tmux.keys(&["j", "m"]);
    // No enforcing policy shares its name: the chooser offers to replace nothing.
    tmux.wait_for("the promote chooser", |s| s.contains("▶ replace nothing: enforce beside the others")).await;
    tmux.keys(&["Enter"]);
    tmux.wait_for("the confirmation", |s| s.contains("Promote no-forbidden to enforce beside the others?")).await;
    tmux.keys(&["y"]);
    tmux.wait_for("the policy, enforcing", |s| s.lines().any(|l| l.contains("no-forbidden") && l.contains("enforce")))
        .await;
    assert_eq!(app.infer(forbidden).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    tmux.keys(&["7"]);
    tmux.wait_for("the enforced denial in the audit view", |s| {
        s.lines().any(|l| l.contains("arm-1") && l.contains("no-forbidden") && l.contains(" deny "))
    })
    .await;

    // Robots view: the refused robot, with its rejection counted.
    tmux.keys(&["4"]);
    tmux.wait_for("arm-1's rejection in the robot view", |s| cell(s, "arm-1", 4) == Some(1)).await;
    // …and the rate-limited robot, with its spent quota.
    let screen = tmux.wait_for("arm-3 rate limited in the robot view", |s| cell(s, "arm-3", 5) == Some(1)).await;
    assert!(screen.lines().any(|l| l.contains("arm-3") && l.contains("rate 0/1")), "{screen}");

    // Help overlay, then the appliance restarts on the same address: the console says it lost
    // the appliance, keeps what it showed, and reconnects.
    tmux.keys(&["?"]);
    tmux.wait_for("the help overlay", |s| s.contains("Help") && s.contains("sort by robot")).await;
    tmux.keys(&["Escape"]);
    app.signal_shutdown();
    tmux.wait_for("the lost connection, with the robots still shown", |s| {
        s.contains("disconnected, retrying") && s.contains("arm-1")
    })
    .await;
    let addr = app.addr;
    let app = app.restart_with(|c| c.server.listen = addr).await;
    tmux.wait_for("a reconnection", |s| s.contains("● connected") && s.contains("arm-1")).await;

    tmux.keys(&["q"]);
    let start = Instant::now();
    let state = loop {
        let state = tmux.pane_state();
        if state.starts_with('1') {
            break state;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the console did not exit on `q`:\n{}", tmux.screen());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // tmux sometimes marks the pane dead before it has reaped the process (no status yet).
    assert!(state == "1" || state == "1 0", "the console exited with `{state}`:\n{}", tmux.screen());
    assert!(!tmux.screen().contains("panicked"), "{}", tmux.screen());
    app.stop().await.unwrap();
}

/// The console's two ways to trust the appliance, against the live one: its certificate as a
/// CA file, or pinned by SHA-256; a wrong pin or an unrelated CA is refused (fail closed).
#[tokio::test]
async fn the_console_trusts_a_pinned_certificate_or_a_ca_file_and_nothing_else() {
    use sha2::Digest;
    use vla_console::client::{Connection, Trust, parse_pin};
    let app = TestAppliance::start(|_, _| {}).await;
    let cert_path = app.data.path().join("tls/cert.pem");
    let pem = std::fs::read(&cert_path).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
    let pin: Vec<String> = sha2::Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02X}")).collect();
    let url = format!("https://localhost:{}", app.addr.port());
    let timeout = Duration::from_secs(10);
    let connect = |trust: Trust| Connection::new(&url, app.admin_token.clone(), &trust, timeout).unwrap();

    let pinned = connect(Trust::Pin(parse_pin(&pin.join(":")).unwrap()));
    let snapshot = pinned.snapshot().await.unwrap();
    assert_eq!(snapshot.queue.unwrap().models[0].model, "tiny-vla");
    // By IP address too: a pin does not depend on the names in the certificate.
    let by_ip = format!("https://127.0.0.1:{}", app.addr.port());
    let pin_bytes = parse_pin(&pin.concat()).unwrap();
    Connection::new(&by_ip, app.admin_token.clone(), &Trust::Pin(pin_bytes), timeout)
        .unwrap()
        .snapshot()
        .await
        .unwrap();
    connect(Trust::CaFile(cert_path)).snapshot().await.unwrap();

    let mut wrong = pin_bytes;
    wrong[0] ^= 1;
    let err = connect(Trust::Pin(wrong)).snapshot().await.unwrap_err();
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    let other = tempfile::tempdir().unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(other.path().join("ca.pem"), stranger.cert.pem()).unwrap();
    let err = connect(Trust::CaFile(other.path().join("ca.pem"))).snapshot().await.unwrap_err();
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    // A wrong token is the appliance's refusal, shown as it says it.
    let bad = Connection::new(&url, "vlaadm_wrong".into(), &Trust::Pin(pin_bytes), timeout).unwrap();
    let err = bad.snapshot().await.unwrap_err();
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    app.stop().await.unwrap();
}

/// A new version of a safety policy, trialled in shadow mode beside the enforcing one: the
/// operator replays it from the console against what the cell recently saw (the changed
/// decisions listed, as the REST replay reports them), promotes it in the old one's place in
/// one change, and finds the host's action envelope stopping a hostile policy's action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_candidate_promotes_it_in_place_and_sees_envelope_violations() {
    use serde_json::json;
    let app = TestAppliance::start(|config, _| {
        let tighter = json!({"robot_types": {"ur5e": {"velocity": 0.001}}});
        config.policy.preload = vec![
            common::preload("joint-limits", "safety", 10, json!({"robot_types": {"ur5e": {"velocity": 1.0}}})),
            appliance::config::PreloadPolicy {
                name: "joint-limits-v2".into(),
                mode: "shadow".into(),
                ..common::preload("joint-limits", "safety", 20, tighter)
            },
            // Turns the action of a request that says `attack` into 1e30s: the envelope stops it.
            common::preload("oversized-output", "safety", 100, json!({"huge": true})),
        ];
    })
    .await;
    for seed in 1..=3 {
        assert_eq!(app.infer(common::robot_request(seed)).await.status(), StatusCode::OK);
    }
    let attack = vla_api::InferenceRequest { instruction: "attack the red block".into(), ..common::robot_request(4) };
    let response = app.infer(attack).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "action_out_of_envelope", "{body}");

    let tmux = Tmux::start(&console_command(&app), 110, 32);
    tmux.wait_for("the overview, connected", |s| s.contains("● connected")).await;

    // The audit view: the envelope's denial stands out, and `v` keeps only those.
    tmux.keys(&["7"]);
    tmux.wait_for("the envelope's denial", |s| {
        s.lines().any(|l| l.contains("arm-4") && l.contains("⚠ envelope") && l.contains("deny"))
    })
    .await;
    tmux.keys(&["v"]);
    let screen = tmux
        .wait_for("only the envelope's records", |s| {
            s.contains("filter \"kind:envelope\"") && s.contains("action envelope of tiny-vla")
        })
        .await;
    assert!(!screen.lines().any(|l| l.contains("joint-limits-v2")), "{screen}");
    assert!(screen.contains("→ denied, nothing sent"), "{screen}");

    // Replay the shadow candidate in place of the enforcing version (chosen by its name).
    tmux.keys(&["5"]);
    tmux.wait_for("the policy view", |s| s.contains("Policies (3)")).await;
    tmux.keys(&["j", "r"]);
    tmux.wait_for("the replay chooser", |s| {
        s.contains("Replay joint-limits-v2 on what the cell recently saw") && s.contains("▶ in place of joint-limits ")
    })
    .await;
    tmux.keys(&["Enter"]);
    let screen =
        tmux.wait_for("the replay's report", |s| s.contains("Replay: joint-limits-v2 in place of joint-limits")).await;
    let expected: vla_api::ReplayReport = app
        .admin(reqwest::Method::POST, "/admin/policies/joint-limits-v2/replay")
        .json(&json!({"replaces": "joint-limits"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(expected.replayed, 4, "{expected:?}");
    assert!(!expected.changed.is_empty(), "{expected:?}");
    let summary = format!("replayed {} · unchanged {} ·", expected.replayed, expected.unchanged);
    assert!(screen.contains(&summary), "{summary}\n{screen}");
    assert!(screen.contains(&format!("would change {}", expected.changed.len())), "{screen}");
    let rows = screen.lines().filter(|l| l.contains("allow") && l.contains("→") && l.contains("modify")).count();
    assert_eq!(rows, expected.changed.len(), "{screen}");
    assert!(screen.contains("candidate: modify"), "{screen}");
    tmux.keys(&["Escape"]);

    // Promote it: the chooser offers the old version, and one change swaps them.
    tmux.keys(&["m"]);
    tmux.wait_for("the promote chooser", |s| s.contains("Promote to enforce") && s.contains("▶ replace joint-limits "))
        .await;
    tmux.keys(&["Enter"]);
    tmux.wait_for("the confirmation", |s| s.contains("Promote joint-limits-v2 to enforce, replacing joint-limits?"))
        .await;
    tmux.keys(&["y"]);
    tmux.wait_for("the new version enforcing, the old one gone", |s| {
        s.contains("Policies (2)") && s.lines().any(|l| l.contains("joint-limits-v2") && l.contains("enforce"))
    })
    .await;
    let list: vla_api::PolicyList =
        app.admin(reqwest::Method::GET, "/admin/policies").send().await.unwrap().json().await.unwrap();
    let names: Vec<(&str, &str)> = list.policies.iter().map(|p| (p.name.as_str(), p.mode.as_str())).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&("joint-limits-v2", "enforce")) && !names.iter().any(|(n, _)| *n == "joint-limits"));
    // The robot now gets the tighter limit.
    let response = app.infer(common::robot_request(1)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: vla_api::InferenceResponse = response.json().await.unwrap();
    assert_eq!(body.policy.decision, "modify");
    assert!(body.action.iter().all(|v| v.abs() <= 0.001 + 1e-6), "{:?}", body.action);

    tmux.keys(&["q"]);
    app.stop().await.unwrap();
}
