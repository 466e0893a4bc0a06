//! `appliance`: loads the configuration, binds the listener and runs until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// jemalloc returns freed memory to the system (see the workspace's Cargo.toml); libtorch's own
/// allocations stay with the C allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Edge inference appliance for robot cells.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `APPLIANCE_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the configuration, print it and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate the demo model `tiny-vla` into a model repository and exit.
    Demo {
        /// The repository; the configured one (`models.repository`) when absent.
        #[arg(long)]
        into: Option<PathBuf>,
    },
    /// Maintain the quota store offline (stop the appliance first).
    Quota {
        #[command(subcommand)]
        action: QuotaAction,
    },
    /// Replay a candidate policy against the recorded requests (the replay ring), offline
    /// (stop the appliance first), and print which decisions would change, as JSON.
    Replay {
        /// The candidate component (`.wasm`).
        #[arg(long)]
        policy: PathBuf,
        /// The installed policy it stands in for (what it is shown and compared with); the
        /// file's name without `.wasm` by default.
        #[arg(long)]
        name: Option<String>,
        /// `safety` or `admission`.
        #[arg(long, default_value = "safety")]
        world: String,
        /// Its configuration: a JSON object, or a TOML table for a `.toml` file; `{}` when
        /// absent.
        #[arg(long = "policy-config")]
        policy_config: Option<PathBuf>,
        /// Only requests recorded at or after this time (Unix ms).
        #[arg(long)]
        since: Option<u64>,
        /// Most recorded requests to replay, newest first.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Ask the appliance on this machine for `GET /health` (the configured port on loopback,
    /// trusting exactly the certificate it serves); print the answer; exit 0 only for 200.
    /// For container health checks and service checks.
    Health {
        /// Where to ask instead of the configured listen address.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// How long to wait for the whole answer.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Make a key for a robot declared in the robots file (`auth.robots_file`): prints the
    /// file's entry, which holds only the key's hash, on stdout (`>> robots.toml`), and the key,
    /// for the robot alone, on stderr or into `--key-file`.
    RobotKey {
        robot_id: String,
        /// Write the key here (created with mode 0600; never overwritten) instead of stderr.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The robot's type (requests that send another are refused).
        #[arg(long = "type")]
        robot_type: String,
        #[arg(long, default_value = "default")]
        group: String,
        /// `high`, `normal` or `low`.
        #[arg(long, default_value = "normal")]
        priority: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum QuotaAction {
    /// Print every readable quota record as JSON (unreadable ones are listed on stderr).
    Export,
    /// Replace the quota records with an export (all are checked before any is written).
    Import { file: PathBuf },
    /// Forget all quota usage (every bucket full) and the admin API's limit overrides.
    Reset {
        /// Keep the limits set through `PUT /admin/quotas/{robot}`.
        #[arg(long)]
        keep_limits: bool,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APPLIANCE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // What the appliance writes is its own (the store, the key, the audit log), wherever it
    // runs, as the unit's `UMask=0077` makes it; the few files its group may read (the metrics
    // token, the certificate and its directory) get their modes explicitly. A model repository
    // made with `demo --into` is for whoever will serve it: the caller's umask.
    if !matches!(args.command, Some(Command::Demo { .. })) {
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
    // Needs no configuration: it may well make the first entry of a robots file not there yet.
    if let Some(Command::RobotKey { robot_id, key_file, robot_type, group, priority }) = &args.command {
        return robot_key(robot_id, key_file.as_deref(), robot_type, group, priority);
    }
    let config = appliance::Config::from_figment(&appliance::Config::figment(args.config.as_deref()))?;
    if args.check_config {
        println!("{}", toml::to_string_pretty(&config).context("printing the configuration")?);
        return Ok(());
    }
    match args.command {
        Some(Command::Quota { action }) => return quota(&config, action),
        Some(Command::Replay { policy, name, world, policy_config, since, limit }) => {
            let bytes = std::fs::read(&policy).with_context(|| format!("{}", policy.display()))?;
            let world: appliance::policy::World = world.parse().map_err(anyhow::Error::msg).context("--world")?;
            let policy_config = match &policy_config {
                None => serde_json::json!({}),
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                    if path.extension().is_some_and(|e| e == "toml") {
                        serde_json::to_value(
                            toml::from_str::<toml::Table>(&text).with_context(|| format!("{}", path.display()))?,
                        )?
                    } else {
                        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?
                    }
                }
            };
            let name = name
                .unwrap_or_else(|| policy.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
            let report = appliance::policy::replay::offline(
                &config.data.dir,
                &config.policy,
                &config.quota,
                &bytes,
                world,
                &policy_config,
                &name,
                since,
                limit,
            )
            .map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        Some(Command::Health { addr, timeout_ms }) => return health(&config, addr, timeout_ms),
        // Answered before the configuration was read.
        Some(Command::RobotKey { .. }) => return Ok(()),
        Some(Command::Demo { into }) => {
            let repository = into.unwrap_or_else(|| config.model_repository());
            std::fs::create_dir_all(&repository).with_context(|| format!("creating {}", repository.display()))?;
            appliance::demo::generate(&repository)?;
            eprintln!("generated {}", repository.join(appliance::demo::NAME).display());
            return Ok(());
        }
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("appliance-rt")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // A file-size limit reached (systemd's LimitFSIZE, a full quota) must fail the write,
        // which the store reports and recovers from, not kill the process: listening for
        // SIGXFSZ replaces its default action.
        #[cfg(target_os = "linux")]
        let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25))
            .context("listening for SIGXFSZ")?;
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding server.listen = {}", config.server.listen))?;
        appliance::run_with(config, listener, shutdown_signal(), systemd()).await?;
        Ok(())
    })
}

/// The service manager's notify socket, when there is one (`Type=notify`): `READY=1` once
/// serving, `WATCHDOG=1` at half the unit's `WatchdogSec`, `STOPPING=1` at shutdown. Without
/// `NOTIFY_SOCKET` nothing is sent.
fn systemd() -> appliance::Notify {
    use sd_notify::NotifyState;
    let mut usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
        .then(|| std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(1)));
    if let Some(every) = watchdog {
        tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog enabled");
    }
    let notify = Box::new(|event: appliance::Lifecycle| {
        let sent = match &event {
            appliance::Lifecycle::Serving { status } => {
                sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)])
            }
            appliance::Lifecycle::Alive => sd_notify::notify(false, &[NotifyState::Watchdog]),
            appliance::Lifecycle::Stopping => {
                sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status("stopping")])
            }
        };
        if let Err(e) = sent {
            tracing::warn!("telling systemd {event:?}: {e}");
        }
    });
    appliance::Notify { notify, watchdog }
}

