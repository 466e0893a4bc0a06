//! TLS: the server's rustls configuration from configured PEM files, or from a self-signed
//! certificate generated once into `<data.dir>/tls/` and reused on later starts; optionally
//! verifying robots' client certificates against `tls.client_ca` (mutual TLS).
//!
//! [`watch`] checks the files every `tls.reload_interval_ms` and publishes a new configuration
//! when they change; the accept loop uses the latest one for each new connection. A change that
//! does not load (a half-written file, a key that does not match) is logged and the previous
//! configuration keeps serving.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::Config;

/// The verified client certificate of a TLS connection, put into each request's extensions by
/// the accept loop: the certificate's subject common names and DNS/URI subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    #[error("generating the self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the certificate came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub cert_path: PathBuf,
    /// SHA-256 of the leaf certificate, colon-separated hex: what a client pins or compares.
    pub sha256_fingerprint: String,
    /// True when generated during this start.
    pub generated: bool,
}

/// Builds the server's TLS configuration (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(config: &Config) -> Result<(Arc<rustls::ServerConfig>, CertInfo), TlsError> {
    let (cert_path, key_path) = cert_and_key(config);
    let configured = config.tls.cert.is_some() && config.tls.key.is_some();
    let present = cert_path.is_file() && key_path.is_file();
    let generated = !configured && !present;
    if generated {
        generate_self_signed(&config.tls.self_signed_names, &cert_path, &key_path)?;
    }
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let sha256_fingerprint = fingerprint(&certs[0]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &config.tls.client_ca {
        // Client certificates are verified when sent; whether one is needed is decided per
        // request (see `auth`), so the admin and health endpoints stay reachable without one.
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::File { path: ca.clone(), problem: e.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::File { path: ca.clone(), problem: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| TlsError::File {
        path: key_path.clone(),
        problem: format!("does not match the certificate: {e}"),
    })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No TLS 1.3 session tickets after the handshake: Python's `websockets` client (openpi's)
    // reads on one thread while it writes its upgrade request on another, and a ticket
    // arriving then broke its OpenSSL connection (the request lost, or "[SSL] internal error")
    // in roughly one connection in fifteen here. Robots keep their connections open, so resumption saves
    // little.
    server.send_tls13_tickets = 0;
    Ok((Arc::new(server), CertInfo { cert_path, sha256_fingerprint, generated }))
}

fn generate_self_signed(names: &[String], cert: &Path, key: &Path) -> Result<(), TlsError> {
    let certified =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Generate(e.to_string()))?;
    let dir = cert.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| TlsError::File { path: dir.into(), problem: e.to_string() })?;
    write_private(key, certified.key_pair.serialize_pem().as_bytes())?;
    fs::write(cert, certified.cert.pem()).map_err(|e| TlsError::File { path: cert.into(), problem: e.to_string() })?;
    // Whatever the umask (the unit's is 0077): the certificate is public, and the appliance's
    // group (the cell's Prometheus) may enter the directory to read it, not the key.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(cert, 0o644), (dir, 0o750)] {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| TlsError::File { path: path.into(), problem: e.to_string() })?;
    }
    Ok(())
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| TlsError::File { path: path.into(), problem: e.to_string() };
    let mut file =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |problem: String| TlsError::File { path: path.into(), problem };
    let pem = fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(err("contains no PEM certificate".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |problem: String| TlsError::File { path: path.into(), problem };
    let pem = fs::read(path).map_err(|e| err(e.to_string()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| err(format!("not a PEM private key: {e}")))?
        .ok_or_else(|| err("contains no PEM private key".into()))
}

fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The identity in a verified client certificate: subject common names, then DNS and URI
/// subject alternative names. `None` when no certificate was sent.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
    use x509_parser::extensions::GeneralName;
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => names.push((*n).to_string()),
                _ => {}
            }
        }
    }
    Some(PeerIdentity { names })
}

/// The certificate file the appliance serves: the configured one, else the generated one.
pub fn cert_path(config: &Config) -> PathBuf {
    cert_and_key(config).0
}

/// The certificate and key files: the configured ones, else the generated pair in `<data.dir>/tls/`.
fn cert_and_key(config: &Config) -> (PathBuf, PathBuf) {
    match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => (config.data.dir.join("tls/cert.pem"), config.data.dir.join("tls/key.pem")),
    }
}

/// Files the TLS configuration is built from.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let (cert, key) = cert_and_key(config);
    let mut files = vec![cert, key];
    files.extend(config.tls.client_ca.clone());
    files
}

fn file_states(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files.iter().map(|f| fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

/// Re-reads the certificate, key and client CA whenever one of them changes, and publishes the
/// new configuration on `tx`. Runs until every receiver is gone.
pub async fn watch(config: Arc<Config>, tx: watch::Sender<Arc<rustls::ServerConfig>>) {
    let interval = Duration::from_millis(config.tls.reload_interval_ms);
    if interval.is_zero() {
        return;
    }
    let files = watched_files(&config);
    // `loaded`: the files' state when last loaded; `warned`: when a reload last failed (one
    // warning per change, but a retry every interval until it loads: a `chmod` that fixes an
    // unreadable key changes neither mtime nor length).
    let mut loaded = file_states(&files);
    let mut warned = None;
    loop {
        tokio::time::sleep(interval).await;
        if tx.is_closed() {
            return;
        }
        let now = file_states(&files);
        if now == loaded {
            continue;
        }
        let reloaded = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || server_config(&config)).await
        };
        match reloaded {
            Ok(Ok((server, cert))) => {
                tracing::info!(certificate = %cert.cert_path.display(), sha256 = %cert.sha256_fingerprint, "TLS files changed: reloaded");
                let _ = tx.send(server);
                loaded = now;
                warned = None;
            }
            Ok(Err(e)) if warned.as_ref() != Some(&now) => {
                tracing::warn!("TLS files changed but do not load; still serving the previous ones: {e}");
                warned = Some(now);
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::warn!("TLS reload task failed: {e}"),
        }
    }
}
