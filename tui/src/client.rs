//! The appliance's HTTPS API as the console uses it: one client that trusts either a CA file or
//! the appliance's own certificate by pinned SHA-256 fingerprint (never no verification), the
//! polled snapshot, and the policy actions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use vla_api::{
    AuditList, GpuStats, ModelsStats, PolicyList, PolicyPatch, QueueStats, QuotaList, ReplayReport, ReplayRequest,
};

use crate::prom::Scrape;

/// How the console trusts the appliance's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// A PEM file of CA (or self-signed) certificates; the host name is checked.
    CaFile(PathBuf),
    /// The SHA-256 of the appliance's certificate (hex, colons optional), as the appliance
    /// logs it at start. Only that certificate is accepted.
    Pin([u8; 32]),
}

/// Parses a fingerprint such as `AB:CD:…` or `abcd…` (64 hex digits).
pub fn parse_pin(text: &str) -> anyhow::Result<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    if hex.len() != 64 {
        bail!("a SHA-256 fingerprint has 64 hex digits, this has {}", hex.len());
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("the fingerprint is not hex")?;
    }
    Ok(pin)
}

/// The appliance's address and the admin token.
#[derive(Debug, Clone)]
pub struct Connection {
    base: String,
    token: String,
    client: reqwest::Client,
}

/// Everything the console shows, read in one poll.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// When the poll finished (Unix ms).
    pub at_ms: u64,
    /// `/health/detailed` as it is (status, version, uptime, components).
    pub health: serde_json::Value,
    pub gpu: Option<GpuStats>,
    pub queue: Option<QueueStats>,
    pub models: Option<ModelsStats>,
    pub policies: Option<PolicyList>,
    pub quotas: Option<QuotaList>,
    pub audit: Option<AuditList>,
    pub metrics: Scrape,
}

/// An operator action on policies.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Upload(Upload),
    Patch {
        name: String,
        patch: PolicyPatch,
    },
    Delete {
        name: String,
    },
    /// Replays the installed policy `name` against the appliance's ring of recent requests,
    /// standing in for `replaces` (itself when `None`). Changes nothing.
    Replay {
        name: String,
        replaces: Option<String>,
    },
}

/// What an action that went through gave back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// What to tell the operator.
    Done(String),
    /// A replay's report, for the console to show.
    Replay(Box<ReplayReport>),
}

/// How long a replay may take (it runs through up to a thousand recorded requests in the
/// sandbox, one replay at a time); the poll's time limit is much shorter.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(120);

/// A policy upload as the form collects it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Upload {
    pub path: String,
    pub name: String,
    pub world: String,
    pub mode: String,
    pub order: String,
    /// JSON object (or empty for none).
    pub config: String,
}

