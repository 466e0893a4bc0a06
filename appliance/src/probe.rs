//! `appliance health`: asks the appliance on this machine for `GET /health`, as a container's
//! health check or a service's post-start check would, without curl or a CA bundle.
//!
//! It connects to the configured listen port on loopback (or `--addr`), over TLS when TLS is
//! on, and trusts exactly the certificate the appliance serves (the configured file, or the
//! one it generated under `<data.dir>/tls/`): pinned, so no name has to match and a configured
//! CA-signed certificate works as well as the self-signed one (`vla_api::pin`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading the appliance's certificate {path}: {problem}")]
    Certificate { path: String, problem: String },
    #[error("connecting to {addr}: {problem}")]
    Connect { addr: SocketAddr, problem: String },
    #[error("no answer from {addr} within {timeout_ms} ms")]
    Timeout { addr: SocketAddr, timeout_ms: u64 },
    #[error("{addr} answered something that is not HTTP: {answer}")]
    NotHttp { addr: SocketAddr, answer: String },
}

/// The answer to `GET /health`: its status and body.
#[derive(Debug)]
pub struct Health {
    pub status: u16,
    pub body: String,
}

/// Where the appliance of `config` listens, seen from this machine: a wildcard address becomes
/// loopback.
pub fn local_addr(config: &Config) -> SocketAddr {
    let listen = config.server.listen;
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /health` from the appliance at `addr`, within `timeout`.
pub async fn health(config: &Config, addr: SocketAddr, timeout: Duration) -> Result<Health, ProbeError> {
    let timeout_ms = timeout.as_millis() as u64;
    let pin = if config.tls.enabled { Some(served_certificate(config)?) } else { None };
    tokio::time::timeout(timeout, ask(addr, pin)).await.map_err(|_| ProbeError::Timeout { addr, timeout_ms })?
}

async fn ask(addr: SocketAddr, pin: Option<[u8; 32]>) -> Result<Health, ProbeError> {
    let connect = |e: std::io::Error| ProbeError::Connect { addr, problem: e.to_string() };
    let tcp = TcpStream::connect(addr).await.map_err(connect)?;
    let Some(pin) = pin else { return exchange(addr, tcp).await };
    let mut tls = vla_api::pin::client_config(pin).map_err(|e| ProbeError::Connect { addr, problem: e.to_string() })?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(connect)?;
    exchange(addr, stream).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(addr: SocketAddr, mut stream: S) -> Result<Health, ProbeError> {
    let io = |e: std::io::Error| ProbeError::Connect { addr, problem: e.to_string() };
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.map_err(io)?;
    let mut answer = Vec::new();
    // `/health` answers a few hundred bytes; 1 MiB bounds what a wrong peer can send.
    (&mut stream).take(1 << 20).read_to_end(&mut answer).await.map_err(io)?;
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&answer[..end.unwrap_or(answer.len())]).into_owned();
    let not_http = || ProbeError::NotHttp { addr, answer: crate::names::clip(&head, 80) };
    let status = head.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)).and_then(|s| s.parse().ok());
    let status = status.ok_or_else(not_http)?;
    let body = end.map_or(&[][..], |e| &answer[e + 4..]);
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Ok(Health { status, body: String::from_utf8_lossy(&body).into_owned() })
}

/// A `Transfer-Encoding: chunked` body's data, as far as it is well formed.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol]).ok().and_then(|l| {
            let hex = l.split(';').next().unwrap_or("").trim();
            usize::from_str_radix(hex, 16).ok()
        });
        let Some(size) = size.filter(|&n| n > 0) else { break };
        let data = &rest[eol + 2..];
        if data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        rest = data[size..].strip_prefix(b"\r\n").unwrap_or(&data[size..]);
    }
    out
}

/// SHA-256 of the first certificate of the file the appliance serves.
fn served_certificate(config: &Config) -> Result<[u8; 32], ProbeError> {
    let path = crate::tls::cert_path(config);
    let problem = |problem: String| ProbeError::Certificate { path: path.display().to_string(), problem };
    let pem = std::fs::read(&path).map_err(|e| problem(e.to_string()))?;
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| problem("no certificate in the file".into()))?
        .map_err(|e| problem(e.to_string()))?;
    Ok(vla_api::pin::fingerprint(cert.as_ref()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined_and_bad_ones_cut_without_panic() {
        assert_eq!(super::dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), b"hello world");
        assert_eq!(super::dechunk(b"ff\r\nshort"), b"");
        assert_eq!(super::dechunk("2\r\n\u{e9}x\r\n".as_bytes()), "\u{e9}".as_bytes());
    }
}
