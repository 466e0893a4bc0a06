//! Test harness: a real appliance on 127.0.0.1:<ephemeral> with real TLS and real libtorch,
//! and a real HTTPS client that trusts the appliance's certificate.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use appliance::Config;
use base64::Engine;
use image::{ImageBuffer, ImageFormat, Rgb};
use tokio::sync::oneshot;
use vla_api::InferenceRequest;

/// The demo model, generated once per test binary and copied into each test's repository.
pub fn demo_model_pt() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        appliance::demo::generate(dir.path()).unwrap();
        dir
    });
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| dir.path().join(appliance::demo::NAME).join("model.pt"))
}

/// An exported model directory under `models/build` (tiny-pi, tiny-pi-ts).
pub fn built_model(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/build").join(name);
    assert!(
        dir.join("model.toml").exists(),
        "{} is missing: scripts/setup.sh exports it (models/export.py models/tiny_pi.py models/build)",
        dir.display()
    );
    dir
}

/// Copies the exported model `name` into `<repo>/<name>` (its files, not its reference.json).
pub fn add_built_model(repo: &Path, name: &str) {
    let to = repo.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in std::fs::read_dir(built_model(name)).unwrap() {
        let file = file.unwrap();
        if file.file_name() != "reference.json" && file.file_type().unwrap().is_file() {
            std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
        }
    }
}

/// The Python of the project's venv (torch, tritonclient; scripts/setup.sh installs it).
pub fn venv_python() -> PathBuf {
    venv("../.venv/bin/python")
}

/// The robots' clients' venv (openpi-client, which pins numpy < 2, tritonclient.grpc and
/// clients/python; scripts/setup.sh installs it).
pub fn client_python() -> PathBuf {
    venv("../.venv-clients/bin/python")
}

fn venv(relative: &str) -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    assert!(python.exists(), "{} is missing: scripts/setup.sh installs it", python.display());
    python
}

/// Writes a model directory `<repo>/<name>` with the demo weights and `model_toml`.
pub fn add_model(repo: &Path, name: &str, model_toml: &str) {
    let dir = repo.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(demo_model_pt(), dir.join("model.pt")).unwrap();
    std::fs::write(dir.join("model.toml"), model_toml).unwrap();
}

pub struct TestAppliance {
    pub addr: std::net::SocketAddr,
    pub data: tempfile::TempDir,
    /// An HTTPS client with no credentials; see [`TestAppliance::admin`] and
    /// [`TestAppliance::robot_key`].
    pub client: reqwest::Client,
    /// The admin token the appliance generated into its data directory.
    pub admin_token: String,
    keys: tokio::sync::Mutex<std::collections::HashMap<String, String>>,
    shutdown: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    config: Config,
    task: Option<tokio::task::JoinHandle<Result<(), appliance::RunError>>>,
}

/// A configuration for tests: ephemeral port, temporary data directory, one libtorch thread
/// per executor (tests run side by side on few cores).
pub fn test_config(data: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.data.dir = data.to_path_buf();
    config.models.cpu_threads = 1;
    config.server.shutdown_grace_ms = 10_000;
    config.auth.demo_robot = false;
    // Tests install the policies they need (see `policy_path`).
    config.policy.preload.clear();
    config
}

/// A built policy component: `policies/dist/<name>.wasm` (shipped) or
/// `policies/dist/fixtures/<name>.wasm` (hostile test fixtures), built by scripts/setup.sh.
pub fn policy_path(name: &str) -> PathBuf {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/dist");
    let path = [dist.join(format!("{name}.wasm")), dist.join(format!("fixtures/{name}.wasm"))]
        .into_iter()
        .find(|p| p.exists());
    path.unwrap_or_else(|| panic!("no built policy `{name}` under {}: run policies/build.sh", dist.display()))
}

/// A `policy.preload` entry for the built policy `name`.
pub fn preload(name: &str, world: &str, order: i64, config: serde_json::Value) -> appliance::config::PreloadPolicy {
    appliance::config::PreloadPolicy {
        name: name.into(),
        world: world.into(),
        path: policy_path(name),
        order,
        mode: "enforce".into(),
        config: config.as_object().cloned().unwrap_or_default(),
    }
}

impl TestAppliance {
    /// Starts with the demo model (copied, not regenerated) unless `setup` fills the repository.
    pub async fn start(setup: impl FnOnce(&mut Config, &Path)) -> TestAppliance {
        let data = tempfile::tempdir().unwrap();
        let mut config = test_config(data.path());
        let repo = config.model_repository();
        std::fs::create_dir_all(&repo).unwrap();
        setup(&mut config, &repo);
        if std::fs::read_dir(&repo).unwrap().next().is_none() {
            add_model(&repo, "tiny-vla", appliance::demo::MODEL_TOML);
        }
        Self::start_with(config, data).await
    }

