//! The openpi sessions open: in all and per robot (`server.websocket_max_sessions`,
//! `server.websocket_sessions_per_robot`), taken before the upgrade.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
