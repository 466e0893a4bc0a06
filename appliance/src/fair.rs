//! Fair shares among robots: the CPU slots that parse request bodies and decode camera images
//! ([`FairSlots`]), and each robot's requests in flight ([`PerRobot`]). One robot, however
//! many requests it sends, takes at most its share, so the others keep being served.
//!
//! [`Shares`] is the pure state of the slots, without threads or clocks, like the batching
//! queue. Its invariants:
//! - `in_use` equals the sum of `held`, and never exceeds `capacity`;
//! - no robot holds more than `per_robot`;
//! - a waiter is granted only when a slot is free and its robot is under `per_robot`;
//! - among the robots waiting, the one holding the fewest slots is granted first (then the one
//!   granted longest ago), FIFO within a robot; so a robot with a thousand queued requests
//!   cannot keep a robot with one waiting behind them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::oneshot;

/// The slots' pure state; see the module header.
#[derive(Debug)]
pub struct Shares<W> {
    capacity: usize,
    per_robot: usize,
    in_use: usize,
    held: HashMap<String, usize>,
    waiting: BTreeMap<String, VecDeque<W>>,
    /// When each robot was last granted a slot (a counter, not a clock).
    last_grant: HashMap<String, u64>,
    grants: u64,
}

impl<W> Shares<W> {
    pub fn new(capacity: usize, per_robot: usize) -> Shares<W> {
        Shares {
            capacity: capacity.max(1),
            per_robot: per_robot.clamp(1, capacity.max(1)),
            in_use: 0,
            held: HashMap::new(),
            waiting: BTreeMap::new(),
            last_grant: HashMap::new(),
            grants: 0,
        }
    }

    fn may_take(&self, robot: &str) -> bool {
        self.in_use < self.capacity && self.held.get(robot).copied().unwrap_or(0) < self.per_robot
    }

    fn take(&mut self, robot: &str) {
        self.in_use += 1;
        *self.held.entry(robot.to_string()).or_insert(0) += 1;
        self.grants += 1;
        self.last_grant.insert(robot.to_string(), self.grants);
    }

    /// Takes a slot for `robot` at once (`true`, and `waiter` is dropped), or queues `waiter`
    /// until [`Shares::grant_next`] grants it one (`false`).
    pub fn acquire(&mut self, robot: &str, waiter: W) -> bool {
        // Nobody of this robot waits ahead, and the rule allows it: at once.
        if !self.waiting.contains_key(robot) && self.may_take(robot) {
            self.take(robot);
            return true;
        }
        self.waiting.entry(robot.to_string()).or_default().push_back(waiter);
        false
    }

    /// Gives back one of `robot`'s slots.
    pub fn release(&mut self, robot: &str) {
        self.in_use = self.in_use.saturating_sub(1);
        if let Some(n) = self.held.get_mut(robot) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(robot);
                if !self.waiting.contains_key(robot) {
                    self.last_grant.remove(robot);
                }
            }
        }
    }

    /// The next waiter to grant a slot to, with its robot, by the rule of the module header;
    /// the slot is taken for it. `None` when no slot is free or no eligible robot waits.
    pub fn grant_next(&mut self) -> Option<(String, W)> {
        let robot = self
            .waiting
            .keys()
            .filter(|r| self.may_take(r))
            .min_by_key(|r| (self.held.get(*r).copied().unwrap_or(0), self.last_grant.get(*r).copied().unwrap_or(0)))?
            .clone();
        let queue = self.waiting.get_mut(&robot)?;
        let waiter = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&robot);
        }
        self.take(&robot);
        Some((robot, waiter))
    }

    /// Drops the waiters `gone` says have given up (deadline passed, client went away).
    pub fn forget(&mut self, gone: impl Fn(&W) -> bool) {
        self.waiting.retain(|_, q| {
            q.retain(|w| !gone(w));
            !q.is_empty()
        });
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn held_by(&self, robot: &str) -> usize {
        self.held.get(robot).copied().unwrap_or(0)
    }
}

/// The CPU slots, shared fairly by robot. Async: a request waits for its slot until its
/// deadline.
#[derive(Debug)]
pub struct FairSlots {
    shares: Mutex<Shares<oneshot::Sender<()>>>,
}

/// One slot, given back (and passed to the next waiter) on drop.
#[derive(Debug)]
pub struct FairSlot {
    slots: Arc<FairSlots>,
    robot: String,
}

