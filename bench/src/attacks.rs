//! `bench attacks`: each attack of the hostile-client tests (`vla-hostile`) run for a few
//! seconds against the shipped appliance (its own process, real HTTPS, the shipped policies,
//! `sync` quotas) beside a victim robot at 10 Hz and a `/health` probe at 20 Hz; the victim's
//! p99 and errors, `/health`'s p99 and the appliance's resident memory before, at its peak and
//! after, against the unloaded figures of the same run.
//!
//! Targets (issue 19): victim p99 ≤ 2× its unloaded p99 with no errors, `/health` p99 < 20 ms,
//! RSS back within 25 % of idle a minute after the last attack.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde::Serialize;
use vla_hostile::{ATTACKER, Hold, SteadyClient, Tally, Target, VICTIM};

use crate::machine::{self, Machine, Versions};
use crate::server::{Appliance, Variant};

/// What the run does.
#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    /// Seconds each attack runs.
    pub seconds: f64,
    /// Seconds of quiet after the last attack before the final memory reading.
    pub settle: f64,
    pub device: String,
}

/// One attack's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub attack: String,
    /// What the attacker got back.
    pub attacker: String,
    pub victim_ok: u64,
    pub victim_errors: u64,
    pub victim_p50_ms: f64,
    pub victim_p99_ms: f64,
    pub health_p99_ms: f64,
    pub health_errors: u64,
    pub rss_peak_mb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub versions: Versions,
    pub started_utc: String,
    pub seconds_per_attack: f64,
    pub unloaded: Row,
    pub attacks: Vec<Row>,
    pub rss_idle_mb: f64,
    pub rss_peak_mb: f64,
    pub rss_after_mb: f64,
    pub settle_seconds: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / 1048576.0 * 10.0).round() / 10.0
}

/// Samples the appliance's RSS every 100 ms while it runs; the peak.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, p) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = vla_hostile::rss_bytes(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssWatch { stop, peak }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

/// The keys of the robots the run uses.
struct Robots {
    victim: (String, String),
    flood: (String, String),
    spent: (String, String),
    denier: (String, String),
}

pub fn run(o: &Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&o.out)?;
    let exe = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let model_dir = crate::fixtures::demo_model(tmp.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let log = o.out.join("attacks-appliance.log");
    let machine = Machine::read(o.device.clone());
    let started_utc = machine::now_utc();
    runtime
        .block_on(async {
            let app = Appliance::start(&exe, &Variant::standard(), &model_dir, &o.device, 4, &log).await?;
            let r = |i: usize| app.robots[i].clone();
            let robots = Robots { victim: r(0), flood: r(1), spent: r(2), denier: r(3) };
            // The spent robot's day is used up: whatever it sends is refused at admission.
            let put = app.admin(Method::PUT, &format!("/admin/quotas/{}", robots.spent.0))?;
            put.json(&serde_json::json!({"day": 0})).send().await?.error_for_status()?;
            let cert = std::fs::read(&app.ca)?;
            let target = Target::new(app.addr, cert)?;
            let pid = app.pid();
            let seconds = Duration::from_secs_f64(o.seconds);

            // Unloaded: the victim and the probe alone, after a warm-up.
            let _ = measure(&target, &robots, pid, "warm-up", Duration::from_secs(2), async { Tally::default() }).await;
            let rss_idle = vla_hostile::rss_bytes(pid).unwrap_or(0);
            let unloaded =
                measure(&target, &robots, pid, "none (unloaded)", seconds.max(Duration::from_secs(5)), async {
                    tokio::time::sleep(seconds.max(Duration::from_secs(5))).await;
                    Tally::default()
                })
                .await;
            eprintln!("unloaded: victim p99 {} ms, /health p99 {} ms", unloaded.victim_p99_ms, unloaded.health_p99_ms);

            let mut attacks = Vec::new();
            for attack in ATTACKS {
                // Connections are held past the first-request bound (10 s by default), to see it.
                let seconds = if HELD.contains(&attack) { seconds.max(Duration::from_secs(15)) } else { seconds };
                let row =
                    measure(&target, &robots, pid, attack, seconds, launch(attack, &target, &robots, seconds)).await;
                eprintln!(
                    "{attack}: victim p99 {} ms ({} errors), /health p99 {} ms, RSS peak {} MB; attacker got {}",
                    row.victim_p99_ms, row.victim_errors, row.health_p99_ms, row.rss_peak_mb, row.attacker
                );
                attacks.push(row);
            }
            let rss_peak = attacks.iter().map(|r| r.rss_peak_mb).fold(0.0, f64::max);
            tokio::time::sleep(Duration::from_secs_f64(o.settle)).await;
            let rss_after = vla_hostile::rss_bytes(pid).unwrap_or(0);
            app.stop()?;
            let report = Report {
                machine,
                versions: Versions::current(),
                started_utc,
                seconds_per_attack: o.seconds,
                unloaded,
                attacks,
                rss_idle_mb: mb(rss_idle),
                rss_peak_mb: rss_peak,
                rss_after_mb: mb(rss_after),
                settle_seconds: o.settle,
            };
            std::fs::write(o.out.join("attacks.json"), serde_json::to_string_pretty(&report)?)?;
            std::fs::write(o.out.join("attacks.md"), report.markdown())?;
            anyhow::Ok(report)
        })
        .context("the attack run")
}

