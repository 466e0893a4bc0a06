//! Hostile clients of the appliance, as an attacker on the factory LAN or a buggy robot would
//! be: raw TCP and TLS connections that say nothing or too little, HTTP/2 connections that
//! only keep themselves alive, made-up methods, refused requests with huge bodies, floods of
//! large or refused requests, and a victim robot at its control rate that must keep being
//! served. The appliance's hostile-client tests and the bench's attack runs share them.
//!
//! Attacks come from their own loopback address (`127.0.0.2` by default) so that per-peer
//! bounds hit the attacker and not the victim on `127.0.0.1`.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Where attacks come from.
pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Where the victim robot is.
pub const VICTIM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// The HTTP/2 connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The appliance under attack: its address and the certificate it serves.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub cert_pem: Vec<u8>,
    tls: Arc<rustls::ClientConfig>,
    http1: Arc<rustls::ClientConfig>,
}

impl Target {
    pub fn new(addr: SocketAddr, cert_pem: Vec<u8>) -> io::Result<Target> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut cert_pem.as_slice()) {
            roots.add(cert?).map_err(io::Error::other)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http1 = tls.clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Target { addr, cert_pem, tls: Arc::new(tls), http1: Arc::new(http1) })
    }

    /// `https://localhost:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// An HTTPS client (HTTP/2 when offered) from `local`, trusting exactly the appliance.
    pub fn client(&self, local: IpAddr) -> reqwest::Client {
        let cert = reqwest::Certificate::from_pem(&self.cert_pem).expect("the appliance's certificate is PEM");
        reqwest::Client::builder()
            .add_root_certificate(cert)
            .resolve("localhost", self.addr)
            .local_address(local)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a client builds")
    }

    /// A TCP connection from `local`.
    pub async fn tcp(&self, local: IpAddr) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(local, 0))?;
        socket.connect(self.addr).await
    }

    /// A TLS connection from `local` (ALPN `h2`), handshake done.
    pub async fn tls(&self, local: IpAddr) -> io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp(local).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
        TlsConnector::from(self.tls.clone()).connect(name, tcp).await
    }

    /// A slow-loris request: over TLS (ALPN `http/1.1`), `head` (request line and headers,
    /// `Content-Length` among them, without the blank line) and the first bytes of its body,
    /// `sent`, then nothing more. Read its answer with [`response_status`].
    pub async fn stalled_body(&self, local: IpAddr, head: &str, sent: &[u8]) -> io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp(local).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
        let mut tls = TlsConnector::from(self.http1.clone()).connect(name, tcp).await?;
        tls.write_all(format!("{head}\r\n\r\n").as_bytes()).await?;
        tls.write_all(sent).await?;
        tls.flush().await?;
        Ok(tls)
    }

    /// A TLS connection that sends half of the HTTP/2 preface and stops.
    pub async fn half_preface(&self, local: IpAddr) -> io::Result<TlsStream<TcpStream>> {
        let mut tls = self.tls(local).await?;
        tls.write_all(&PREFACE[..PREFACE.len() / 2]).await?;
        tls.flush().await?;
        Ok(tls)
    }

    /// An HTTP/2 connection that sends the preface and its settings, then only PINGs (see
    /// [`closed_within`]), never a request.
    pub async fn ping_only(&self, local: IpAddr) -> io::Result<TlsStream<TcpStream>> {
        let mut tls = self.tls(local).await?;
        tls.write_all(PREFACE).await?;
        tls.write_all(&frame(4, 0, &[])).await?;
        tls.flush().await?;
        Ok(tls)
    }
}

/// One HTTP/2 frame on stream 0: `kind` (4 SETTINGS, 6 PING), `flags`, `payload`.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Opens `n` TCP connections from `local` and counts those the appliance closed within 300 ms
/// (refused at accept); the rest are returned, still open.
pub async fn connection_flood(target: &Target, local: IpAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut many = Vec::new();
    for _ in 0..n {
        if let Ok(s) = target.tcp(local).await {
            many.push(s);
        }
    }
    let mut refused = 0;
    for s in &mut many {
        if closed_within(s, Duration::from_millis(300), false).await.is_some() {
            refused += 1;
        }
    }
    (many, refused)
}

