//! Start-up: TLS certificates and configuration errors, through the library and the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_certificate_is_generated_once_and_reused_on_restart() {
    let data = tempfile::tempdir().unwrap();
    let config = test_config(data.path());
    add_model(&config.model_repository(), "tiny-vla", appliance::demo::MODEL_TOML);
    // `start_with` keeps its second argument alive; here the test owns the data directory.
    let app = TestAppliance::start_with(config.clone(), tempfile::tempdir().unwrap()).await;
    let cert_path = data.path().join("tls/cert.pem");
    let first = std::fs::read(&cert_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.path().join("tls/key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    // The client trusts exactly this certificate, and the appliance serves it for `localhost`.
    assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), StatusCode::OK);
    app.stop().await.unwrap();

    let again = TestAppliance::start_with(config, tempfile::tempdir().unwrap()).await;
    assert_eq!(std::fs::read(&cert_path).unwrap(), first, "the certificate was reused, not regenerated");
    assert_eq!(again.client.get(again.url("/health")).send().await.unwrap().status(), StatusCode::OK);
    again.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_certificate_is_used_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cell.pem"), dir.path().join("cell.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let app = TestAppliance::start(|config, _| {
        config.tls.cert = Some(cert.clone());
        config.tls.key = Some(key.clone());
    })
    .await;
    assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), StatusCode::OK);
    assert!(!app.data.path().join("tls").exists(), "nothing was generated");
    // A client that trusts some other certificate is refused: TLS fails closed.
    let other = tempfile::tempdir().unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(other.path().join("c.pem"), stranger.cert.pem()).unwrap();
    let client = https_client(&other.path().join("c.pem"), app.addr);
    assert!(client.get(app.url("/health")).send().await.is_err());
}

fn appliance_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_appliance"));
    // The log filter shares the APPLIANCE_ prefix and must not be taken for a configuration key.
    cmd.env("APPLIANCE_LOG", "warn");
    cmd
}

#[test]
fn a_bad_environment_value_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        appliance_binary().current_dir(dir.path()).env("APPLIANCE_SERVER__LISTEN", "not-an-address").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created before the configuration was valid");
}

#[test]
fn a_config_file_with_a_bad_value_exits_non_zero_naming_the_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("appliance.toml"), "[server]\nbody_limit_bytes = 5\n").unwrap();
    let out = appliance_binary().current_dir(dir.path()).args(["--config", "appliance.toml"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.body_limit_bytes") && stderr.contains("at least 1024"), "{stderr}");
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("appliance.toml"), "[server]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
    let out = appliance_binary()
        .current_dir(dir.path())
        .args(["--config", "appliance.toml", "--check-config"])
        .env("APPLIANCE_LIMITS__MAX_INSTRUCTION_BYTES", "77")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:9000\""), "{stdout}");
    assert!(stdout.contains("max_instruction_bytes = 77"), "{stdout}");
}