    /// Starts and waits until the appliance answers `/health` with a model serving.
    pub async fn start_with(config: Config, data: tempfile::TempDir) -> TestAppliance {
        let (app, status, body) = Self::launch(config, data).await;
        assert_ne!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "no model serving: {body}");
        app
    }

    /// Starts and waits for the first answer of `/health`, whatever it is.
    pub async fn launch(config: Config, data: tempfile::TempDir) -> (TestAppliance, reqwest::StatusCode, String) {
        config.validate().unwrap();
        let listener = tokio::net::TcpListener::bind(config.server.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let cert_path = config.tls.cert.clone().unwrap_or_else(|| config.data.dir.join("tls/cert.pem"));
        let token_file = config.admin_token_file();
        let kept = config.clone();
        let task = tokio::spawn(appliance::run(config, listener, async {
            let _ = rx.await;
        }));
        // The certificate exists before the listener serves; then wait for the models.
        let start = Instant::now();
        while !cert_path.exists() {
            assert!(start.elapsed() < Duration::from_secs(30), "no certificate at {}", cert_path.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = https_client(&cert_path, addr);
        let mut app = TestAppliance {
            addr,
            data,
            client,
            admin_token: String::new(),
            keys: Default::default(),
            shutdown: std::sync::Mutex::new(Some(tx)),
            config: kept,
            task: Some(task),
        };
        // Models load before the listener serves, so the first answer is the final word.
        loop {
            if let Ok(r) = app.client.get(app.url("/health")).send().await {
                let status = r.status();
                let body = r.text().await.unwrap();
                // The token is written before the listener serves.
                app.admin_token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
                return (app, status, body);
            }
            if app.task.as_ref().is_some_and(|t| t.is_finished()) {
                let stopped = app.task.take().unwrap().await;
                panic!("the appliance stopped before serving: {stopped:?}");
            }
            // Generous: eleven appliances warming up at once on two cores (tests/models.rs).
            assert!(start.elapsed() < Duration::from_secs(300), "appliance did not answer /health");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// A request with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(&self.admin_token)
    }

    /// Registers `robot_id` (type `ur5e`, priority class `high`) through the admin API.
    pub async fn register(&self, robot_id: &str, priority: &str) -> vla_api::RobotKey {
        let response = self
            .admin(reqwest::Method::POST, "/admin/robots")
            .json(&serde_json::json!({"robot_id": robot_id, "robot_type": "ur5e", "priority": priority}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::CREATED, "{}", response.text().await.unwrap());
        response.json().await.unwrap()
    }

    /// Registers `robot_id` (type `ur5e`, class `high`) in `group` and remembers its key.
    pub async fn register_in(&self, robot_id: &str, group: &str) {
        let response = self
            .admin(reqwest::Method::POST, "/admin/robots")
            .json(&serde_json::json!({"robot_id": robot_id, "robot_type": "ur5e", "priority": "high", "group": group}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::CREATED, "{}", response.text().await.unwrap());
        let key: vla_api::RobotKey = response.json().await.unwrap();
        self.keys.lock().await.insert(robot_id.to_string(), key.api_key);
    }

    /// The API key of `robot_id`, registering it (class `high`) the first time.
    pub async fn robot_key(&self, robot_id: &str) -> String {
        let mut keys = self.keys.lock().await;
        if let Some(key) = keys.get(robot_id) {
            return key.clone();
        }
        let key = self.register(robot_id, "high").await.api_key;
        keys.insert(robot_id.to_string(), key.clone());
        key
    }

    /// A request carrying `robot_id`'s key.
    pub async fn as_robot(&self, robot_id: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let key = self.robot_key(robot_id).await;
        self.client.request(method, self.url(path)).header("x-api-key", key)
    }

    /// `POST /v1/inference` with the key of the request's robot.
    pub async fn infer(&self, request: InferenceRequest) -> reqwest::Response {
        self.as_robot(&request.robot_id, reqwest::Method::POST, "/v1/inference")
            .await
            .json(&request)
            .send()
            .await
            .unwrap()
    }

    pub async fn stats(&self, model: &str) -> vla_api::ModelStats {
        let list: vla_api::ModelList =
            self.admin(reqwest::Method::GET, "/v1/models").send().await.unwrap().json().await.unwrap();
        list.models.into_iter().find(|m| m.name == model).unwrap().stats
    }

    /// Signals shutdown (as SIGTERM would) without waiting.
    pub fn signal_shutdown(&self) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    /// Stops and starts again on the same data directory and configuration (a new port).
    pub async fn restart(self) -> TestAppliance {
        self.restart_with(|_| {}).await
    }

    /// Stops and starts again on the same data directory, the configuration changed by `tune`.
    pub async fn restart_with(mut self, tune: impl FnOnce(&mut Config)) -> TestAppliance {
        self.signal_shutdown();
        self.task.take().unwrap().await.unwrap().unwrap();
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().unwrap());
        let mut config = self.config.clone();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        tune(&mut config);
        drop(self);
        Self::start_with(config, data).await
    }

    /// `POST /admin/policies` with the built component `component` and these text fields.
    pub async fn upload_policy(&self, component: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        let bytes = std::fs::read(policy_path(component)).unwrap();
        self.upload_policy_bytes(bytes, fields).await
    }

    pub async fn upload_policy_bytes(&self, bytes: Vec<u8>, fields: &[(&str, &str)]) -> reqwest::Response {
        let mut form = reqwest::multipart::Form::new()
            .part("component", reqwest::multipart::Part::bytes(bytes).file_name("policy.wasm"));
        for (name, value) in fields {
            form = form.text(name.to_string(), value.to_string());
        }
        self.admin(reqwest::Method::POST, "/admin/policies").multipart(form).send().await.unwrap()
    }

    /// Stops, handing back the data directory (to work on the store offline).
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.signal_shutdown();
        self.task.take().unwrap().await.unwrap().unwrap();
        std::mem::replace(&mut self.data, tempfile::tempdir().unwrap())
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), appliance::RunError> {
        self.signal_shutdown();
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestAppliance {
    fn drop(&mut self) {
        self.signal_shutdown();
    }
}

/// The real appliance binary as a child process, started on a configuration file.
pub struct ChildAppliance {
    pub child: std::process::Child,
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
    pub addr: std::net::SocketAddr,
}

/// The real `appliance` binary with `--config config`.
pub fn appliance_binary(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_appliance"));
    cmd.arg("--config").arg(config).env("APPLIANCE_LOG", "info");
    cmd
}

impl ChildAppliance {
    /// Starts the binary and waits for it to serve (its log names the address).
    pub fn start(config: &Path, data: &Path) -> ChildAppliance {
        let mut child = appliance_binary(config).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if !sent && let Some(at) = line.find("serving on https://") {
                    let addr = line[at + "serving on https://".len()..].split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let addr: std::net::SocketAddr =
            rx.recv_timeout(Duration::from_secs(120)).expect("the appliance serves").parse().unwrap();
        let client = https_client(&data.join("tls/cert.pem"), addr);
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
        ChildAppliance { child, client, base: format!("https://localhost:{}", addr.port()), token, addr }
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    pub async fn register(&self, robot: &str) -> String {
        let r = self
            .admin(reqwest::Method::POST, "/admin/robots")
            .json(&serde_json::json!({"robot_id": robot, "robot_type": "ur5e"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        r.json::<vla_api::RobotKey>().await.unwrap().api_key
    }

    pub async fn infer(&self, robot: &str, key: &str) -> Result<reqwest::Response, reqwest::Error> {
        let mut request = robot_request(1);
        request.robot_id = robot.into();
        self.client.post(format!("{}/v1/inference", self.base)).header("x-api-key", key).json(&request).send().await
    }

    pub async fn quota(&self, robot: &str) -> vla_api::RobotQuota {
        self.admin(reqwest::Method::GET, &format!("/admin/quotas/{robot}")).send().await.unwrap().json().await.unwrap()
    }

    /// SIGKILL: no shutdown, no flush, nothing.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ChildAppliance {
    /// A test that fails must not leave the appliance running (holding the test's output).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTPS client that trusts exactly `cert` and reaches `localhost` at `addr`.
pub fn https_client(cert: &Path, addr: std::net::SocketAddr) -> reqwest::Client {
    let pem = std::fs::read(cert).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A camera-like JPEG: a gradient tinted by `seed`.
pub fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, seed.wrapping_mul(37).wrapping_add((x ^ y) as u8)])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg).unwrap();
    out
}

pub fn png(width: u32, height: u32) -> Vec<u8> {
    let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_pixel(width, height, Rgb([10, 20, 30]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A valid robot request; `seed` varies the image, instruction and state.
pub fn robot_request(seed: u8) -> InferenceRequest {
    InferenceRequest {
        robot_id: format!("arm-{seed}"),
        robot_type: Some("ur5e".into()),
        model: None,
        instruction: format!("pick up the red block number {seed}"),
        image: Some(b64(&jpeg(320, 240, seed))),
        state: (0..7).map(|i| f32::from(seed) * 0.01 + i as f32 * 0.1).collect(),
        ..InferenceRequest::default()
    }
}
