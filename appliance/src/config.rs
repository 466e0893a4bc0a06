//! Configuration: one typed tree, built once at start and validated before any port is bound.
//!
//! Sources, later ones winning: built-in defaults < `appliance.toml` (path given by the binary's
//! `--config` flag) < `APPLIANCE_*` environment variables, with `__` separating levels
//! (`APPLIANCE_SERVER__LISTEN=0.0.0.0:9443` sets `server.listen`). The library only receives
//! the finished [`Config`]; reading files and the environment is the binary's job.
//!
//! This is the tree's root: the sections of the policy stage and of the quota store live with
//! them (`policy/config.rs`, `quota/config.rs`), each with its own checks, which
//! [`Config::validate`] calls; they are re-exported here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::policy::config::{PolicyConfig, PreloadPolicy};
pub use crate::quota::config::QuotaConfig;

/// The whole configuration tree. Every key is documented in the README's table of keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub data: DataConfig,
    pub models: ModelsConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub policy: PolicyConfig,
    pub quota: QuotaConfig,
    pub metrics: MetricsConfig,
}

/// `/metrics` and telemetry ([`crate::metrics`], [`crate::gpu`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` to anyone; otherwise (default) it needs the metrics token (or the
    /// admin token) as `Authorization: Bearer`.
    pub public: bool,
    /// File holding the metrics token, generated (mode 0600) on first start; relative paths
    /// are under `data.dir`. Give it to the cell's Prometheus (`bearer_token_file`).
    pub token_file: PathBuf,
    /// How often the GPU monitor polls NVML.
    pub gpu_poll_interval_ms: u64,
    /// Also serve `/metrics` over plain HTTP, without a token, on this loopback address (for
    /// a Prometheus on the box itself). Off by default; a non-loopback address is refused.
    pub listen_http: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            public: false,
            token_file: PathBuf::from("metrics.token"),
            gpu_poll_interval_ms: 5_000,
            listen_http: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTPS listener binds.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes (413 above it).
    pub body_limit_bytes: usize,
    /// Largest body of an admin JSON request (robots, policy patches, quotas), in bytes.
    pub admin_body_limit_bytes: usize,
    /// From accept until the first request's headers are complete, TLS handshake (and HTTP/2
    /// preface) included; and each later request's headers on HTTP/1.1. Slower: closed.
    pub tls_handshake_timeout_ms: u64,
    /// How long a request body may take to arrive (408 after it).
    pub read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout_ms: u64,
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// Open connections from one peer address at most.
    pub max_connections_per_peer: usize,
    /// Concurrent requests (streams) on one HTTP/2 connection.
    pub http2_max_streams: u32,
    /// Largest request header section, in bytes (HTTP/1.1 buffer and HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Requests being handled at once; more get 503 `overloaded` at once.
    pub max_in_flight: usize,
    /// How much of a refused request's body (unauthenticated, unknown route) is read (and
    /// discarded, never kept) before the answer; a larger or slower body is not read and its
    /// HTTP/1.1 connection is closed after the answer.
    pub refused_body_bytes: usize,
    /// On SIGTERM/Ctrl-C: how long in-flight requests get to finish before connections close.
    pub shutdown_grace_ms: u64,
    /// openpi WebSocket sessions open at once (`GET /openpi/{model}`); one more is refused
    /// with 503 before the upgrade. gRPC `ModelStreamInfer` streams are bounded the same, apart.
    pub websocket_max_sessions: usize,
    /// openpi sessions (and gRPC streams) of one robot at once (429 `too_many_sessions` above).
    pub websocket_sessions_per_robot: usize,
    /// Observations one session (or requests one gRPC stream) may send per second; faster ones
    /// are answered with an error, not computed.
    pub websocket_messages_per_s: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// TLS is on unless explicitly turned off (plain HTTP is for debugging only).
    pub enabled: bool,
    /// PEM certificate chain. With `key`, used as given; without both, a self-signed
    /// certificate is generated once into `<data.dir>/tls/`.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Names and IP addresses the self-signed certificate is issued for.
    pub self_signed_names: Vec<String>,
    /// PEM CA certificate(s) that sign robots' client certificates; enables mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `optional` (robots may use a certificate or an API key) or
    /// `required` (robots must use a certificate; API keys are refused for robots).
    pub client_auth: ClientAuth,
    /// Client certificate name (subject CN or DNS/URI SAN) → registered `robot_id`.
    pub client_names: BTreeMap<String, String>,
    /// How often certificate, key and client CA files are checked for changes, which are then
    /// loaded without a restart; 0 turns the watch off.
    pub reload_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Optional,
    Required,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory for the appliance's state: generated certificate, demo model, later the store.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Model repository: `<repository>/<name>/model.toml` + `model.pt`.
    /// Relative paths are taken from `data.dir`; absent means `<data.dir>/models`.
    pub repository: Option<PathBuf>,
    /// Generate the `tiny-vla` demo model into an empty repository.
    pub demo: bool,
    /// Model used when a request names none; absent means the only model, or `tiny-vla`.
    pub default_model: Option<String>,
    /// libtorch intra-op threads per executor on CPU; 0: measured at warm-up, the fastest for
    /// this machine and model by the rule in [`crate::threads`].
    pub cpu_threads: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest decoded image file accepted, in bytes.
    pub max_image_bytes: usize,
    /// Largest image accepted, in pixels (width × height); guards against decompression bombs.
    pub max_image_pixels: u64,
    /// Longest instruction accepted, in UTF-8 bytes.
    pub max_instruction_bytes: usize,
    /// Largest `deadline_ms` a request may ask for.
    pub max_deadline_ms: u64,
    /// Requests one robot may have in flight at once; more get 429 `too_many_in_flight`.
    pub max_in_flight_per_robot: usize,
    /// CPU slots for request work on the blocking pool (parsing large bodies, decoding
    /// images, large answers); 0: one per core (the work is CPU-bound).
    pub cpu_slots: usize,
    /// Of those, the most one robot holds at once; 0: all but one (at least one), so another
    /// robot always finds one free.
    pub cpu_slots_per_robot: usize,
    /// Pixels being decoded at once, across all requests (each frame holds its width × height
    /// until its tensor is made); at least `max_image_pixels`.
    pub max_decode_pixels: u64,
    /// Instructions that are a robot's stop (matched whole, trimmed, ignoring case): never
    /// refused by a full queue (they evict a less urgent request instead) and served first.
    pub stop_instructions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the admin token; generated (mode 0600) on first start. Relative paths are
    /// under `data.dir`.
    pub admin_token_file: PathBuf,
    /// On a first start with no robots registered, register the demo robot `demo-arm` and
    /// write its key to `<data.dir>/demo-robot.key` (mode 0600).
    pub demo_robot: bool,
    /// Admin changes kept in the change trail (`GET /admin/changes`); the oldest are dropped.
    pub changes_retention: u64,
    /// Robots declared in a file (ids, types and key hashes; see `appliance robot-key`),
    /// applied to the registry at start: for fleets provisioned by GitOps. Relative paths are
    /// under `data.dir`.
    pub robots_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            body_limit_bytes: 8 * 1024 * 1024,
            admin_body_limit_bytes: 1024 * 1024,
            tls_handshake_timeout_ms: 10_000,
            read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 1024,
            max_connections_per_peer: 128,
            http2_max_streams: 64,
            max_header_bytes: 16 * 1024,
            max_in_flight: 512,
            refused_body_bytes: 1024 * 1024,
            shutdown_grace_ms: 30_000,
            websocket_max_sessions: 256,
            websocket_sessions_per_robot: 4,
            websocket_messages_per_s: 100,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            cert: None,
            key: None,
            self_signed_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            client_ca: None,
            client_auth: ClientAuth::Optional,
            client_names: BTreeMap::new(),
            reload_interval_ms: 2_000,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { dir: PathBuf::from("data") }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig { repository: None, demo: true, default_model: None, cpu_threads: 0 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_image_bytes: 4 * 1024 * 1024,
            max_image_pixels: 4096 * 4096,
            max_instruction_bytes: 1024,
            max_deadline_ms: 60_000,
            max_in_flight_per_robot: 8,
            cpu_slots: 0,
            cpu_slots_per_robot: 0,
            max_decode_pixels: 64 * 1024 * 1024,
            stop_instructions: vec!["stop".into(), "halt".into(), "emergency stop".into()],
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token_file: PathBuf::from("admin.token"),
            demo_robot: true,
            changes_retention: 10_000,
            robots_file: None,
        }
    }
}

