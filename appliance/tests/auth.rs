//! Robot identity and admin access over real HTTPS and a real sled store: API keys, client
//! certificates (a CA and certificates made here), the admin token on every admin route, keys
//! hashed at rest, and certificates replaced on disk while serving.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use appliance::http::auth::{Access, access_for};
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn error_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_registered_robot_with_its_own_key_gets_an_action() {
    let app = TestAppliance::start(|_, _| {}).await;
    let arm1 = app.register("arm-1", "normal").await;
    app.register("arm-2", "normal").await;
    let post = |key: Option<&str>, body: &vla_api::InferenceRequest| {
        let r = app.client.post(app.url("/v1/inference")).json(body);
        match key {
            Some(k) => r.header("x-api-key", k),
            None => r,
        }
        .send()
    };
    let mine = robot_request(1);
    assert_eq!(post(Some(&arm1.api_key), &mine).await.unwrap().status(), StatusCode::OK);
    // `Authorization: Bearer` works too.
    let bearer = app.client.post(app.url("/v1/inference")).bearer_auth(&arm1.api_key).json(&mine).send().await;
    assert_eq!(bearer.unwrap().status(), StatusCode::OK);
    // The registered type fills in for an omitted one; another type is refused.
    let mut untyped = mine.clone();
    untyped.robot_type = None;
    assert_eq!(post(Some(&arm1.api_key), &untyped).await.unwrap().status(), StatusCode::OK);
    let mut retyped = mine.clone();
    retyped.robot_type = Some("kuka".into());
    let (status, body) = error_of(post(Some(&arm1.api_key), &retyped).await.unwrap()).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (StatusCode::FORBIDDEN, "forbidden"), "{body}");

    // Missing, malformed and wrong keys: 401 with the usual JSON error.
    let (status, body) = error_of(post(None, &mine).await.unwrap()).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert!(body["error"].as_str().unwrap().contains("X-API-Key"), "{body}");
    let (_, key_id, _) = split(&arm1.api_key);
    let wrong_secret = format!("vlak_{key_id}_{}", "A".repeat(43));
    let unknown_id = format!("vlak_{}_{}", "0".repeat(16), "A".repeat(43));
    let mut answers = Vec::new();
    for key in [wrong_secret.as_str(), unknown_id.as_str(), "not-a-key"] {
        let (status, body) = error_of(post(Some(key), &mine).await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key}");
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "a known key id must not answer differently: {answers:?}");

    // Another robot's id, registered or not: the same 403.
    let mut as_arm2 = mine.clone();
    as_arm2.robot_id = "arm-2".into();
    let mut as_ghost = mine.clone();
    as_ghost.robot_id = "ghost-9".into();
    let (s2, b2) = error_of(post(Some(&arm1.api_key), &as_arm2).await.unwrap()).await;
    let (s9, b9) = error_of(post(Some(&arm1.api_key), &as_ghost).await.unwrap()).await;
    assert_eq!((s2, s9), (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN));
    assert_eq!(b2, b9, "whether another robot exists must not show");

    // Priority above the robot's class is refused; at or below it is fine.
    let mut urgent = mine.clone();
    urgent.priority = Some(vla_api::Priority::High);
    assert_eq!(post(Some(&arm1.api_key), &urgent).await.unwrap().status(), StatusCode::FORBIDDEN);
    urgent.priority = Some(vla_api::Priority::Low);
    assert_eq!(post(Some(&arm1.api_key), &urgent).await.unwrap().status(), StatusCode::OK);

    // Rotation: the old key stops at once, the new one works.
    let rotated: vla_api::RobotKey =
        app.admin(Method::POST, "/admin/robots/arm-1/rotate-key").send().await.unwrap().json().await.unwrap();
    assert_eq!(post(Some(&arm1.api_key), &mine).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(post(Some(&rotated.api_key), &mine).await.unwrap().status(), StatusCode::OK);

    // Revocation takes effect on the next request.
    let revoked = app.admin(Method::DELETE, "/admin/robots/arm-1").send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let revoked: vla_api::Robot = revoked.json().await.unwrap();
    assert!(revoked.revoked_unix_ms.is_some());
    let (status, body) = error_of(post(Some(&rotated.api_key), &mine).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, answers[0], "a revoked key answers like any invalid key");
    let rotate_revoked = app.admin(Method::POST, "/admin/robots/arm-1/rotate-key").send().await.unwrap();
    assert_eq!(rotate_revoked.status(), StatusCode::CONFLICT);
    // Registered again, it gets a new key.
    let again = app.register("arm-1", "normal").await;
    assert_eq!(post(Some(&again.api_key), &mine).await.unwrap().status(), StatusCode::OK);

    // The admin token reads but gets no actions.
    let (status, _) = error_of(app.admin(Method::POST, "/v1/inference").json(&mine).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(app.admin(Method::GET, "/v1/models").send().await.unwrap().status(), StatusCode::OK);
}

fn split(key: &str) -> (&str, &str, &str) {
    let rest = key.strip_prefix("vlak_").unwrap();
    ("vlak_", &rest[..16], &rest[17..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_registers_lists_and_refuses_bad_input() {
    let app = TestAppliance::start(|_, _| {}).await;
    let key = app.register("arm-1", "high").await;
    assert!(key.api_key.starts_with("vlak_"));
    assert_eq!(key.robot.priority, vla_api::Priority::High);
    let list: vla_api::RobotList = app.admin(Method::GET, "/admin/robots").send().await.unwrap().json().await.unwrap();
    assert_eq!(list.robots.len(), 1);
    assert_eq!(list.robots[0].robot_id, "arm-1");
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains(&key.api_key[17..]), "listing never shows key material");
    let one = app.admin(Method::GET, "/admin/robots/arm-1").send().await.unwrap();
    assert_eq!(one.status(), StatusCode::OK);
    let (status, body) = error_of(app.admin(Method::GET, "/admin/robots/nobody").send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (StatusCode::NOT_FOUND, "robot_not_found"));

    let register = |body: Value| app.admin(Method::POST, "/admin/robots").json(&body).send();
    let (status, body) = error_of(register(json!({"robot_id": "arm-1", "robot_type": "ur5e"})).await.unwrap()).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (StatusCode::CONFLICT, "conflict"));
    let (status, body) = error_of(register(json!({"robot_id": "a b", "robot_type": "ur5e"})).await.unwrap()).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value"));
    assert!(body["error"].as_str().unwrap().contains("robot_id"), "{body}");
    let (status, body) = error_of(register(json!({"robot_id": "arm-3"})).await.unwrap()).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "invalid_field"));
    assert!(body["error"].as_str().unwrap().contains("robot_type"), "{body}");
    let (status, _) =
        error_of(register(json!({"robot_id": "arm-3", "robot_type": "x", "priority": "urgent"})).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_is_closed_without_the_admin_token() {
    let app = TestAppliance::start(|_, _| {}).await;
    let robot_key = app.robot_key("arm-1").await;
    let public = ["/health", "/v2/health/live", "/v2/health/ready"];
    let routes = appliance::http::routes();
    let mut admin_routes = 0;
    for (path, _) in &routes {
        let access = access_for(path);
        assert_eq!(access == Access::Public, public.contains(path), "{path}: only the health endpoints are public");
        if access == Access::Public {
            continue;
        }
        let concrete = path.replace("{model}", "tiny-vla").replace("{version}", "1").replace("{robot_id}", "arm-1");
        for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let send = |auth: Option<(&str, &str)>| {
                let r = app.client.request(method.clone(), app.url(&concrete));
                match auth {
                    Some((h, v)) => r.header(h, v),
                    None => r,
                }
                .send()
            };
            let (status, body) = error_of(send(None).await.unwrap()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {concrete} without credentials");
            assert_eq!(body["code"], "unauthorized");
            let wrong = send(Some(("authorization", "Bearer vlaadm_not-the-token-but-long-enough-xxxxxxxx"))).await;
            assert_eq!(wrong.unwrap().status(), StatusCode::UNAUTHORIZED, "{method} {concrete} with a wrong token");
            if access == Access::Admin {
                let as_robot = send(Some(("x-api-key", &robot_key))).await.unwrap();
                assert_eq!(as_robot.status(), StatusCode::FORBIDDEN, "{method} {concrete} with a robot key");
            }
        }
        if access == Access::Admin {
            admin_routes += 1;
        }
    }
    assert!(admin_routes >= 6, "the admin routes were enumerated: {admin_routes}");
    // Paths no route serves are closed too, admin or not.
    for path in ["/admin/secrets", "/admin", "/v2/repository/models/x/delete", "/metrics/anything"] {
        assert_eq!(app.client.get(app.url(path)).send().await.unwrap().status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    for path in public {
        assert_eq!(app.client.get(app.url(path)).send().await.unwrap().status(), StatusCode::OK, "{path}");
    }
}

/// Whether `needle` appears in any file under `dir`.
fn found_in(dir: &std::path::Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if let Some(p) = found_in(&path, needle) {
                return Some(p);
            }
        } else if std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle) {
            return Some(path);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_only_as_salted_hashes_and_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let config = test_config(data.path());
    add_model(&config.model_repository(), "tiny-vla", appliance::demo::MODEL_TOML);
    let app = TestAppliance::start_with(config.clone(), tempfile::tempdir().unwrap()).await;
    let keys = [app.register("arm-1", "normal").await.api_key, app.register("arm-2", "normal").await.api_key];
    let rotated: vla_api::RobotKey =
        app.admin(Method::POST, "/admin/robots/arm-2/rotate-key").send().await.unwrap().json().await.unwrap();
    app.stop().await.unwrap();
    for key in keys.iter().chain([&rotated.api_key]) {
        let (_, _, secret) = split(key);
        assert_eq!(found_in(data.path(), key.as_bytes()), None, "the raw key is on disk");
        assert_eq!(found_in(data.path(), secret.as_bytes()), None, "the key's secret is on disk");
    }
    assert!(data.path().join("store").is_dir(), "sled lives in the data directory");

    let again = TestAppliance::start_with(config, tempfile::tempdir().unwrap()).await;
    let mut request = robot_request(1);
    let ok = again.client.post(again.url("/v1/inference")).header("x-api-key", &keys[0]).json(&request).send().await;
    assert_eq!(ok.unwrap().status(), StatusCode::OK, "registrations survive a restart");
    request.robot_id = "arm-2".into();
    let old = again.client.post(again.url("/v1/inference")).header("x-api-key", &keys[1]).json(&request).send().await;
    assert_eq!(old.unwrap().status(), StatusCode::UNAUTHORIZED, "so do rotations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_configuration_registers_a_demo_robot_whose_key_file_works() {
    let app = TestAppliance::start(|config, _| config.auth.demo_robot = true).await;
    use std::os::unix::fs::PermissionsExt;
    for file in ["demo-robot.key", "admin.token"] {
        let mode = std::fs::metadata(app.data.path().join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is private");
    }
    let key = std::fs::read_to_string(app.data.path().join("demo-robot.key")).unwrap();
    let mut request = robot_request(1);
    request.robot_id = "demo-arm".into();
    request.robot_type = None;
    let response =
        app.client.post(app.url("/v1/inference")).header("x-api-key", key.trim()).json(&request).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Rotating the demo robot's key removes the stale key file.
    app.admin(Method::POST, "/admin/robots/demo-arm/rotate-key").send().await.unwrap();
    assert!(!app.data.path().join("demo-robot.key").exists());
}

/// A certificate authority for robots, and client certificates it signs.
struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    /// A client certificate with `cn` as subject CN and `san` as DNS name, as one PEM (cert + key).
    fn client(&self, cn: &str, san: &str) -> reqwest::Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        reqwest::Identity::from_pem(format!("{}{}", cert.pem(), key.serialize_pem()).as_bytes()).unwrap()
    }
}

fn client_with(app: &TestAppliance, identity: reqwest::Identity) -> reqwest::Client {
    let pem = std::fs::read(app.data.path().join("tls/cert.pem")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .identity(identity)
        .resolve("localhost", app.addr)
        .build()
        .unwrap()
}

async fn start_with_client_ca(required: bool) -> (TestAppliance, Ca, tempfile::TempDir) {
    let ca = Ca::new("cell-7 robots");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("robots-ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).unwrap();
    let app = TestAppliance::start(|config, _| {
        config.tls.client_ca = Some(ca_path.clone());
        if required {
            config.tls.client_auth = appliance::config::ClientAuth::Required;
        }
        config.tls.client_names.insert("arm-7.cell-7.local".into(), "arm-7".into());
        config.tls.client_names.insert("unregistered.cell-7.local".into(), "arm-8".into());
    })
    .await;
    app.register("arm-7", "normal").await;
    (app, ca, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_identifies_its_robot() {
    let (app, ca, _dir) = start_with_client_ca(false).await;
    let mut request = robot_request(7);
    let app = &app;
    let infer = |client: reqwest::Client, request: vla_api::InferenceRequest| async move {
        client.post(app.url("/v1/inference")).json(&request).send().await
    };
    // Mapped by SAN (the CN here is something else).
    let arm7 = client_with(app, ca.client("robot arm seven", "arm-7.cell-7.local"));
    assert_eq!(infer(arm7.clone(), request.clone()).await.unwrap().status(), StatusCode::OK);
    // Mapped by subject CN.
    let by_cn = client_with(app, ca.client("arm-7.cell-7.local", "elsewhere.example"));
    assert_eq!(infer(by_cn, request.clone()).await.unwrap().status(), StatusCode::OK);
    // Acting as another robot.
    request.robot_id = "arm-1".into();
    assert_eq!(infer(arm7.clone(), request.clone()).await.unwrap().status(), StatusCode::FORBIDDEN);
    request.robot_id = "arm-7".into();
    // A certificate whose name maps to no robot, or to a robot not registered.
    for san in ["arm-9.cell-7.local", "unregistered.cell-7.local"] {
        let (status, body) =
            error_of(infer(client_with(app, ca.client(san, san)), request.clone()).await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{san}: {body}");
    }
    // A key and a certificate of different robots together: refused.
    let arm1_key = app.robot_key("arm-1").await;
    let both = arm7.post(app.url("/v1/inference")).header("x-api-key", arm1_key).json(&request).send().await.unwrap();
    assert_eq!(both.status(), StatusCode::FORBIDDEN);
    // A certificate from another CA does not get past the handshake.
    let stranger = client_with(app, Ca::new("someone else").client("x", "arm-7.cell-7.local"));
    assert!(infer(stranger, request.clone()).await.is_err());
    // Revocation applies to certificates too.
    app.admin(Method::DELETE, "/admin/robots/arm-7").send().await.unwrap();
    assert_eq!(infer(arm7, request).await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_certificates_are_required_a_robot_key_alone_is_refused() {
    let (app, ca, _dir) = start_with_client_ca(true).await;
    let request = robot_request(7);
    let key = app.robot_key("arm-1").await;
    let mut by_key = robot_request(1);
    by_key.robot_id = "arm-1".into();
    let (status, body) = error_of(
        app.client.post(app.url("/v1/inference")).header("x-api-key", key).json(&by_key).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("client certificate"), "{body}");
    let arm7 = client_with(&app, ca.client("arm-7.cell-7.local", "arm-7.cell-7.local"));
    assert_eq!(arm7.post(app.url("/v1/inference")).json(&request).send().await.unwrap().status(), StatusCode::OK);
    // The admin token still works without a certificate; health stays public.
    assert_eq!(app.admin(Method::GET, "/admin/robots").send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cell.pem"), dir.path().join("cell.key"));
    let issue = || {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (c.cert.pem(), c.key_pair.serialize_pem())
    };
    let (first, first_key) = issue();
    std::fs::write(&cert, &first).unwrap();
    std::fs::write(&key, &first_key).unwrap();
    let app = TestAppliance::start(|config, _| {
        config.tls.cert = Some(cert.clone());
        config.tls.key = Some(key.clone());
        config.tls.reload_interval_ms = 100;
    })
    .await;
    let (second, second_key) = issue();
    // Write the key first, then the certificate: between the two the pair does not match, and
    // the appliance keeps serving the first one.
    std::fs::write(&key, &second_key).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), StatusCode::OK);
    std::fs::write(&cert, &second).unwrap();
    let trusting_second = https_client(&cert, app.addr);
    let start = Instant::now();
    loop {
        if let Ok(r) = trusting_second.get(app.url("/health")).send().await {
            assert_eq!(r.status(), StatusCode::OK);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the new certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections no longer get the first certificate.
    let trusting_first = {
        let path = dir.path().join("first.pem");
        std::fs::write(&path, &first).unwrap();
        https_client(&path, app.addr)
    };
    assert!(trusting_first.get(app.url("/health")).send().await.is_err());
}

/// `appliance robot-key`'s output, as an operator runs it: (the key, the robots file's entry).
fn robot_key_entry(robot_id: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["robot-key", robot_id, "--type", "ur5e", "--group", "cell-07", "--key-file"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let key = std::fs::read_to_string(&key_file).unwrap().trim().to_string();
    (key, String::from_utf8(out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robots_declared_in_the_robots_file_are_served_only_the_file_changes_their_keys_and_revocations_stick() {
    let (key1, entry1) = robot_key_entry("arm-1");
    let (key2, entry2) = robot_key_entry("arm-2");
    // `vlak_<key id>_<secret>`: the secret is URL-safe base64 and may hold `_` itself.
    let secret = key1.splitn(3, '_').nth(2).unwrap();
    assert!(secret.len() >= 32, "{key1}");
    assert!(!entry1.contains(secret), "the entry holds the key's hash only: {entry1}");
    // Relative paths are under the data directory.
    let app = TestAppliance::start(|config, _| {
        config.auth.robots_file = Some("robots.toml".into());
        std::fs::write(config.data.dir.join("robots.toml"), format!("{entry1}{entry2}")).unwrap();
    })
    .await;
    let post = |key: &str, seed: u8| {
        app.client.post(app.url("/v1/inference")).header("x-api-key", key.to_string()).json(&robot_request(seed)).send()
    };
    assert_eq!(post(&key1, 1).await.unwrap().status(), StatusCode::OK);
    assert_eq!(post(&key2, 2).await.unwrap().status(), StatusCode::OK);
    let robots: Value = app.admin(Method::GET, "/admin/robots").send().await.unwrap().json().await.unwrap();
    let arm1 = robots["robots"].as_array().unwrap().iter().find(|r| r["robot_id"] == "arm-1").unwrap().clone();
    assert_eq!((arm1["declared"].clone(), arm1["group"].clone()), (json!(true), json!("cell-07")), "{arm1}");
    // The admin API leaves their keys to the file.
    let (status, body) =
        error_of(app.admin(Method::POST, "/admin/robots/arm-1/rotate-key").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("robots file"), "{body}");
    // arm-2 dropped from the file and arm-1 given a new key: at the next start (a ConfigMap
    // change rolls the pod likewise) arm-2 is revoked and arm-1's old key stops working.
    let (key1b, entry1b) = robot_key_entry("arm-1");
    std::fs::write(app.data.path().join("robots.toml"), entry1b).unwrap();
    let app = app.restart().await;
    let post = |key: &str, seed: u8| {
        app.client.post(app.url("/v1/inference")).header("x-api-key", key.to_string()).json(&robot_request(seed)).send()
    };
    assert_eq!(post(&key1, 1).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(post(&key1b, 1).await.unwrap().status(), StatusCode::OK);
    assert_eq!(post(&key2, 2).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A compromised robot is revoked through the API at once, and the unchanged file does not
    // bring its key back at the next start.
    assert_eq!(app.admin(Method::DELETE, "/admin/robots/arm-1").send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(post(&key1b, 1).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let app = app.restart().await;
    let r = app.client.post(app.url("/v1/inference")).header("x-api-key", key1b.clone()).json(&robot_request(1)).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::UNAUTHORIZED);
    // A broken file stops the start, naming it.
    std::fs::write(app.data.path().join("robots.toml"), "[[robot]]\nid = \"arm 1\"\n").unwrap();
    let data = app.stop_keeping_data().await;
    let mut config = test_config(data.path());
    config.auth.robots_file = Some("robots.toml".into());
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("auth.robots_file") && e.contains("robots.toml"), "{e}");
}