impl FairSlots {
    pub fn new(capacity: usize, per_robot: usize) -> Arc<FairSlots> {
        Arc::new(FairSlots { shares: Mutex::new(Shares::new(capacity, per_robot)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shares<oneshot::Sender<()>>> {
        self.shares.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for `robot`, waiting until `deadline` at most (`None` then). A waiter dropped
    /// while it waits (its client went away) never holds a slot.
    pub async fn acquire(self: &Arc<Self>, robot: &str, deadline: Instant) -> Option<FairSlot> {
        let (tx, mut rx) = oneshot::channel();
        let slot = || FairSlot { slots: self.clone(), robot: robot.to_string() };
        if self.lock().acquire(robot, tx) {
            return Some(slot());
        }
        tokio::select! {
            granted = &mut rx => return granted.ok().map(|()| slot()),
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
        // Past the deadline. Under the lock, a grant either happened (then it is ours) or can
        // no longer happen: `grant_next` only sends while holding the lock, and fails once closed.
        let mut shares = self.lock();
        rx.close();
        if rx.try_recv().is_ok() {
            drop(shares);
            return Some(slot());
        }
        shares.forget(oneshot::Sender::is_closed);
        None
    }

    /// Grants freed slots to waiters still waiting.
    fn pass_on(&self) {
        let mut shares = self.lock();
        while let Some((robot, waiter)) = shares.grant_next() {
            if waiter.send(()).is_ok() {
                continue;
            }
            // That waiter gave up meanwhile: its slot is free again.
            shares.release(&robot);
        }
    }

    pub fn in_use(&self) -> usize {
        self.lock().in_use()
    }
}

impl Drop for FairSlot {
    fn drop(&mut self) {
        self.slots.lock().release(&self.robot);
        self.slots.pass_on();
    }
}

/// Each robot's requests in flight, at most `max` at once.
#[derive(Debug)]
pub struct PerRobot {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// One request in flight, counted down on drop.
#[derive(Debug)]
pub struct Entered {
    per_robot: Arc<PerRobot>,
    robot: String,
}

impl PerRobot {
    pub fn new(max: usize) -> Arc<PerRobot> {
        Arc::new(PerRobot { max, counts: Mutex::new(HashMap::new()) })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Counts a request of `robot` in, unless it already has `max` in flight.
    pub fn enter(self: &Arc<Self>, robot: &str) -> Option<Entered> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(robot.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Entered { per_robot: self.clone(), robot: robot.to_string() })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut counts = self.per_robot.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.robot) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.robot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_robot_takes_at_most_its_share_and_waiters_are_granted_by_fewest_held() {
        let mut s: Shares<u32> = Shares::new(4, 2);
        assert!(s.acquire("flood", 1));
        assert!(s.acquire("flood", 2));
        // Its share is two of four: the flood's next requests wait though slots are free.
        assert!(!s.acquire("flood", 3));
        assert!(!s.acquire("flood", 4));
        assert_eq!(s.held_by("flood"), 2);
        assert!(s.acquire("victim", 10), "a free slot is the victim's at once");
        assert!(s.acquire("other", 20));
        assert_eq!(s.in_use(), 4);
        // Full now: the victim's next request queues behind the flood's two.
        assert!(!s.acquire("victim", 11));
        s.release("flood");
        // The flood (2 → 1 held) and the victim (1 held) both wait; ties go to the one
        // granted longest ago: the flood's last grant was before the victim's.
        assert_eq!(s.grant_next(), Some(("flood".into(), 3)));
        s.release("other");
        assert_eq!(s.grant_next(), Some(("victim".into(), 11)));
        assert_eq!(s.grant_next(), None, "no slot is free");
    }

    #[test]
    fn waiters_that_gave_up_are_forgotten() {
        let mut s: Shares<u32> = Shares::new(1, 1);
        assert!(s.acquire("a", 1));
        assert!(!s.acquire("b", 2));
        assert!(!s.acquire("b", 3));
        s.forget(|w| *w == 2);
        s.release("a");
        assert_eq!(s.grant_next(), Some(("b".into(), 3)));
    }

    #[tokio::test]
    async fn a_slot_waits_until_its_deadline_and_passes_on_when_dropped() {
        let slots = FairSlots::new(1, 1);
        let first = slots.acquire("a", Instant::now() + std::time::Duration::from_secs(1)).await.unwrap();
        let late = slots.acquire("b", Instant::now() + std::time::Duration::from_millis(20)).await;
        assert!(late.is_none(), "the deadline passed while the slot was held");
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("b", Instant::now() + std::time::Duration::from_secs(5)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(first);
        let second = waiting.await.unwrap();
        assert!(second.is_some());
        assert_eq!(slots.in_use(), 1);
        drop(second);
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn a_robot_has_at_most_max_requests_in_flight() {
        let per_robot = PerRobot::new(2);
        let a = per_robot.enter("a").unwrap();
        let _b = per_robot.enter("a").unwrap();
        assert!(per_robot.enter("a").is_none());
        assert!(per_robot.enter("b").is_some());
        drop(a);
        assert!(per_robot.enter("a").is_some());
    }
}