/// The longest deadline any request may have: a day.
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// A configuration key with a problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

impl LimitsConfig {
    /// Whether `instruction` is a stop: one of `stop_instructions`, whole, trimmed, any case.
    pub fn is_stop(&self, instruction: &str) -> bool {
        let instruction = instruction.trim();
        self.stop_instructions.iter().any(|s| s.trim().eq_ignore_ascii_case(instruction))
    }

    /// The CPU slots in all, and the most one robot holds (see the keys).
    pub fn cpu_slots(&self, cores: usize) -> (usize, usize) {
        let all = if self.cpu_slots == 0 { cores.max(1) } else { self.cpu_slots };
        let per_robot = if self.cpu_slots_per_robot == 0 {
            all.saturating_sub(1).max(1)
        } else {
            self.cpu_slots_per_robot.min(all)
        };
        (all, per_robot)
    }
}

impl Config {
    /// The sources in precedence order: defaults < `file` < `APPLIANCE_*` environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // APPLIANCE_LOG is the binary's log filter, not a configuration key.
        figment.merge(Env::prefixed("APPLIANCE_").ignore(&["log"]).split("__"))
    }

    /// Extracts and validates the tree from `figment`.
    pub fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    /// The model repository directory.
    pub fn model_repository(&self) -> PathBuf {
        match &self.models.repository {
            Some(path) if path.is_absolute() => path.clone(),
            Some(path) => self.data.dir.join(path),
            None => self.data.dir.join("models"),
        }
    }

    /// The metrics token file.
    pub fn metrics_token_file(&self) -> PathBuf {
        let path = &self.metrics.token_file;
        if path.is_absolute() { path.clone() } else { self.data.dir.join(path) }
    }

    /// The admin token file.
    pub fn admin_token_file(&self) -> PathBuf {
        let path = &self.auth.admin_token_file;
        if path.is_absolute() { path.clone() } else { self.data.dir.join(path) }
    }

    pub fn robots_file(&self) -> Option<PathBuf> {
        let path = self.auth.robots_file.as_ref()?;
        Some(if path.is_absolute() { path.clone() } else { self.data.dir.join(path) })
    }

    /// Checks what types alone cannot: ranges, pairs of keys, files that must exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key: key.into(), problem: problem.into() }
        }
        if self.server.body_limit_bytes < 1024 {
            return Err(invalid("server.body_limit_bytes", "must be at least 1024"));
        }
        if self.server.tls_handshake_timeout_ms == 0 {
            return Err(invalid("server.tls_handshake_timeout_ms", "must be greater than 0"));
        }
        if self.server.read_timeout_ms == 0 {
            return Err(invalid("server.read_timeout_ms", "must be greater than 0"));
        }
        let s = &self.server;
        if s.admin_body_limit_bytes < 1024 {
            return Err(invalid("server.admin_body_limit_bytes", "must be at least 1024"));
        }
        if !(1_000..=3_600_000).contains(&s.idle_timeout_ms) {
            return Err(invalid("server.idle_timeout_ms", "must be 1000-3600000"));
        }
        if s.max_connections == 0 || s.max_connections_per_peer == 0 {
            let key = if s.max_connections == 0 { "server.max_connections" } else { "server.max_connections_per_peer" };
            return Err(invalid(key, "must be greater than 0"));
        }
        if !(1..=1024).contains(&s.http2_max_streams) {
            return Err(invalid("server.http2_max_streams", "must be 1-1024"));
        }
        if !(4096..=1 << 20).contains(&s.max_header_bytes) {
            return Err(invalid("server.max_header_bytes", "must be 4096-1048576"));
        }
        if s.max_in_flight == 0 {
            return Err(invalid("server.max_in_flight", "must be greater than 0"));
        }
        if s.websocket_max_sessions == 0 || s.websocket_sessions_per_robot == 0 || s.websocket_messages_per_s == 0 {
            let key = if s.websocket_max_sessions == 0 {
                "server.websocket_max_sessions"
            } else if s.websocket_sessions_per_robot == 0 {
                "server.websocket_sessions_per_robot"
            } else {
                "server.websocket_messages_per_s"
            };
            return Err(invalid(key, "must be greater than 0"));
        }
        if let Some(path) = self.robots_file() {
            // Read again at start; checked here so that `--check-config` and a bad file both
            // name it before anything runs.
            crate::robots::read_robots_file(&path).map_err(|e| invalid("auth.robots_file", e.to_string()))?;
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return Err(invalid("tls.key", "must be set when tls.cert is set")),
            (None, Some(_)) => return Err(invalid("tls.cert", "must be set when tls.key is set")),
            (Some(cert), Some(key)) => {
                for (name, path) in [("tls.cert", cert), ("tls.key", key)] {
                    if !path.is_file() {
                        return Err(invalid(name, format!("no such file: {}", path.display())));
                    }
                }
            }
            (None, None) => {
                if self.tls.enabled && self.tls.self_signed_names.is_empty() {
                    return Err(invalid(
                        "tls.self_signed_names",
                        "must name at least one host when no certificate is configured",
                    ));
                }
            }
        }
        if self.data.dir.as_os_str().is_empty() {
            return Err(invalid("data.dir", "must not be empty"));
        }
        if let Some(name) = &self.models.default_model
            && name.is_empty()
        {
            return Err(invalid("models.default_model", "must not be empty"));
        }
        if self.models.cpu_threads > 1024 {
            return Err(invalid("models.cpu_threads", "must be at most 1024"));
        }
        if self.limits.max_image_bytes == 0 {
            return Err(invalid("limits.max_image_bytes", "must be greater than 0"));
        }
        if self.limits.max_image_pixels == 0 {
            return Err(invalid("limits.max_image_pixels", "must be greater than 0"));
        }
        let l = &self.limits;
        if l.max_in_flight_per_robot == 0 {
            return Err(invalid("limits.max_in_flight_per_robot", "must be greater than 0"));
        }
        if l.cpu_slots > 4096 || l.cpu_slots_per_robot > 4096 {
            let key = if l.cpu_slots > 4096 { "limits.cpu_slots" } else { "limits.cpu_slots_per_robot" };
            return Err(invalid(key, "must be at most 4096"));
        }
        if !(l.max_image_pixels..=u64::from(u32::MAX)).contains(&l.max_decode_pixels) {
            return Err(invalid(
                "limits.max_decode_pixels",
                format!("must be at least limits.max_image_pixels ({}) and at most {}", l.max_image_pixels, u32::MAX),
            ));
        }
        if !(1..=MAX_DEADLINE_MS).contains(&self.limits.max_deadline_ms) {
            return Err(invalid("limits.max_deadline_ms", format!("must be 1-{MAX_DEADLINE_MS} (a day)")));
        }
        if let Some(ca) = &self.tls.client_ca {
            if !self.tls.enabled {
                return Err(invalid("tls.client_ca", "needs tls.enabled = true"));
            }
            if !ca.is_file() {
                return Err(invalid("tls.client_ca", format!("no such file: {}", ca.display())));
            }
        } else if self.tls.client_auth == ClientAuth::Required {
            return Err(invalid("tls.client_auth", "`required` needs tls.client_ca"));
        }
        for (name, id) in &self.tls.client_names {
            if let Err(problem) = crate::names::check_robot_id(id) {
                return Err(invalid(&format!("tls.client_names.\"{name}\""), problem));
            }
        }
        if let Err((key, problem)) = crate::policy::config::check(&self.policy) {
            return Err(invalid(&format!("policy.{key}"), problem));
        }
        if let Err((key, problem)) = crate::quota::config::check(&self.quota) {
            return Err(invalid(&format!("quota.{key}"), problem));
        }
        if !(100..=3_600_000).contains(&self.metrics.gpu_poll_interval_ms) {
            return Err(invalid("metrics.gpu_poll_interval_ms", "must be 100-3600000"));
        }
        if let Some(addr) = self.metrics.listen_http
            && !addr.ip().is_loopback()
        {
            return Err(invalid(
                "metrics.listen_http",
                format!(
                    "{addr} is not a loopback address; plain-HTTP metrics stay on the box (use /metrics over HTTPS)"
                ),
            ));
        }
        if !self.metrics.public && self.metrics.token_file.as_os_str().is_empty() {
            return Err(invalid("metrics.token_file", "must not be empty unless metrics.public = true"));
        }
        if self.auth.admin_token_file.as_os_str().is_empty() {
            return Err(invalid("auth.admin_token_file", "must not be empty"));
        }
        if self.auth.changes_retention == 0 {
            return Err(invalid("auth.changes_retention", "must be greater than 0"));
        }
        Ok(())
    }
}