/// The status code of the HTTP/1.1 answer read from `stream` within `limit`, and the answer's
/// text as far as it was read (`None`: no status line by then, or the connection closed first).
pub async fn response_status<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Option<(u16, String)> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            // The head and (the appliance's answers are small) the body with it.
            if seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.ends_with(b"}") {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text))
}

/// How long until the appliance closed `stream` (a read ends or fails), at most `limit`
/// (`None`: still open then). With `ping`, a PING goes out every half second meanwhile, as a
/// client keeping an HTTP/2 connection alive would.
pub async fn closed_within<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    limit: Duration,
    ping: bool,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        let step = if ping { left.min(Duration::from_millis(500)) } else { left };
        match tokio::time::timeout(step, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) if started.elapsed() >= limit => return None,
            Err(_) => {
                if ping && stream.write_all(&frame(6, 0, &[0; 8])).await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
}

/// The connection attacks [`hold`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// TCP connected, nothing sent.
    Silent,
    /// TLS done, half the HTTP/2 preface sent.
    HalfPreface,
    /// HTTP/2 set up, then PINGs only.
    PingOnly,
}

/// Keeps `n` connections of `kind` from [`ATTACKER`] open for `duration`, opening another
/// whenever the appliance closes (or refuses) one. Returns how many it closed or refused.
pub async fn hold(target: &Target, kind: Hold, n: usize, duration: Duration) -> u64 {
    let until = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let target = target.clone();
        tasks.spawn(async move {
            let mut closed = 0u64;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                let ended = match kind {
                    Hold::Silent => match target.tcp(ATTACKER).await {
                        Ok(mut s) => closed_within(&mut s, left, false).await,
                        Err(_) => Some(Duration::ZERO),
                    },
                    Hold::HalfPreface => match target.half_preface(ATTACKER).await {
                        Ok(mut s) => closed_within(&mut s, left, false).await,
                        Err(_) => Some(Duration::ZERO),
                    },
                    Hold::PingOnly => match target.ping_only(ATTACKER).await {
                        Ok(mut s) => closed_within(&mut s, left, true).await,
                        Err(_) => Some(Duration::ZERO),
                    },
                };
                match ended {
                    Some(after) => {
                        closed += 1;
                        // Refused at once: do not spin.
                        if after < Duration::from_millis(10) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    None => break,
                }
            }
            closed
        });
    }
    let mut closed = 0;
    while let Some(c) = tasks.join_next().await {
        closed += c.unwrap_or(0);
    }
    closed
}

/// Answers counted by status and error code (`200`, `429 rate_limited`, `error: …`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, key: impl Into<String>) {
        *self.0.entry(key.into()).or_insert(0) += 1;
    }

    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn merge(&mut self, other: Tally) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_insert(0) += v;
        }
    }

    /// Counts a response as `<status>` or `<status> <code>`; a failed request as `error`.
    pub async fn count(&mut self, response: reqwest::Result<reqwest::Response>) {
        match response {
            Ok(r) => {
                let status = r.status().as_u16();
                let code = if r.status().is_success() {
                    None
                } else {
                    r.bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .and_then(|v| v["code"].as_str().map(str::to_string))
                };
                self.add(match code {
                    Some(code) => format!("{status} {code}"),
                    None => status.to_string(),
                });
            }
            Err(_) => self.add("error"),
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Sends `request()` from `workers` tasks back to back for `duration`, counting the answers.
pub async fn flood(
    workers: usize,
    duration: Duration,
    request: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Tally {
    let request = Arc::new(request);
    let until = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let request = request.clone();
        tasks.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < until {
                tally.count(request().send().await).await;
            }
            tally
        });
    }
    let mut tally = Tally::default();
    while let Some(t) = tasks.join_next().await {
        if let Ok(t) = t {
            tally.merge(t);
        }
    }
    tally
}

/// A JSON object of about `bytes` bytes (one long string field): valid JSON, so it costs a
/// full parse.
pub fn big_json(bytes: usize) -> Vec<u8> {
    let mut body = br#"{"robot_id":"x","instruction":"go","state":[0,0,0,0,0,0,0],"image":""#.to_vec();
    body.resize(body.len() + bytes.saturating_sub(body.len() + 2), b'A');
    body.extend_from_slice(br#""}"#);
    body
}

/// A camera-like JPEG of `width` × `height`.
pub fn jpeg(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, seed.wrapping_mul(37).wrapping_add((x ^ y) as u8)])
    });
    let mut out = Vec::new();
    img.write_to(&mut io::Cursor::new(&mut out), image::ImageFormat::Jpeg).expect("a JPEG encodes");
    out
}

