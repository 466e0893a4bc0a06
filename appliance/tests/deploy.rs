//! Deploying the appliance (README *Deploy*): the relocatable release tree built by
//! `scripts/package.sh` serves from wherever it is put, with an empty environment; the binary
//! speaks systemd's notify protocol (`Type=notify`: READY, WATCHDOG, STOPPING) to a notify
//! socket the test holds as systemd would; the shipped unit passes `systemd-analyze verify`
//! and its `security` exposure stays low; `appliance health` asks the running appliance.
//! The `.deb` (`scripts/deb.sh`) installs into a debootstrapped Debian root, serves there as
//! its user, keeps its data on upgrade and removal and loses it on purge; the image
//! (`images/Containerfile`), built by buildah on that root imported as its base, serves an
//! inference from its filesystem; the compose stack and the Kubernetes manifests validate with
//! podman-compose and kubernetes-validate (`manifests_check.py`).

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

/// Runs `command`, which must succeed; its stdout.
fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Held while a tree is made or packed: a hard link made to a venv library changes that
/// file's ctime, which `tar` (in `dpkg-deb`) takes for a file changed while it read it.
static PACKAGING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn packaging() -> std::sync::MutexGuard<'static, ()> {
    PACKAGING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Held for the whole of each test that writes gigabytes (the tree's libraries, CUDA's among
/// them, packed, installed and upgraded by dpkg, or committed as an image layer): one at a
/// time, so a run needs the disk of the larger one, not of both.
/// (tokio's: held across the tests' awaits, never poisoned by a failed test.)
static GIGABYTES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn gigabytes() -> tokio::sync::MutexGuard<'static, ()> {
    GIGABYTES.lock().await
}