/// One line per problem: the key (lower-case, dotted), where the value came from, what is wrong.
fn describe(errors: figment::Error) -> ConfigError {
    let lines: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let origin = match &e.metadata {
                Some(m) => match &m.source {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {})", m.name),
                },
                None => String::new(),
            };
            if key.is_empty() { format!("{}{origin}", e.kind) } else { format!("key `{key}`{origin}: {}", e.kind) }
        })
        .collect();
    ConfigError::Parse(lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("appliance.toml", toml)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            result = Some(Config::from_figment(&Config::figment(Some(Path::new("appliance.toml")))));
            Ok(())
        });
        result.expect("jail ran")
    }

    #[test]
    fn defaults_are_valid_and_tls_is_on() {
        let config = load("", &[]).expect("defaults load");
        assert_eq!(config, Config::default());
        assert!(config.tls.enabled);
        assert_eq!(config.model_repository(), PathBuf::from("data/models"));
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let config = load(
            "[server]\nlisten = \"127.0.0.1:1000\"\nbody_limit_bytes = 2048\n",
            &[("APPLIANCE_SERVER__LISTEN", "127.0.0.1:2000")],
        )
        .expect("loads");
        assert_eq!(config.server.listen, "127.0.0.1:2000".parse().expect("addr"));
        assert_eq!(config.server.body_limit_bytes, 2048);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[server]\nlisten_addr = \"127.0.0.1:1\"\n", &[]).expect_err("rejected");
        let msg = err.to_string();
        assert!(msg.contains("listen_addr"), "{msg}");
    }

    #[test]
    fn badly_typed_value_names_key() {
        let err = load("[server]\nlisten = \"not an address\"\n", &[]).expect_err("rejected");
        let msg = err.to_string();
        assert!(msg.contains("server.listen"), "{msg}");
    }

    #[test]
    fn out_of_range_value_names_key_and_problem() {
        let err = load("[server]\nbody_limit_bytes = 10\n", &[]).expect_err("rejected");
        assert_eq!(err.to_string(), "configuration key `server.body_limit_bytes`: must be at least 1024");
    }

    #[test]
    fn cert_without_key_is_rejected() {
        let err = load("[tls]\ncert = \"/nonexistent.pem\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("tls.key"), "{err}");
    }

    #[test]
    fn the_log_filter_variable_is_not_a_configuration_key() {
        let config = load("", &[("APPLIANCE_LOG", "debug")]).expect("loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn client_certificates_need_a_ca_and_map_to_valid_robot_ids() {
        let err = load("[tls]\nclient_auth = \"required\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("tls.client_ca"), "{err}");
        let err = load("[tls]\nclient_auth = \"always\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("tls.client_auth"), "{err}");
        let err = load("[tls.client_names]\n\"arm.cell\" = \"bad id!\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("tls.client_names"), "{err}");
    }

    #[test]
    fn policy_settings_are_checked() {
        let err = load("[policy]\nmax_stack_bytes = 4194304\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("policy.max_stack_bytes"), "{err}");
        let twice = "[[policy.preload]]\nname = \"a\"\nworld = \"safety\"\npath = \"a.wasm\"\n\
                     [[policy.preload]]\nname = \"a\"\nworld = \"safety\"\npath = \"b.wasm\"\n";
        let err = load(twice, &[]).expect_err("rejected");
        assert!(err.to_string().contains("policy.preload[1].name"), "{err}");
        let err = load("[policy]\ntrusted_keys = [\"AAAA\"]\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("policy.trusted_keys[0]"), "{err}");
    }

    #[test]
    fn the_plain_http_metrics_listener_must_be_loopback() {
        let err = load("[metrics]\nlisten_http = \"0.0.0.0:9100\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("metrics.listen_http"), "{err}");
        assert!(load("[metrics]\nlisten_http = \"127.0.0.1:9100\"\n", &[]).is_ok());
    }

    #[test]
    fn quota_settings_are_checked_and_name_the_key() {
        let config = load("[quota]\ndurability = \"interval:250\"\n[quota.robots.arm-1]\nrate = \"10/min\"\n", &[])
            .expect("loads");
        assert_eq!(config.quota.robots["arm-1"].rate.as_deref(), Some("10/min"));
        let err = load("[quota]\ndurability = \"sometimes\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("quota.durability"), "{err}");
        let err = load("[quota.robots.arm-1]\nrate = \"10 per minute\"\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("quota.robots.\"arm-1\".rate"), "{err}");
        let err = load("[quota.groups.line-a]\nday = -5\n", &[]).expect_err("rejected");
        assert!(err.to_string().contains("quota.groups.line-a.day"), "{err}");
    }
}
