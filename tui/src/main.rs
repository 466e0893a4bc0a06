//! `vla-console`: watch an appliance live and manage its policies from a terminal.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use ratatui::crossterm::event::{self, Event as TermEvent, KeyEventKind};
use vla_console::app::{App, Status};
use vla_console::client::{Connection, Trust, now_ms, parse_pin};
use vla_console::poller::{self, Event};
use vla_console::ui;

/// Operator console for the VLA appliance.
///
/// Trusts the appliance by its CA file (`--ca-file`, default `data/tls/cert.pem`, the
/// self-signed certificate `scripts/run.sh` generates) or by the certificate's SHA-256
/// fingerprint (`--pin-sha256`, as the appliance logs it at start); never without either.
#[derive(Debug, Parser)]
#[command(name = "vla-console", version)]
struct Args {
    /// The appliance's HTTPS address.
    #[arg(long, env = "VLA_CONSOLE_URL", default_value = "https://127.0.0.1:8443")]
    url: String,
    /// The admin token (prefer --token-file: command lines are visible to other users).
    #[arg(long, env = "VLA_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the admin token.
    #[arg(long, default_value = "data/admin.token")]
    token_file: PathBuf,
    /// PEM certificates to trust (a CA, or the appliance's self-signed certificate).
    #[arg(long, conflicts_with = "pin_sha256")]
    ca_file: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 fingerprint (hex, colons optional).
    #[arg(long)]
    pin_sha256: Option<String>,
    /// How often to poll, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    interval_ms: u64,
    /// Time limit of each request to the appliance, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    timeout_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = match args.token.clone() {
        Some(t) => t,
        None => std::fs::read_to_string(&args.token_file)
            .with_context(|| {
                format!(
                    "admin token: give --token, VLA_ADMIN_TOKEN or --token-file (reading {})",
                    args.token_file.display()
                )
            })?
            .trim()
            .to_string(),
    };
    if token.is_empty() {
        bail!("the admin token is empty");
    }
    let trust = match (&args.pin_sha256, &args.ca_file) {
        (Some(pin), _) => Trust::Pin(parse_pin(pin).context("--pin-sha256")?),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => {
            let default = PathBuf::from("data/tls/cert.pem");
            if !default.exists() {
                bail!(
                    "no way to verify the appliance: give --ca-file or --pin-sha256 (and {} does not exist)",
                    default.display()
                );
            }
            Trust::CaFile(default)
        }
    };
    let connection = Connection::new(&args.url, token, &trust, Duration::from_millis(args.timeout_ms))?;
    let (events_tx, events) = mpsc::sync_channel(poller::EVENTS);
    let commands = poller::spawn(connection.clone(), Duration::from_millis(args.interval_ms), events_tx)?;

    // Restores the terminal on return, error or panic (ratatui's init installs the hook).
    let mut terminal = ratatui::init();
    let mut app = App::new(connection.base());
    let result = (|| -> anyhow::Result<()> {
        loop {
            while let Ok(event) = events.try_recv() {
                match event {
                    Event::Snapshot(s) => app.ingest(*s),
                    Event::PollFailed(e) => app.poll_failed(e),
                    Event::ActionDone(r) => app.action_done(r),
                }
            }
            app.now_ms = now_ms();
            terminal.draw(|frame| ui::draw(frame, &app))?;
            if event::poll(Duration::from_millis(100))?
                && let TermEvent::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
                && let Some(command) = app.on_key(key)
                && commands.try_send(command).is_err()
            {
                let text = "too many actions waiting for the appliance; try again".into();
                app.status = Some(Status { text, error: true, at_ms: app.now_ms });
            }
            if app.quit {
                return Ok(());
            }
        }
    })();
    ratatui::restore();
    result
}