/// A test's working directory under the target's, by the test's name: emptied when it starts
/// (what a killed run left) and removed when it ends, failed or not.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `from` at `to` without a second copy where both are on one file system.
fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// The release tree in `out/vla-appliance`, from this test run's binaries; its libraries
/// hard-linked from the venv (never modified), so a tree costs no copy of libtorch.
fn package(out: &Path) -> PathBuf {
    let _packing = packaging();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_appliance")).parent().unwrap().to_path_buf();
    assert!(
        bin_dir.join("vla-console").exists(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build -p vla-console`)",
        bin_dir.join("vla-console").display()
    );
    run(Command::new("bash")
        .arg(root().join("scripts/package.sh"))
        .args(["--profile", "dev", "--no-build", "--link", "--bin-dir"])
        .arg(&bin_dir)
        .arg(out));
    out.join("vla-appliance")
}

/// `scripts/deb.sh` on `tree`: its answer (`deb: PATH (SIZE)`).
fn build_deb(tree: &Path, out: &Path) -> String {
    let _packing = packaging();
    run(Command::new("bash").arg(root().join("scripts/deb.sh")).arg("--tree").arg(tree).arg(out))
}

/// A minimal Debian bookworm root made by debootstrap from Debian's mirror, once per
/// checkout (kept under the target directory; `.complete` marks a finished one).
fn debian_root() -> PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = ONCE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("debian-bookworm");
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let mirror = std::env::var("VLA_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into());
        run(Command::new("debootstrap").args(["--variant=minbase", "bookworm"]).arg(&dir).arg(mirror));
        std::fs::write(dir.join(".complete"), "").unwrap();
    }
    dir
}

/// Runs `command` (argv) inside `root` as `user`, as a container runtime or systemd would:
/// a mount namespace of its own with /proc mounted in the root (the binaries' `$ORIGIN` rpath
/// is read from /proc/self/exe), then chroot. The namespace, and the mount, end with it.
/// Every path is absolute: the command runs with an empty environment.
fn in_root(root: &Path, user: &str, command: &str) -> Command {
    let mut c = Command::new("/usr/bin/unshare");
    c.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
        .arg(format!(
            "/usr/bin/mount -t proc proc \"$0/proc\" && exec /usr/sbin/chroot --userspec={user} \"$0\" /bin/sh -c '{command}'"
        ))
        .arg(root)
        .env_clear();
    c
}

/// A child process killed if the test fails before it stopped it (a live appliance would keep
/// a Debian root or an image's mount busy).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the appliance inside `root` as `user`, from its tree's root as the unit and the image
/// do, with an ephemeral loopback port: what the service or the container would run.
fn chroot_appliance(root: &Path, user: &str) -> Running {
    let child =
        in_root(root, user, "cd /opt/vla-appliance && exec bin/appliance --config /etc/vla-appliance/appliance.toml")
            .env("APPLIANCE_SERVER__LISTEN", "127.0.0.1:0")
            .env("APPLIANCE_SERVER__SHUTDOWN_GRACE_MS", "1000")
            .env("APPLIANCE_MODELS__CPU_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
    Running(child)
}

/// `command` (an `appliance health` command line) inside `root`, as `user`, asking `addr`.
fn chroot_health(root: &Path, user: &str, command: &str, addr: std::net::SocketAddr) -> serde_json::Value {
    let out = run(&mut in_root(root, user, &format!("exec {command} --addr {addr}")));
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"))
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
    let scratch = Scratch::new("package");
    let out = scratch.0.clone();
    package(&out);
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
    // Every library the serving process mapped (those it loaded with dlopen too) is the
    // tree's or the system's.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
    let outside: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|path| path.contains(".so") && !path.starts_with(&*tree.to_string_lossy()))
        .filter(|path| !["/usr/lib/", "/lib/", "/usr/lib64/", "/lib64/"].iter().any(|p| path.starts_with(p)))
        .collect();
    assert!(outside.is_empty(), "libraries from outside the tree: {outside:?}");
    assert!(maps.contains(&format!("{}/lib/libtorch_cpu.so", tree.display())), "libtorch is not the tree's");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deb_installs_into_a_debian_root_serves_there_and_keeps_its_data_until_purged() {
    let base = debian_root();
    let _gigabytes = gigabytes().await;
    let scratch = Scratch::new("deb");
    let out = scratch.0.clone();
    let tree = package(&out);
    let built = build_deb(&tree, &out);
    let deb = PathBuf::from(built.trim().strip_prefix("deb: ").unwrap().split(" (").next().unwrap());
    let fields = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(fields.contains("Package: vla-appliance") && fields.contains("Depends: libc6"), "{fields}");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./opt/vla-appliance/bin/appliance",
        "./opt/vla-appliance/lib/libtorch.so",
        "./opt/vla-appliance/policies/dist/joint-limits.wasm",
        "./etc/vla-appliance/appliance.toml",
        "./lib/systemd/system/vla-appliance.service",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} is not in the package");
    }
    assert!(contents.lines().all(|l| l.contains(" root/root ")), "files not owned by root");

    // A fresh Debian root (a copy of the debootstrapped one), the package installed by dpkg.
    let target = out.join("root");
    run(Command::new("cp").arg("-a").arg(&base).arg(&target));
    link_or_copy(&deb, &target.join("tmp/vla-appliance.deb"));
    let dpkg = |args: &[&str]| {
        run(Command::new("/usr/sbin/chroot")
            .arg(&target)
            .arg("dpkg")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    };
    let installed = dpkg(&["-i", "/tmp/vla-appliance.deb"]);
    std::fs::remove_file(target.join("tmp/vla-appliance.deb")).unwrap();
    // The first-run message says where the token, the key and the certificate will be.
    for what in ["/var/lib/vla-appliance/admin.token", "demo-robot.key", "tls/cert.pem", "fingerprint"] {
        assert!(installed.contains(what), "postinst does not mention {what}: {installed}");
    }
    let passwd = std::fs::read_to_string(target.join("etc/passwd")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("vla-appliance:") && l.ends_with(":/usr/sbin/nologin")), "{passwd}");
    let data = target.join("var/lib/vla-appliance");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o7777, 0o750);

    // As the service runs it: its user, its configuration, from /opt/vla-appliance.
    let mut child = chroot_appliance(&target, "vla-appliance:vla-appliance");
    let addr = serving(&mut child.0);
    let health = "/opt/vla-appliance/bin/appliance --config /etc/vla-appliance/appliance.toml health";
    assert_eq!(chroot_health(&target, "vla-appliance", health, addr)["status"], "ok");
    one_inference(addr, &data).await;
    sigterm(&child.0);
    assert!(wait_exit(&mut child.0, Duration::from_secs(30)).success());
    let owner = std::fs::metadata(data.join("admin.token")).unwrap().uid();
    assert_ne!(owner, 0, "the data belongs to the service's user");
    assert_eq!(std::fs::metadata(data.join("metrics.token")).unwrap().permissions().mode() & 0o777, 0o640);
    assert_eq!(std::fs::metadata(data.join("tls/cert.pem")).unwrap().permissions().mode() & 0o777, 0o644);
    // The rest is the service's alone, whatever umask it was started with (here the test's).
    let mut store = vec![data.join("store")];
    while let Some(path) = store.pop() {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o077, 0, "{} is open to others", path.display());
        if meta.is_dir() {
            store.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();

    // An upgrade to a newer version keeps the data and the operator's configuration.
    let config = target.join("etc/vla-appliance/appliance.toml");
    let edited = format!("{}\n# edited by the operator\n", std::fs::read_to_string(&config).unwrap());
    std::fs::write(&config, &edited).unwrap();
    let version = std::fs::read_to_string(tree.join("VERSION")).unwrap();
    std::fs::write(tree.join("VERSION"), format!("{}+1\n", version.trim())).unwrap();
    let built = build_deb(&tree, &out);
    let newer = PathBuf::from(built.trim().strip_prefix("deb: ").unwrap().split(" (").next().unwrap());
    assert_ne!(newer, deb);
    std::fs::remove_file(&deb).unwrap();
    link_or_copy(&newer, &target.join("tmp/vla-appliance-newer.deb"));
    dpkg(&["-i", "/tmp/vla-appliance-newer.deb"]);
    std::fs::remove_file(target.join("tmp/vla-appliance-newer.deb")).unwrap();
    std::fs::remove_file(&newer).unwrap();
    let status = dpkg(&["-s", "vla-appliance"]);
    assert!(status.contains(&format!("Version: {}+1", version.trim())), "{status}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(std::fs::read_to_string(data.join("admin.token")).unwrap(), token);
    // Removal keeps them too; purge deletes both.
    dpkg(&["-r", "vla-appliance"]);
    assert!(!target.join("opt/vla-appliance/bin/appliance").exists());
    assert_eq!(std::fs::read_to_string(data.join("admin.token")).unwrap(), token);
    assert!(data.join("store").exists() && config.exists());
    dpkg(&["-P", "vla-appliance"]);
    assert!(!data.exists() && !target.join("etc/vla-appliance").exists());
}

/// Removes the working container, the images and the build's untagged layers (`--layers`,
/// what a failed build leaves) of the image test, whatever happens. `base` goes last.
struct Podman {
    base: String,
    images: Vec<String>,
    container: Option<String>,
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = Command::new("buildah").args(["rm", c]).output();
        }
        let since = format!("since={}", self.base);
        let layers = Command::new("podman")
            .args(["images", "--all", "--quiet", "--filter", &since, "--filter", "dangling=true"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_string).collect())
            .unwrap_or_else(|_| Vec::new());
        for image in self.images.iter().chain(&layers).chain([&self.base]) {
            let _ = Command::new("podman").args(["rmi", "--force", image]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_on_a_debootstrapped_base_and_its_filesystem_serves_an_inference() {
    let base_root = debian_root();
    let _gigabytes = gigabytes().await;
    let scratch = Scratch::new("image");
    let out = scratch.0.clone();
    let pid = std::process::id();
    let (base, cpu, cuda) = (
        format!("localhost/vla-test-base:{pid}"),
        format!("localhost/vla-appliance:test-{pid}"),
        format!("localhost/vla-appliance:test-{pid}-cuda"),
    );
    let mut podman = Podman { base: base.clone(), images: vec![cpu.clone(), cuda.clone()], container: None };
    // The base: the debootstrapped root as an image (no registry is reachable here).
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("tar -C '{}' --exclude=./.complete -c . | podman import - {base}", base_root.display())));
    // The build context is package.sh's output directory.
    package(&out);
    for (target, tag) in [("cpu", &cpu), ("cuda", &cuda)] {
        run(Command::new("buildah")
            .args(["bud", "--format", "docker", "--isolation", "chroot", "--layers", "--target", target])
            .args(["--build-arg", &format!("BASE={base}"), "--build-arg", "VERSION=test"])
            .arg("-f")
            .arg(root().join("images/Containerfile"))
            .args(["-t", tag])
            .arg(&out));
    }
    let inspect: serde_json::Value =
        serde_json::from_str(&run(Command::new("podman").args(["image", "inspect", &cpu]))).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "10001:10001", "{config}");
    assert!(config["ExposedPorts"].get("8443/tcp").is_some(), "{config}");
    assert!(config["Volumes"].get("/var/lib/vla-appliance").is_some(), "{config}");
    assert_eq!(config["Labels"]["org.opencontainers.image.title"], "vla-appliance");
    assert_eq!(config["Labels"]["org.opencontainers.image.version"], "test");
    let healthcheck: Vec<String> =
        serde_json::from_value(inspect[0]["Healthcheck"]["Test"].clone()).unwrap_or_else(|_| panic!("{}", inspect[0]));
    assert_eq!(healthcheck[0], "CMD");
    assert!(healthcheck.iter().any(|a| a == "health"), "{healthcheck:?}");
    let cuda_env: serde_json::Value =
        serde_json::from_str(&run(Command::new("podman").args(["image", "inspect", &cuda]))).unwrap();
    let env = cuda_env[0]["Config"]["Env"].to_string();
    assert!(env.contains("NVIDIA_VISIBLE_DEVICES=all"), "{env}");

    // The image's filesystem, mounted (what `podman export` would write out), runs the
    // appliance as the image's user with the image's entrypoint configuration.
    let container =
        run(Command::new("buildah").args(["from", "--name", &format!("vla-test-{pid}"), &cpu])).trim().to_string();
    podman.container = Some(container.clone());
    let rootfs = PathBuf::from(run(Command::new("buildah").args(["mount", &container])).trim());
    assert!(rootfs.join("opt/vla-appliance/bin/appliance").exists());
    let mut child = chroot_appliance(&rootfs, "10001:10001");
    let addr = serving(&mut child.0);
    // The image's HEALTHCHECK, run as it would be (with the port this test serves on).
    assert_eq!(chroot_health(&rootfs, "10001:10001", &healthcheck[1..].join(" "), addr)["status"], "ok");
    one_inference(addr, &rootfs.join("var/lib/vla-appliance")).await;
    sigterm(&child.0);
    assert!(wait_exit(&mut child.0, Duration::from_secs(30)).success());
}

#[test]
fn the_compose_stack_and_the_kubernetes_manifests_validate() {
    let python = root().join(".venv-clients/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh", python.display());
    let scratch = tempfile::tempdir().unwrap();
    let out = run(Command::new(&python)
        .arg(root().join("appliance/tests/manifests_check.py"))
        .arg(root())
        .arg(env!("CARGO_BIN_EXE_appliance"))
        .arg(scratch.path()));
    eprintln!("{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 5, "{out}");
}
