//! The appliance under test, in a process of its own (`bench serve`, which runs the
//! appliance's own `appliance::run`), so that its CPU time and the load generator's are told
//! apart and neither shares an async runtime with the other.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use vla_api::{QuotaLimits, RegisterRobot, RobotKey};

/// How the appliance is set up for a run.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub name: String,
    /// Dynamic batching (the demo model's settings) or one request per forward.
    pub batching: bool,
    /// The four shipped policies preloaded (rate-limit, instruction-filter, joint-limits,
    /// workspace-bounds), or none.
    pub policies: bool,
    /// `quota.durability`: `sync` or `interval:<ms>`.
    pub durability: String,
    /// libtorch threads and the largest batch set (`models.cpu_threads` and the model's
    /// `max_batch_size`) instead of measured at warm-up: what another instance measured, so
    /// that two instances differ only in what their variants say.
    pub pinned: Option<Pinned>,
}

/// Threads and batch cap given to an instance (see [`Variant::pinned`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    pub threads: usize,
    pub largest_batch: usize,
}

impl Pinned {
    /// What an instance measured at warm-up (`/v1/models`), to give its twin; `None` when it
    /// measured nothing (`models.cpu_threads` set, or a GPU).
    pub fn measured(m: &vla_api::CpuThreads) -> Option<Pinned> {
        Some(Pinned { threads: m.threads, largest_batch: m.largest_batch? })
    }
}

impl Variant {
    /// The appliance as shipped: batching on, the shipped policies, `sync` quotas.
    pub fn standard() -> Variant {
        Variant { name: "standard".into(), batching: true, policies: true, durability: "sync".into(), pinned: None }
    }

    pub fn describe(&self) -> String {
        let pinned = self.pinned.map_or(String::new(), |p| {
            format!(", {} libtorch threads and batches of {} at most (pinned)", p.threads, p.largest_batch)
        });
        format!(
            "batching {}, {}, quota durability {}{pinned}",
            if self.batching { "on" } else { "off" },
            if self.policies { "shipped policies" } else { "no policies" },
            self.durability
        )
    }
}

/// A running appliance with `robots` registered robots (`bench-000`, …).
#[derive(Debug)]
pub struct Appliance {
    child: Child,
    stdin: Option<ChildStdin>,
    pub addr: SocketAddr,
    /// The appliance's self-signed certificate, which the robots trust.
    pub ca: PathBuf,
    /// `(robot_id, api_key)` of each registered robot.
    pub robots: Vec<(String, String)>,
    data: tempfile::TempDir,
}

/// Robot ids the benchmark registers.
pub fn robot_id(i: usize) -> String {
    format!("bench-{i:03}")
}

