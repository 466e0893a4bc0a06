//! Streaming sessions: openpi WebSocket sessions and gRPC `ModelStreamInfer` streams, each
//! counted in all and per robot (`server.websocket_max_sessions`,
//! `server.websocket_sessions_per_robot`; taken before the upgrade or the first message), and
//! the messages a second one session may send (`server.websocket_messages_per_s`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The open sessions: in all, and per robot.
#[derive(Debug)]
pub struct Sessions {
    total: Arc<Semaphore>,
    per_robot: Mutex<HashMap<String, usize>>,
    per_robot_limit: usize,
}

/// One open session; gives its places back when dropped.
#[derive(Debug)]
pub struct SessionPermit {
    _total: OwnedSemaphorePermit,
    sessions: Arc<Sessions>,
    robot: String,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut per = self.sessions.per_robot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = per.get_mut(&self.robot) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.robot);
            }
        }
    }
}

impl Sessions {
    pub fn new(total: usize, per_robot: usize) -> Arc<Sessions> {
        Arc::new(Sessions {
            total: Arc::new(Semaphore::new(total)),
            per_robot: Mutex::new(HashMap::new()),
            per_robot_limit: per_robot,
        })
    }

    pub fn acquire(self: &Arc<Self>, robot: &str) -> Result<SessionPermit, ApiError> {
        let mut per = self.per_robot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = per.get(robot).copied().unwrap_or(0);
        if mine >= self.per_robot_limit {
            return Err(ApiError::TooManySessions { robot: robot.to_string(), limit: self.per_robot_limit });
        }
        let total = self.total.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded)?;
        per.insert(robot.to_string(), mine + 1);
        Ok(SessionPermit { _total: total, sessions: self.clone(), robot: robot.to_string() })
    }
}

/// Messages a second on one session, counted per whole second since it opened.
#[derive(Debug)]
pub struct Rate {
    second: u64,
    count: u32,
    per_s: u32,
}

impl Rate {
    pub fn new(per_s: u32) -> Rate {
        Rate { second: 0, count: 0, per_s }
    }

    pub fn per_s(&self) -> u32 {
        self.per_s
    }

    /// Counts one more message of a session opened at `opened`; false over the rate.
    pub fn admit(&mut self, opened: Instant) -> bool {
        let second = opened.elapsed().as_secs();
        if second != self.second {
            (self.second, self.count) = (second, 0);
        }
        self.count += 1;
        self.count <= self.per_s
    }
}