impl Connection {
    pub fn new(url: &str, token: String, trust: &Trust, timeout: Duration) -> anyhow::Result<Connection> {
        let url = url.trim_end_matches('/');
        if !url.starts_with("https://") {
            bail!("the appliance URL must start with https:// (got {url})");
        }
        let builder = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout);
        let builder = match trust {
            Trust::CaFile(path) => {
                let pem = std::fs::read(path).with_context(|| format!("CA file {}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("CA file {}: not PEM certificates", path.display()))?;
                if certs.is_empty() {
                    bail!("CA file {} holds no certificate", path.display());
                }
                certs.into_iter().fold(builder.tls_built_in_root_certs(false), |b, c| b.add_root_certificate(c))
            }
            Trust::Pin(pin) => {
                let config = vla_api::pin::client_config(*pin).context("TLS protocol versions")?;
                builder.use_preconfigured_tls(config)
            }
        };
        Ok(Connection { base: url.to_string(), token, client: builder.build().context("HTTPS client")? })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    /// `GET path`'s body; a refusal is the appliance's own message. `/health/detailed`
    /// answers 503 with its body when no model serves: still news, so it is read too.
    async fn fetch(&self, path: &str) -> anyhow::Result<bytes::Bytes> {
        let response = self.get(path).send().await.map_err(|e| anyhow::anyhow!("GET {path}: {}", describe(&e)))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| anyhow::anyhow!("GET {path}: {}", describe(&e)))?;
        let readable = status.is_success() || (path == "/health/detailed" && status.as_u16() == 503);
        if !readable {
            bail!("GET {path}: {}", refusal(status, &body));
        }
        Ok(body)
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let body = self.fetch(path).await?;
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: unexpected answer"))
    }

    /// Reads every endpoint the views need, side by side.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let metrics = async {
            let body = self.fetch("/metrics").await?;
            anyhow::Ok(Scrape::parse(&String::from_utf8_lossy(&body)))
        };
        let (health, gpu, queue, models, policies, quotas, audit, metrics) = tokio::join!(
            self.json::<serde_json::Value>("/health/detailed"),
            self.json::<GpuStats>("/gpu/stats"),
            self.json::<QueueStats>("/queue/stats"),
            self.json::<ModelsStats>("/models/stats"),
            self.json::<PolicyList>("/admin/policies"),
            self.json::<QuotaList>("/admin/quotas"),
            self.json::<AuditList>("/admin/audit?limit=200"),
            metrics,
        );
        Ok(Snapshot {
            at_ms: now_ms(),
            health: health?,
            gpu: Some(gpu?),
            queue: Some(queue?),
            models: Some(models?),
            policies: Some(policies?),
            quotas: Some(quotas?),
            audit: Some(audit?),
            metrics: metrics?,
        })
    }

    /// Runs an operator action; `Ok` holds what came back, `Err` the appliance's refusal
    /// verbatim (or why it could not be asked).
    pub async fn run(&self, command: Command) -> Result<Reply, String> {
        match command {
            Command::Upload(upload) => self.upload(upload).await.map(Reply::Done),
            Command::Patch { name, patch } => {
                let url = format!("{}/admin/policies/{name}", self.base);
                let response = self.client.patch(url).bearer_auth(&self.token).json(&patch).send().await;
                let what = describe_patch(&patch);
                answer(response, format!("{name}: {what}")).await.map(Reply::Done)
            }
            Command::Delete { name } => {
                let url = format!("{}/admin/policies/{name}", self.base);
                let response = self.client.delete(url).bearer_auth(&self.token).send().await;
                answer(response, format!("{name}: deleted")).await.map(Reply::Done)
            }
            Command::Replay { name, replaces } => {
                let url = format!("{}/admin/policies/{name}/replay", self.base);
                let body = ReplayRequest { replaces, ..ReplayRequest::default() };
                let response =
                    self.client.post(url).bearer_auth(&self.token).timeout(REPLAY_TIMEOUT).json(&body).send().await;
                let response = response.map_err(|e| describe(&e))?;
                let status = response.status();
                let body = response.bytes().await.map_err(|e| describe(&e))?;
                if !status.is_success() {
                    return Err(refusal(status, &body));
                }
                let report: ReplayReport =
                    serde_json::from_slice(&body).map_err(|e| format!("replay of {name}: unexpected answer: {e}"))?;
                Ok(Reply::Replay(Box::new(report)))
            }
        }
    }

    async fn upload(&self, upload: Upload) -> Result<String, String> {
        let path = Path::new(upload.path.trim());
        let component = tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut form = reqwest::multipart::Form::new()
            .text("name", upload.name.trim().to_string())
            .text("world", upload.world.trim().to_string())
            .text("mode", upload.mode.trim().to_string())
            .part("component", reqwest::multipart::Part::bytes(component).file_name("policy.wasm"));
        if !upload.order.trim().is_empty() {
            form = form.text("order", upload.order.trim().to_string());
        }
        if !upload.config.trim().is_empty() {
            form = form.text("config", upload.config.trim().to_string());
        }
        let url = format!("{}/admin/policies", self.base);
        let response = self.client.post(url).bearer_auth(&self.token).multipart(form).send().await;
        answer(response, format!("{}: uploaded ({})", upload.name.trim(), upload.mode.trim())).await
    }
}

fn describe_patch(patch: &PolicyPatch) -> String {
    let mut parts = Vec::new();
    if let Some(enabled) = patch.enabled {
        parts.push(if enabled { "enabled".to_string() } else { "disabled".to_string() });
    }
    if let Some(mode) = &patch.mode {
        parts.push(format!("now {mode}"));
    }
    if let Some(replaced) = &patch.replace {
        parts.push(format!("{replaced} replaced and removed"));
    }
    parts.join(", ")
}

async fn answer(response: reqwest::Result<reqwest::Response>, done: String) -> Result<String, String> {
    let response = response.map_err(|e| describe(&e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| describe(&e))?;
    if status.is_success() { Ok(done) } else { Err(refusal(status, &body)) }
}

/// The appliance's own message for a refusal (`{"error": …, "code": …}`), verbatim.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<vla_api::ErrorBody>(body) {
        Ok(e) => format!("{} {}: {}", status.as_u16(), e.code, e.error),
        Err(_) => format!("{status}: {}", String::from_utf8_lossy(body).chars().take(200).collect::<String>()),
    }
}

/// A transport error with its causes (reqwest's own message alone says little).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let colons = (0..32).map(|i| format!("{i:02X}")).collect::<Vec<_>>().join(":");
        let plain = colons.replace(':', "").to_lowercase();
        assert_eq!(parse_pin(&colons).unwrap(), parse_pin(&plain).unwrap());
        assert_eq!(parse_pin(&colons).unwrap()[31], 31);
        assert!(parse_pin("AB:CD").unwrap_err().to_string().contains("64 hex digits"));
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn plain_http_is_refused() {
        let err = Connection::new("http://127.0.0.1:8443", "t".into(), &Trust::Pin([0; 32]), Duration::from_secs(1));
        assert!(err.unwrap_err().to_string().contains("https://"));
    }
}