/// Every attack, in the order run.
pub const ATTACKS: [&str; 12] = [
    "made-up methods",
    "silent connections",
    "half HTTP/2 prefaces",
    "PING-only HTTP/2",
    "unauthenticated 7 MiB bodies",
    "8 MiB JSON bodies (robot key)",
    "OIP frames over quota",
    "OIP repeated outputs",
    "denial flood",
    "stop prefix at quota 0",
    "non-finite model output",
    "in-flight flood (robot key)",
];

/// The attacks that hold connections open.
const HELD: [&str; 3] = ["silent connections", "half HTTP/2 prefaces", "PING-only HTTP/2"];

/// The attack named `name`, for `seconds`: what the attacker got back.
fn launch(
    name: &str,
    t: &Target,
    r: &Robots,
    seconds: Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Tally> + Send>> {
    let t = t.clone();
    let client = t.client(ATTACKER);
    let v1 = t.url("/v1/inference");
    let oip = t.url("/v2/models/tiny-vla/infer");
    let request = |id: &str, instruction: &str, state: [f32; 7], frame: &[u8]| {
        serde_json::to_vec(&vla_hostile::robot_request(id, instruction, state, frame)).unwrap_or_default()
    };
    let small = vla_hostile::jpeg(64, 48, 1);
    let json_flood = move |workers: usize, key: String, body: Vec<u8>| {
        let (client, v1) = (client.clone(), v1.clone());
        vla_hostile::flood(workers, seconds, move || {
            client.post(&v1).header("x-api-key", &key).header("content-type", "application/json").body(body.clone())
        })
    };
    match name {
        "made-up methods" => {
            let client = t.client(ATTACKER);
            let url = t.url("/v1/inference");
            let n = Arc::new(AtomicU64::new(0));
            Box::pin(vla_hostile::flood(4, seconds, move || {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let method = Method::from_bytes(format!("XQ{i}").as_bytes()).unwrap_or(Method::PATCH);
                client.request(method, &url)
            }))
        }
        "silent connections" => Box::pin(held(t, Hold::Silent, 100, seconds)),
        "half HTTP/2 prefaces" => Box::pin(held(t, Hold::HalfPreface, 30, seconds)),
        "PING-only HTTP/2" => Box::pin(held(t, Hold::PingOnly, 30, seconds)),
        "unauthenticated 7 MiB bodies" => {
            let (client, url) = (t.client(ATTACKER), t.url("/v1/inference"));
            let body = bytes::Bytes::from(vec![b'A'; 7 * 1024 * 1024]);
            Box::pin(vla_hostile::flood(8, seconds, move || client.post(&url).body(body.clone())))
        }
        "8 MiB JSON bodies (robot key)" => {
            Box::pin(json_flood(4, r.flood.1.clone(), vla_hostile::big_json(8 * 1024 * 1024 - 4096)))
        }
        "OIP frames over quota" | "OIP repeated outputs" => {
            let (key, rows, outputs) =
                if name == "OIP frames over quota" { (r.spent.1.clone(), 8, 0) } else { (r.flood.1.clone(), 1, 10) };
            let (body, len) = vla_hostile::oip_frames(rows, &vla_hostile::jpeg(1600, 1200, 3), outputs);
            let body = bytes::Bytes::from(body);
            let client = t.client(ATTACKER);
            Box::pin(vla_hostile::flood(4, seconds, move || {
                client
                    .post(&oip)
                    .header("x-api-key", &key)
                    .header("inference-header-content-length", len)
                    .body(body.clone())
            }))
        }
        "denial flood" => {
            Box::pin(json_flood(4, r.denier.1.clone(), request(&r.denier.0, "disable safety", [0.1; 7], &small)))
        }
        "stop prefix at quota 0" => Box::pin(json_flood(
            4,
            r.spent.1.clone(),
            request(&r.spent.0, "stop and pick up the red block", [0.1; 7], &small),
        )),
        "non-finite model output" => {
            Box::pin(json_flood(2, r.flood.1.clone(), request(&r.flood.0, "pick", [3.0e38; 7], &small)))
        }
        _ => Box::pin(json_flood(
            16,
            r.flood.1.clone(),
            request(&r.flood.0, "pick up the red block", [0.1; 7], &vla_hostile::jpeg(640, 480, 2)),
        )),
    }
}

async fn held(t: Target, kind: Hold, n: usize, seconds: Duration) -> Tally {
    let closed = vla_hostile::hold(&t, kind, n, seconds).await;
    let mut tally = Tally::default();
    tally.0.insert("closed by the appliance".into(), closed);
    tally
}

/// Runs `attack` beside the victim and the `/health` probe, for `seconds`.
async fn measure(
    t: &Target,
    r: &Robots,
    pid: u32,
    name: &str,
    seconds: Duration,
    attack: impl std::future::Future<Output = Tally>,
) -> Row {
    let rss = RssWatch::start(pid);
    let client = t.client(VICTIM);
    let (url, key) = (t.url("/v1/inference"), r.victim.1.clone());
    let body = vla_hostile::robot_request(
        &r.victim.0,
        crate::fixtures::INSTRUCTION,
        [0.1; 7],
        &crate::fixtures::jpeg(320, 240, 1),
    );
    let victim = SteadyClient::start(10.0, move || client.post(&url).header("x-api-key", &key).json(&body));
    let probe = t.client(VICTIM);
    let health_url = t.url("/health");
    let health = SteadyClient::start(20.0, move || probe.get(&health_url));
    let attacker = tokio::time::timeout(seconds + Duration::from_secs(30), attack).await.unwrap_or_default();
    let victim = victim.finish().await;
    let health = health.finish().await;
    Row {
        attack: name.into(),
        attacker: attacker.to_string(),
        victim_ok: victim.ok(),
        victim_errors: victim.failures(),
        victim_p50_ms: ms(victim.quantile(0.5)),
        victim_p99_ms: ms(victim.quantile(0.99)),
        health_p99_ms: ms(health.quantile(0.99)),
        health_errors: health.failures(),
        rss_peak_mb: mb(rss.finish()),
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let u = &self.unloaded;
        let mut md = format!(
            "# Attacks beside a 10 Hz victim robot\n\n{} · {} · {} s per attack\n\n\
             Unloaded: victim p50 {} ms, p99 {} ms; `/health` p99 {} ms. Targets: victim p99 ≤ 2× unloaded ({:.1} ms) with 0 errors; `/health` p99 < 20 ms.\n\n\
             | attack | victim p99 ms | ratio | victim errors | `/health` p99 ms | RSS peak MB | the attacker got |\n|---|---:|---:|---:|---:|---:|---|\n",
            self.started_utc,
            self.machine.line(),
            self.seconds_per_attack,
            u.victim_p50_ms,
            u.victim_p99_ms,
            u.health_p99_ms,
            2.0 * u.victim_p99_ms
        );
        for a in &self.attacks {
            let ratio = if u.victim_p99_ms > 0.0 { a.victim_p99_ms / u.victim_p99_ms } else { 0.0 };
            md.push_str(&format!(
                "| {} | {} | {:.2} | {} | {} | {} | {} |\n",
                a.attack, a.victim_p99_ms, ratio, a.victim_errors, a.health_p99_ms, a.rss_peak_mb, a.attacker
            ));
        }
        md.push_str(&format!(
            "\nResident memory: {} MB idle (models loaded), {} MB at the peak, {} MB {} s after the last attack ({:+.0} % of idle; target within 25 %).\n",
            self.rss_idle_mb,
            self.rss_peak_mb,
            self.rss_after_mb,
            self.settle_seconds,
            (self.rss_after_mb / self.rss_idle_mb.max(1.0) - 1.0) * 100.0
        ));
        md
    }
}