fn health(config: &appliance::Config, addr: Option<std::net::SocketAddr>, timeout_ms: u64) -> anyhow::Result<()> {
    let addr = addr.unwrap_or_else(|| appliance::probe::local_addr(config));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let health =
        runtime.block_on(appliance::probe::health(config, addr, std::time::Duration::from_millis(timeout_ms)))?;
    println!("{}", health.body.trim());
    anyhow::ensure!(health.status == 200, "{addr} answered /health with {}", health.status);
    Ok(())
}

fn quota(config: &appliance::Config, action: QuotaAction) -> anyhow::Result<()> {
    use appliance::quota::offline;
    let store = appliance::store::Store::open(&config.data.dir)
        .context("opening the store (is the appliance still running?)")?;
    let db = &store.db()?;
    match action {
        QuotaAction::Export => {
            let (exported, skipped) = offline::export(db)?;
            for s in &skipped {
                eprintln!("skipped unreadable record {s}");
            }
            println!("{}", serde_json::to_string_pretty(&exported)?);
        }
        QuotaAction::Import { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}", file.display()))?;
            let n = offline::import(db, &value)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}", file.display()))?;
            eprintln!("imported {n} quota records");
        }
        QuotaAction::Reset { keep_limits } => {
            offline::reset(db, keep_limits)?;
            eprintln!(
                "quota usage forgotten{}",
                if keep_limits { "; limit overrides kept" } else { " and limit overrides removed" }
            );
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}; Ctrl-C still works");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
    }
}

/// `appliance robot-key`: the entry on stdout, the key on stderr or into a new 0600 file.
fn robot_key(
    robot_id: &str,
    key_file: Option<&std::path::Path>,
    robot_type: &str,
    group: &str,
    priority: &str,
) -> anyhow::Result<()> {
    let priority: vla_api::Priority = serde_json::from_value(serde_json::Value::String(priority.into()))
        .context("--priority: high, normal or low")?;
    let (key, entry) = appliance::robots::declared_entry(robot_id, robot_type, group, priority)?;
    match key_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("--key-file {}", path.display()))?;
            std::io::Write::write_all(&mut file, format!("{key}\n").as_bytes())
                .with_context(|| format!("--key-file {}", path.display()))?;
        }
        None => eprintln!("{robot_id}'s key (give it to the robot only; the entry below holds its hash):\n{key}"),
    }
    print!("{entry}");
    Ok(())
}