impl Appliance {
    /// Starts `exe serve` (this binary) on 127.0.0.1 with a fresh data directory holding the
    /// model in `model_dir` set up as `variant` says, waits until it is ready and registers
    /// `robots` robots, the model on `device` (`auto`, `cpu`, `cuda:N`). Their rate quota is raised so that the limit is not what is measured;
    /// the quota path (charges, durability) still runs for every request.
    /// Its log (warnings and errors, or `APPLIANCE_LOG`) goes to `log`.
    pub async fn start(
        exe: &Path,
        variant: &Variant,
        model_dir: &Path,
        device: &str,
        robots: usize,
        log: &Path,
    ) -> anyhow::Result<Appliance> {
        let data = tempfile::tempdir()?;
        let mut config = appliance::Config::default();
        config.server.listen = "127.0.0.1:0".parse()?;
        config.server.shutdown_grace_ms = 5_000;
        config.data.dir = data.path().to_path_buf();
        config.auth.demo_robot = false;
        config.quota.durability = variant.durability.clone();
        if let Some(pinned) = variant.pinned {
            config.models.cpu_threads = pinned.threads;
        }
        // As with the quotas below: a session's message rate is not what is measured.
        config.server.websocket_messages_per_s = 1_000_000;
        if variant.policies {
            for p in &mut config.policy.preload {
                p.path = std::path::absolute(&p.path)?;
                if !p.path.exists() {
                    bail!(
                        "{} is missing: run the suite from the repository root, after policies/build.sh",
                        p.path.display()
                    );
                }
            }
        } else {
            config.policy.preload.clear();
        }
        for i in 0..robots {
            let unlimited =
                QuotaLimits { rate: Some("1000000/s".into()), burst: Some(1_000_000), ..Default::default() };
            config.quota.robots.insert(robot_id(i), unlimited);
        }
        let name = model_dir.file_name().context("the model directory's name")?;
        let repo = config.model_repository().join(name);
        std::fs::create_dir_all(&repo)?;
        for file in std::fs::read_dir(model_dir)? {
            let file = file?;
            if file.file_type()?.is_file() {
                std::fs::copy(file.path(), repo.join(file.file_name()))?;
            }
        }
        // The model's own settings but a queue that holds every client of the sweep, on `device`.
        let toml_path = repo.join("model.toml");
        let mut model_toml: toml::Table = std::fs::read_to_string(&toml_path)?.parse()?;
        let batching = model_toml.entry("batching").or_insert_with(|| toml::Table::new().into());
        let batching = batching.as_table_mut().context("[batching] in model.toml")?;
        batching.insert("enabled".into(), variant.batching.into());
        batching.insert("queue_capacity".into(), 1024.into());
        if let Some(pinned) = variant.pinned {
            // As the measured cap does: the sizes above it are never formed.
            let cap = pinned.largest_batch as i64;
            if let Some(toml::Value::Array(sizes)) = batching.get_mut("preferred_batch_sizes") {
                sizes.retain(|s| s.as_integer().is_some_and(|s| s <= cap));
            }
            model_toml.insert("max_batch_size".into(), cap.into());
        }
        model_toml.insert("device".into(), device.into());
        std::fs::write(&toml_path, toml::to_string(&model_toml)?)?;
        let config_path = data.path().join("appliance.toml");
        std::fs::write(&config_path, toml::to_string(&config).context("writing the appliance's configuration")?)?;

        let mut child = std::process::Command::new(exe)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("APPLIANCE_LOG", std::env::var("APPLIANCE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("the appliance's stdout")?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = match tokio::time::timeout(Duration::from_secs(120), line).await {
            Ok(line) => line??,
            Err(_) => String::new(),
        };
        let Some(addr) = line.trim().strip_prefix("listening ").and_then(|a| a.parse().ok()) else {
            let _ = child.kill();
            bail!("the appliance did not start (it said {line:?}); see {}", log.display());
        };
        let mut appliance =
            Appliance { child, stdin, addr, ca: data.path().join("tls/cert.pem"), robots: Vec::new(), data };
        appliance.wait_ready().await?;
        appliance.register(robots).await?;
        Ok(appliance)
    }

    /// The libtorch threads `/v1/models` reports for `model`.
    pub async fn cpu_threads(&self, model: &str) -> Option<vla_api::CpuThreads> {
        let list: vla_api::ModelList =
            self.admin(reqwest::Method::GET, "/v1/models").ok()?.send().await.ok()?.json().await.ok()?;
        list.models.into_iter().find(|m| m.name == model)?.cpu_threads
    }

    /// The appliance's certificate, for clients to trust.
    pub fn certificate(&self) -> anyhow::Result<reqwest::Certificate> {
        let pem = std::fs::read(&self.ca).with_context(|| format!("reading {}", self.ca.display()))?;
        Ok(reqwest::Certificate::from_pem(&pem)?)
    }

    fn admin_client(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .add_root_certificate(self.certificate()?)
            .resolve("localhost", self.addr)
            .timeout(Duration::from_secs(30))
            .build()?)
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(180);
        loop {
            // The certificate is generated as the appliance starts.
            if let Ok(client) = self.admin_client()
                && let Ok(r) = client.get(self.url("/health")).send().await
                && let Ok(health) = r.json::<vla_api::Health>().await
                && health.status == "ok"
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the appliance exited ({status}) before it was ready; see its log");
            }
            if Instant::now() > until {
                bail!("the appliance was not ready after 180 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn register(&mut self, robots: usize) -> anyhow::Result<()> {
        let token_file = self.data.path().join("admin.token");
        let token =
            std::fs::read_to_string(&token_file).with_context(|| format!("reading {}", token_file.display()))?;
        let client = self.admin_client()?;
        for i in 0..robots {
            let request = RegisterRobot {
                robot_id: robot_id(i),
                robot_type: "arm".into(),
                group: "bench".into(),
                priority: vla_api::Priority::Normal,
            };
            let response =
                client.post(self.url("/admin/robots")).bearer_auth(token.trim()).json(&request).send().await?;
            let status = response.status();
            if !status.is_success() {
                bail!("registering {}: {status} {}", request.robot_id, response.text().await.unwrap_or_default());
            }
            let key: RobotKey = response.json().await?;
            self.robots.push((key.robot.robot_id, key.api_key));
        }
        Ok(())
    }

    /// The appliance's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A request with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        let token_file = self.data.path().join("admin.token");
        let token =
            std::fs::read_to_string(&token_file).with_context(|| format!("reading {}", token_file.display()))?;
        Ok(self.admin_client()?.request(method, self.url(path)).bearer_auth(token.trim()))
    }

    /// CPU time the appliance has used so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        crate::machine::cpu_seconds(Some(self.child.id()))
    }

    /// Asks the appliance to stop (closing its stdin, as `serve` expects) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the appliance exited with {status}; see its log");
                }
                return Ok(());
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                bail!("the appliance did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
