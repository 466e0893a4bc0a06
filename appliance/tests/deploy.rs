//! Deploying the appliance (README *Deploy*): the relocatable release tree built by
//! `scripts/package.sh` serves from wherever it is put, with an empty environment; the binary
//! speaks systemd's notify protocol (`Type=notify`: READY, WATCHDOG, STOPPING) to a notify
//! socket the test holds as systemd would; the shipped unit passes `systemd-analyze verify`
//! and its `security` exposure stays low; `appliance health` asks the running appliance.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A configuration for a test appliance: loopback, an ephemeral port, data in `data`.
fn write_config(dir: &Path, data: &Path) -> PathBuf {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n[data]\ndir = \"{}\"\n[models]\ncpu_threads = 1\n",
        data.display()
    );
    let path = dir.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Waits for the `serving on https://ADDR` line of `child`'s log.
fn serving(child: &mut Child) -> std::net::SocketAddr {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(at) = line.find("serving on https://") {
                let addr = line[at + "serving on https://".len()..].split([' ', ',']).next().unwrap().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(180)).expect("the appliance serves").parse().unwrap()
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "the appliance did not stop within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn one_inference(addr: std::net::SocketAddr, data: &Path) {
    let client = common::https_client(&data.join("tls/cert.pem"), addr);
    let key = std::fs::read_to_string(data.join("demo-robot.key")).unwrap();
    let mut request = common::robot_request(1);
    request.robot_id = "demo-arm".into();
    request.robot_type = None;
    let r = client
        .post(format!("https://localhost:{}/v1/inference", addr.port()))
        .header("x-api-key", key.trim())
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relocatable_tree_serves_from_another_directory_with_an_empty_environment() {
    // The tree, from the binaries this test run built; its libraries hard-linked from the venv
    // (never modified), so the test costs no copy of libtorch.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_appliance")).parent().unwrap().to_path_buf();
    assert!(
        bin_dir.join("vla-console").exists(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build -p vla-console`)",
        bin_dir.join("vla-console").display()
    );
    let package = Command::new("bash")
        .arg(root().join("scripts/package.sh"))
        .args(["--profile", "dev", "--no-build", "--link", "--bin-dir"])
        .arg(&bin_dir)
        .arg(&out)
        .output()
        .unwrap();
    assert!(package.status.success(), "package.sh: {}", String::from_utf8_lossy(&package.stderr));
    // Put somewhere else than where it was built: nothing in it names its old place.
    let tree = out.join("moved");
    std::fs::rename(out.join("vla-appliance"), &tree).unwrap();
    for f in ["bin/appliance", "bin/vla-console", "etc/appliance.toml", "systemd/vla-appliance.service", "VERSION"] {
        assert!(tree.join(f).exists(), "{f} is missing from the tree");
    }
    for p in ["joint-limits", "workspace-bounds", "instruction-filter", "rate-limit"] {
        assert!(tree.join(format!("policies/dist/{p}.wasm")).exists(), "policy {p} is missing");
    }
    let rpath = Command::new("patchelf").arg("--print-rpath").arg(tree.join("bin/appliance")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&rpath.stdout).trim(), "$ORIGIN/../lib");
    let ldd = Command::new("ldd").arg(tree.join("bin/appliance")).env_clear().output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    assert!(!ldd.contains("not found") && !ldd.contains(".venv"), "{ldd}");
    assert!(ldd.contains(&format!("{}/bin/../lib/libtorch", tree.display())), "{ldd}");

    // Serve from the tree with nothing in the environment: no PATH, no venv, no HOME.
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let config = write_config(scratch.path(), &data);
    let mut child = Command::new(tree.join("bin/appliance"))
        .arg("--config")
        .arg(&config)
        .env_clear()
        // The tree's root, as the unit runs it: the shipped policies are preloaded from there.
        .current_dir(&tree)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = serving(&mut child);
    one_inference(addr, &data).await;
    // `appliance health` from the tree, as a container's health check runs it.
    let health = Command::new(tree.join("bin/appliance"))
        .arg("--config")
        .arg(&config)
        .args(["health", "--addr", &addr.to_string()])
        .env_clear()
        .output()
        .unwrap();
    assert!(health.status.success(), "health: {}", String::from_utf8_lossy(&health.stderr));
    let body: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    let console = Command::new(tree.join("bin/vla-console")).arg("--version").env_clear().output().unwrap();
    assert!(console.status.success(), "{}", String::from_utf8_lossy(&console.stderr));
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    // A stopped appliance: `appliance health` says so and fails.
    let health = Command::new(tree.join("bin/appliance"))
        .arg("--config")
        .arg(&config)
        .args(["health", "--addr", &addr.to_string(), "--timeout-ms", "2000"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!health.status.success());
    assert!(String::from_utf8_lossy(&health.stderr).contains("connecting to"), "{health:?}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_appliance_tells_systemd_ready_watchdog_and_stopping() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let config = write_config(scratch.path(), &data);
    // The notify socket, held here as systemd holds it for a `Type=notify` unit.
    let socket_path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // systemd names the watchdog's process (WATCHDOG_PID): the shell execs the appliance, so
    // its pid is the appliance's.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("export WATCHDOG_PID=$$; exec \"$0\" --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_appliance"))
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "600000")
        // The checkout's root: the default configuration preloads policies/dist/*.wasm.
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut messages: Vec<String> = Vec::new();
    let receive_until = |what: &str, limit: Duration, messages: &mut Vec<String>| {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while started.elapsed() < limit {
            if let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = message.lines().any(|l| l == what);
                messages.push(message);
                if done {
                    return;
                }
            }
        }
        panic!("no {what} within {limit:?}; got {messages:?}");
    };
    receive_until("READY=1", Duration::from_secs(180), &mut messages);
    let ready = messages.last().unwrap().clone();
    assert!(ready.contains("STATUS=serving on https://127.0.0.1:"), "{ready}");
    assert!(messages[..messages.len() - 1].iter().all(|m| !m.contains("WATCHDOG=1")), "no ping before ready");
    // Ready means serving: the port answers at once.
    let addr = serving(&mut child);
    one_inference(addr, &data).await;
    // Pings at half the watchdog period (300 ms): several within two seconds, however busy
    // the machine (only the lower bound is asserted: a stalled runtime catches up in a burst).
    let before = messages.len();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        receive_until("WATCHDOG=1", Duration::from_secs(2), &mut messages);
    }
    let pings = messages[before..].iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "{pings} pings in 2 s at a 600 ms watchdog");
    sigterm(&child);
    receive_until("STOPPING=1", Duration::from_secs(10), &mut messages);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify_and_its_exposure_is_low() {
    let scratch = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(root().join("images/systemd/vla-appliance.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/vla-appliance/bin/appliance --config /etc/vla-appliance/appliance.toml"));
    // Verified against the real binary in the place of the installed one.
    let unit = unit.replace("/opt/vla-appliance/bin/appliance", env!("CARGO_BIN_EXE_appliance"));
    let path = scratch.path().join("vla-appliance.service");
    std::fs::write(&path, unit).unwrap();
    let verify = |path: &Path| {
        let out = Command::new("systemd-analyze").arg("verify").arg(path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    };
    verify(&path);
    let exposure = |path: &Path| -> f64 {
        let out = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
        line.split(": ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
    };
    let cpu = exposure(&path);
    assert!(cpu <= 2.0, "exposure {cpu}");
    // The GPU drop-in opens the NVIDIA devices and nothing else.
    let dropin = scratch.path().join("vla-appliance.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::copy(root().join("images/systemd/gpu.conf"), dropin.join("gpu.conf")).unwrap();
    verify(&path);
    let gpu = exposure(&path);
    // Higher with the drop-in: it was read (it opens devices), and still low.
    assert!(gpu <= 2.0 && gpu > cpu, "exposure {gpu} with the GPU drop-in, {cpu} without");
    eprintln!("systemd-analyze security: exposure {cpu} (CPU), {gpu} (with gpu.conf)");
}