/// An OIP binary infer body for the demo model: `rows` rows, each an encoded `frame` (BYTES),
/// the instruction `pick`, and a 7-value state; `outputs` names the output that many times.
/// Returns the body and its JSON header's length.
pub fn oip_frames(rows: usize, frame: &[u8], outputs: usize) -> (Vec<u8>, usize) {
    let mut images = Vec::new();
    let mut texts = Vec::new();
    for _ in 0..rows {
        images.extend((frame.len() as u32).to_le_bytes());
        images.extend_from_slice(frame);
        texts.extend(4u32.to_le_bytes());
        texts.extend(b"pick");
    }
    let state: Vec<u8> = (0..rows * 7).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
    let mut header = serde_json::json!({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [rows], "parameters": {"binary_data_size": images.len()}},
        {"name": "instruction", "datatype": "BYTES", "shape": [rows], "parameters": {"binary_data_size": texts.len()}},
        {"name": "state", "datatype": "FP32", "shape": [rows, 7], "parameters": {"binary_data_size": state.len()}},
    ]});
    if outputs > 0 {
        header["outputs"] = serde_json::Value::Array(vec![serde_json::json!({"name": "action"}); outputs]);
    }
    let mut body = serde_json::to_vec(&header).expect("JSON");
    let len = body.len();
    for part in [&images, &texts, &state] {
        body.extend_from_slice(part);
    }
    (body, len)
}

/// A robot's `/v1/inference` request for the demo model, as JSON.
pub fn robot_request(robot_id: &str, instruction: &str, state: [f32; 7], frame: &[u8]) -> serde_json::Value {
    use base64::Engine;
    serde_json::json!({
        "robot_id": robot_id,
        "instruction": instruction,
        "state": state,
        "image": base64::engine::general_purpose::STANDARD.encode(frame),
    })
}

/// Latencies and outcomes of a steady client.
#[derive(Debug, Clone, Default)]
pub struct Steady {
    pub tally: Tally,
    /// Every successful request's latency, from when it was due.
    pub latencies: Vec<Duration>,
}

impl Steady {
    pub fn ok(&self) -> u64 {
        self.tally.0.iter().filter(|(k, _)| k.starts_with('2')).map(|(_, v)| v).sum()
    }

    /// Answers other than 2xx.
    pub fn failures(&self) -> u64 {
        self.tally.total() - self.ok()
    }

    pub fn quantile(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort_unstable();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

/// A client sending `request()` at `hz`, open loop (latency counted from when a request was
/// due), until [`Steady::finish`] — the victim robot, or a `/health` probe.
#[derive(Debug)]
pub struct SteadyClient {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Steady>,
}

impl SteadyClient {
    pub fn start(hz: f64, request: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static) -> SteadyClient {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let period = Duration::from_secs_f64(1.0 / hz);
        let task = tokio::spawn(async move {
            let mut steady = Steady::default();
            let mut due = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep_until(due.into()).await;
                let response = request().send().await;
                let ok = response.as_ref().is_ok_and(|r| r.status().is_success());
                let elapsed = due.elapsed();
                steady.tally.count(response).await;
                if ok {
                    steady.latencies.push(elapsed);
                }
                due += period;
                // Far behind (the appliance stalled): no burst to catch up, the next one now.
                if due + period < Instant::now() {
                    due = Instant::now();
                }
            }
            steady
        });
        SteadyClient { stop, task }
    }

    pub async fn finish(self) -> Steady {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// The resident set of process `pid`, bytes (Linux `/proc`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_what_http2_says() {
        assert_eq!(frame(6, 0, &[0; 8])[..9], [0, 0, 8, 6, 0, 0, 0, 0, 0]);
        assert_eq!(frame(4, 0, &[]), vec![0, 0, 0, 4, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_big_json_body_is_valid_json_of_its_size() {
        let body = big_json(100_000);
        assert_eq!(body.len(), 100_000);
        assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
    }

    #[test]
    fn quantiles_of_latencies() {
        let steady = Steady { tally: Tally::default(), latencies: (1..=100).map(Duration::from_millis).collect() };
        assert_eq!(steady.quantile(0.5), Duration::from_millis(51));
        assert_eq!(steady.quantile(0.99), Duration::from_millis(99));
    }
}
