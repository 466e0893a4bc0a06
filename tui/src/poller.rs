//! The background side: a thread with its own runtime polls the appliance at a fixed rate and
//! runs the operator's actions, so the UI thread never waits on the network.

use std::sync::mpsc;
use std::time::Duration;

use crate::client::{Command, Connection, Reply, Snapshot};

/// What the poller tells the UI.
#[derive(Debug)]
pub enum Event {
    Snapshot(Box<Snapshot>),
    PollFailed(String),
    ActionDone(Result<Reply, String>),
}

/// Events waiting for the UI at most: it drains them every 100 ms, so a full channel means the
/// UI is stuck, and the poller then waits rather than piling up snapshots.
pub const EVENTS: usize = 16;
/// Operator actions waiting to be sent at most (people type slower than this drains).
pub const COMMANDS: usize = 8;

/// Starts polling every `interval`; actions sent on the returned channel run at once, beside
/// the polls. Stops when the UI drops its receiver.
pub fn spawn(
    connection: Connection,
    interval: Duration,
    events: mpsc::SyncSender<Event>,
) -> std::io::Result<tokio::sync::mpsc::Sender<Command>> {
    let (commands, mut incoming) = tokio::sync::mpsc::channel::<Command>(COMMANDS);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("poller".into()).spawn(move || {
        runtime.block_on(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        let event = match connection.snapshot().await {
                            Ok(s) => Event::Snapshot(Box::new(s)),
                            Err(e) => Event::PollFailed(format!("{e:#}")),
                        };
                        // Blocks only while the UI is stuck (the channel is full).
                        if events.send(event).is_err() {
                            return;
                        }
                    }
                    command = incoming.recv() => {
                        let Some(command) = command else { return };
                        let (connection, events) = (connection.clone(), events.clone());
                        tokio::spawn(async move {
                            let _ = events.send(Event::ActionDone(connection.run(command).await));
                        });
                        // Show the change at once rather than at the next tick.
                        ticks.reset_after(Duration::from_millis(300));
                    }
                }
            }
        });
    })?;
    Ok(commands)
}
