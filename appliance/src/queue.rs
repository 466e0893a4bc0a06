//! The batching state machine of one model: a bounded queue per priority class and the rule
//! that decides when queued requests become a batch.
//!
//! Pure state, no clock and no threads: every decision takes `now`, so tests drive time by
//! hand. The batcher (`batcher.rs`) owns one of these behind a mutex and acts on its answers.
//!
//! Invariants:
//! - at most `capacity` entries are held, whatever their class;
//! - `high` entries leave before `normal`, `normal` before `low`; FIFO within a class;
//! - an entry leaves exactly once: in a batch, as expired (deadline passed while queued), as
//!   abandoned (its client gave up), or as evicted (a more urgent entry took its place in a
//!   full queue); expired, abandoned and evicted entries are never batched;
//! - an entry whose batch was due before its deadline is batched even when the executor that
//!   waited for that instant wakes after the deadline: the lateness is the machine's, not the
//!   robot's (the queue remembers the instant it last asked to be woken at);
//! - a full queue makes room for an entry by evicting the newest entry of the lowest class
//!   below the newcomer's (a `high` one evicts the newest `low`, then `normal`); an urgent
//!   entry (a robot's stop) is never refused: it evicts the newest entry of the lowest class
//!   present, and is queued as `high`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vla_api::Priority;

/// How long before the earliest deadline a waiting batch is dispatched, so that the executor's
/// wake-up latency does not turn "dispatch before the deadline" into "expire at the deadline".
pub const DEADLINE_LEAD: Duration = Duration::from_millis(1);

/// What the queue needs to know about a waiting request besides its times.
pub trait Waiting {
    /// The client stopped waiting (disconnected or gave up): drop it, never compute it.
    fn is_abandoned(&self) -> bool;
}

/// Batching rule of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Largest batch formed (1 turns batching off).
    pub max_batch_size: usize,
    /// How long the oldest entry may wait for the batch to fill.
    pub max_queue_delay: Duration,
    /// Sizes dispatched as soon as they can be formed, ascending.
    pub preferred_batch_sizes: Vec<usize>,
    /// Entries held at most.
    pub capacity: usize,
}

#[derive(Debug)]
struct Entry<T> {
    item: T,
    enqueued: Instant,
    deadline: Instant,
}

/// The queue's answer to "what now?".
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    /// Run these together, in this order.
    Batch(Vec<Queued<T>>),
    /// Nothing to run yet: ask again at this instant (or when something is pushed).
    WaitUntil(Instant),
    /// Empty: wait for a push.
    Idle,
}

/// An entry leaving the queue, with the time it spent there.
#[derive(Debug, PartialEq, Eq)]
pub struct Queued<T> {
    pub item: T,
    pub enqueued: Instant,
    pub deadline: Instant,
}

/// The queue refused an entry because it is full.
#[derive(Debug, PartialEq, Eq)]
pub struct Full<T>(pub T);

/// What a push did.
#[derive(Debug)]
pub struct Pushed<T> {
    /// The entry, handed back: the queue is full and nothing may be evicted for it.
    pub refused: Option<Full<T>>,
    /// Entries swept out as past their deadline, to be answered.
    pub expired: Vec<Queued<T>>,
    /// The entry evicted to make room, to be answered as refused.
    pub evicted: Option<Queued<T>>,
}

#[derive(Debug)]
pub struct BatchQueue<T> {
    policy: Policy,
    /// One FIFO per class, indexed like [`Priority::ALL`].
    classes: [VecDeque<Entry<T>>; 3],
    /// The instant the last [`Next::WaitUntil`] named, until the next decision: an executor
    /// woken late for it still dispatches what was due then (see the module header).
    due: Option<Instant>,
}

fn class_index(p: Priority) -> usize {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

impl<T: Waiting> BatchQueue<T> {
    pub fn new(mut policy: Policy) -> Self {
        policy.max_batch_size = policy.max_batch_size.max(1);
        policy.preferred_batch_sizes.retain(|&p| p >= 1 && p <= policy.max_batch_size);
        policy.preferred_batch_sizes.sort_unstable();
        policy.preferred_batch_sizes.dedup();
        BatchQueue { policy, classes: Default::default(), due: None }
    }

    /// Caps the batches formed at `n` (at least 1; never above the policy's maximum), dropping
    /// the preferred sizes above it: the measured cap at warm-up (see `threads.rs`).
    pub fn limit_batch(&mut self, n: usize) {
        self.policy.max_batch_size = self.policy.max_batch_size.min(n.max(1));
        let max = self.policy.max_batch_size;
        self.policy.preferred_batch_sizes.retain(|&p| p <= max);
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Entries held, including abandoned ones not yet swept.
    pub fn len(&self) -> usize {
        self.classes.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `item`, or hands it back when the queue is full even after sweeping out entries
    /// that are abandoned or past their deadline (those are returned for answering) and no
    /// entry may be evicted for it (see the module header). `urgent` entries are never handed
    /// back.
    pub fn push(&mut self, item: T, priority: Priority, deadline: Instant, now: Instant, urgent: bool) -> Pushed<T> {
        let mut pushed = Pushed { refused: None, expired: Vec::new(), evicted: None };
        if self.len() >= self.policy.capacity {
            pushed.expired = self.sweep(now);
        }
        let class = if urgent { class_index(Priority::High) } else { class_index(priority) };
        if self.len() >= self.policy.capacity {
            // The newest entry of the lowest class that may make room: strictly below the
            // newcomer's, or any class for an urgent one.
            let lowest_evictable = if urgent { 0 } else { class + 1 };
            let victim = (lowest_evictable..3).rev().find(|&c| !self.classes[c].is_empty());
            match victim.and_then(|c| self.classes[c].pop_back()) {
                Some(e) => pushed.evicted = Some(Queued { item: e.item, enqueued: e.enqueued, deadline: e.deadline }),
                None => {
                    pushed.refused = Some(Full(item));
                    return pushed;
                }
            }
        }
        self.classes[class].push_back(Entry { item, enqueued: now, deadline });
        pushed
    }

    /// Removes abandoned entries (dropped silently) and entries whose deadline has passed
    /// (returned, so their clients can be told).
    pub fn sweep(&mut self, now: Instant) -> Vec<Queued<T>> {
        self.sweep_judged(now, None)
    }

    /// [`BatchQueue::sweep`], judging the entries queued by `due` (a batch's instant that has
    /// come) at `due` rather than at `now`.
    fn sweep_judged(&mut self, now: Instant, due: Option<Instant>) -> Vec<Queued<T>> {
        let mut expired = Vec::new();
        for class in &mut self.classes {
            let mut kept = VecDeque::with_capacity(class.len());
            for e in class.drain(..) {
                if e.item.is_abandoned() {
                    continue;
                }
                let judged_at = match due {
                    Some(due) if e.enqueued <= due => due,
                    _ => now,
                };
                if e.deadline <= judged_at {
                    expired.push(Queued { item: e.item, enqueued: e.enqueued, deadline: e.deadline });
                } else {
                    kept.push_back(e);
                }
            }
            *class = kept;
        }
        expired
    }

    /// Decides what to do at `now`. Also returns the entries that expired meanwhile.
    ///
    /// The rule, after sweeping:
    /// 1. `max_batch_size` entries queued → a full batch now; with no `max_queue_delay` (the
    ///    default) → everything queued now, whatever the preferred sizes;
    /// 2. a preferred size can be formed → the largest such batch now;
    /// 3. the oldest entry has waited `max_queue_delay`, or waiting longer would pass some
    ///    entry's deadline (less [`DEADLINE_LEAD`]) → everything queued now;
    /// 4. otherwise wait until the earlier of those two instants.
    ///
    /// With `max_queue_delay` zero, an executor that asks takes everything queued (up to the
    /// maximum) at once, so the model never idles while a request waits, and requests that
    /// arrive while it computes form its next batch.
    ///
    /// Asked again at or after the instant its last `WaitUntil` named, it judges the deadlines
    /// of the entries queued by then at that instant: what was due then is batched, however
    /// late the executor woke (entries queued since are judged at `now`).
    pub fn next(&mut self, now: Instant) -> (Next<T>, Vec<Queued<T>>) {
        let due = self.due.take().filter(|&due| due <= now);
        let expired = self.sweep_judged(now, due);
        let n = self.len();
        if n == 0 {
            return (Next::Idle, expired);
        }
        let max = self.policy.max_batch_size;
        if n >= max || self.policy.max_queue_delay.is_zero() {
            return (Next::Batch(self.take(n.min(max))), expired);
        }
        if let Some(&p) = self.policy.preferred_batch_sizes.iter().rev().find(|&&p| p <= n) {
            return (Next::Batch(self.take(p)), expired);
        }
        let oldest = self.classes.iter().filter_map(|c| c.front()).map(|e| e.enqueued).min();
        let earliest_deadline = self.classes.iter().flatten().map(|e| e.deadline).min();
        let (Some(oldest), Some(earliest_deadline)) = (oldest, earliest_deadline) else {
            return (Next::Idle, expired);
        };
        let before_deadline = earliest_deadline.checked_sub(DEADLINE_LEAD).unwrap_or(earliest_deadline);
        let due = (oldest + self.policy.max_queue_delay).min(before_deadline);
        if now >= due {
            (Next::Batch(self.take(n)), expired)
        } else {
            self.due = Some(due);
            (Next::WaitUntil(due), expired)
        }
    }

    /// Takes up to `n` entries in priority order.
    fn take(&mut self, n: usize) -> Vec<Queued<T>> {
        let mut batch = Vec::with_capacity(n);
        for class in &mut self.classes {
            while batch.len() < n {
                let Some(e) = class.pop_front() else { break };
                batch.push(Queued { item: e.item, enqueued: e.enqueued, deadline: e.deadline });
            }
        }
        batch
    }

    /// Empties the queue (at shutdown), returning everything still waiting.
    pub fn drain(&mut self) -> Vec<Queued<T>> {
        let n = self.len();
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Debug, PartialEq, Eq)]
    struct Req {
        id: u32,
        gone: Rc<Cell<bool>>,
    }

    impl Waiting for Req {
        fn is_abandoned(&self) -> bool {
            self.gone.get()
        }
    }

    fn req(id: u32) -> Req {
        Req { id, gone: Rc::new(Cell::new(false)) }
    }

    fn policy(max: usize, delay_ms: u64, preferred: &[usize], capacity: usize) -> Policy {
        Policy {
            max_batch_size: max,
            max_queue_delay: Duration::from_millis(delay_ms),
            preferred_batch_sizes: preferred.to_vec(),
            capacity,
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn with_no_delay_the_model_never_idles_while_a_request_waits() {
        // The default: no delay, the demo's preferred sizes.
        let mut q = BatchQueue::new(policy(32, 0, &[4, 8, 16], 64));
        let now = Instant::now();
        q.push(req(1), Priority::Normal, now + LONG, now, false);
        // A lone request runs at once, alone.
        assert_eq!(ids(q.next(now).0), vec![1]);
        // Five arrive while it computes: they go together when the executor asks again, not
        // split into the preferred 4 and a straggler.
        for id in 2..=6 {
            q.push(req(id), Priority::Normal, now + LONG, now, false);
        }
        assert_eq!(ids(q.next(now).0), vec![2, 3, 4, 5, 6]);
        assert_eq!(q.next(now).0, Next::Idle);
        // Never more than the maximum.
        let mut q = BatchQueue::new(policy(2, 0, &[], 64));
        for id in 1..=3 {
            q.push(req(id), Priority::Normal, now + LONG, now, false);
        }
        assert_eq!(ids(q.next(now).0), vec![1, 2]);
        assert_eq!(ids(q.next(now).0), vec![3]);
    }

    fn ids(next: Next<Req>) -> Vec<u32> {
        match next {
            Next::Batch(b) => b.into_iter().map(|q| q.item.id).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn push(q: &mut BatchQueue<Req>, r: Req, p: Priority, t0: Instant, at_ms: u64) {
        let now = t0 + Duration::from_millis(at_ms);
        let pushed = q.push(r, p, now + LONG, now, false);
        assert!(pushed.refused.is_none() && pushed.expired.is_empty() && pushed.evicted.is_none());
    }

    #[test]
    fn a_lone_request_waits_for_the_queue_delay_then_runs_alone() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 5, &[], 100));
        push(&mut q, req(1), Priority::Normal, t0, 0);
        let (next, _) = q.next(t0 + Duration::from_millis(1));
        assert_eq!(next, Next::WaitUntil(t0 + Duration::from_millis(5)));
        assert_eq!(ids(q.next(t0 + Duration::from_millis(5)).0), vec![1]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_measured_cap_splits_a_full_queue_into_batches_of_that_size() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(32, 0, &[4, 8, 16], 100));
        q.limit_batch(8);
        assert_eq!((q.policy().max_batch_size, q.policy().preferred_batch_sizes.as_slice()), (8, &[4, 8][..]));
        for i in 0..20 {
            push(&mut q, req(i), Priority::Normal, t0, 0);
        }
        assert_eq!(ids(q.next(t0).0), (0..8).collect::<Vec<_>>());
        assert_eq!(ids(q.next(t0).0), (8..16).collect::<Vec<_>>());
        assert_eq!(ids(q.next(t0).0), (16..20).collect::<Vec<_>>());
        // Never above the model's own maximum, never below one.
        q.limit_batch(64);
        assert_eq!(q.policy().max_batch_size, 8);
        q.limit_batch(0);
        assert_eq!(q.policy().max_batch_size, 1);
    }

    #[test]
    fn concurrent_requests_are_stacked_into_one_batch() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 5, &[], 100));
        for i in 0..5 {
            push(&mut q, req(i), Priority::Normal, t0, u64::from(i));
        }
        assert_eq!(ids(q.next(t0 + Duration::from_millis(5)).0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_the_rest_waits() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(4, 1000, &[], 100));
        for i in 0..6 {
            push(&mut q, req(i), Priority::Normal, t0, 0);
        }
        assert_eq!(ids(q.next(t0).0), vec![0, 1, 2, 3]);
        assert_eq!(q.next(t0).0, Next::WaitUntil(t0 + Duration::from_secs(1)));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn the_largest_preferred_size_that_can_be_formed_leaves_at_once() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(16, 1000, &[8, 4], 100));
        for i in 0..3 {
            push(&mut q, req(i), Priority::Normal, t0, 0);
        }
        assert!(matches!(q.next(t0).0, Next::WaitUntil(_)));
        for i in 3..10 {
            push(&mut q, req(i), Priority::Normal, t0, 0);
        }
        assert_eq!(ids(q.next(t0).0).len(), 8);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn high_priority_is_served_before_normal_and_low() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(2, 0, &[], 100));
        push(&mut q, req(1), Priority::Low, t0, 0);
        push(&mut q, req(2), Priority::Normal, t0, 1);
        push(&mut q, req(3), Priority::High, t0, 2);
        push(&mut q, req(4), Priority::High, t0, 3);
        let now = t0 + Duration::from_millis(3);
        assert_eq!(ids(q.next(now).0), vec![3, 4]);
        assert_eq!(ids(q.next(now).0), vec![2, 1]);
    }

    #[test]
    fn a_request_past_its_deadline_is_returned_as_expired_and_never_batched() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 50, &[], 100));
        assert!(q.push(req(1), Priority::Normal, t0 + Duration::from_millis(10), t0, false).refused.is_none());
        push(&mut q, req(2), Priority::Normal, t0, 0);
        // The batcher is busy until 20 ms; request 1's deadline passed at 10 ms.
        let (next, expired) = q.next(t0 + Duration::from_millis(20));
        assert_eq!(expired.iter().map(|e| e.item.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(next, Next::WaitUntil(t0 + Duration::from_millis(50)));
        assert_eq!(ids(q.next(t0 + Duration::from_millis(50)).0), vec![2]);
    }

    #[test]
    fn waiting_stops_early_so_a_deadline_is_not_missed() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 50, &[], 100));
        assert!(q.push(req(1), Priority::Normal, t0 + Duration::from_millis(10), t0, false).refused.is_none());
        let due = t0 + Duration::from_millis(10) - DEADLINE_LEAD;
        assert_eq!(q.next(t0).0, Next::WaitUntil(due));
        // Woken at that instant, the request runs instead of expiring.
        assert_eq!(ids(q.next(due).0), vec![1]);
    }

    #[test]
    fn an_executor_woken_late_still_runs_what_was_due_before_the_deadline() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 50, &[], 100));
        assert!(q.push(req(1), Priority::Normal, t0 + Duration::from_millis(10), t0, false).refused.is_none());
        let due = t0 + Duration::from_millis(10) - DEADLINE_LEAD;
        assert_eq!(q.next(t0).0, Next::WaitUntil(due));
        // The machine was busy: the executor wakes 5 ms after the deadline.
        let (next, expired) = q.next(t0 + Duration::from_millis(15));
        assert!(expired.is_empty());
        assert_eq!(ids(next), vec![1]);
        // Without a wait named, a deadline that passed expires the entry.
        assert!(q.push(req(2), Priority::Normal, t0 + Duration::from_millis(20), t0, false).refused.is_none());
        let (next, expired) = q.next(t0 + Duration::from_millis(30));
        assert_eq!(expired.iter().map(|e| e.item.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(next, Next::Idle);
    }

    #[test]
    fn an_entry_queued_after_the_instant_named_is_judged_at_the_wake_up() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = BatchQueue::new(policy(8, 50, &[], 100));
        assert!(q.push(req(1), Priority::Normal, t0 + ms(10), t0, false).refused.is_none());
        assert_eq!(q.next(t0).0, Next::WaitUntil(t0 + ms(10) - DEADLINE_LEAD));
        // Queued just after that instant with a deadline that passes before the late wake-up.
        let pushed = t0 + ms(10) - DEADLINE_LEAD + Duration::from_micros(500);
        assert!(q.push(req(2), Priority::Normal, t0 + ms(11), pushed, false).refused.is_none());
        let (next, expired) = q.next(t0 + ms(12));
        assert_eq!(expired.iter().map(|e| e.item.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(ids(next), vec![1]);
    }

    #[test]
    fn an_abandoned_request_is_dropped_without_being_batched() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 5, &[], 100));
        let r1 = req(1);
        let gone = r1.gone.clone();
        push(&mut q, r1, Priority::Normal, t0, 0);
        push(&mut q, req(2), Priority::Normal, t0, 0);
        gone.set(true);
        let (next, expired) = q.next(t0 + Duration::from_millis(5));
        assert!(expired.is_empty());
        assert_eq!(ids(next), vec![2]);
    }

    #[test]
    fn a_full_queue_refuses_at_once_but_makes_room_from_abandoned_entries() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 5, &[], 2));
        let r1 = req(1);
        let gone = r1.gone.clone();
        push(&mut q, r1, Priority::Normal, t0, 0);
        push(&mut q, req(2), Priority::Normal, t0, 0);
        let pushed = q.push(req(3), Priority::Normal, t0 + LONG, t0, false);
        assert_eq!(pushed.refused.map(|Full(r)| r.id), Some(3));
        gone.set(true);
        assert!(q.push(req(3), Priority::Normal, t0 + LONG, t0, false).refused.is_none());
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_full_queue_evicts_the_newest_of_a_lower_class_for_a_higher_one() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(policy(8, 5, &[], 3));
        push(&mut q, req(1), Priority::Low, t0, 0);
        push(&mut q, req(2), Priority::Low, t0, 1);
        push(&mut q, req(3), Priority::Normal, t0, 2);
        // A low one cannot make room for itself; a normal one evicts the newest low.
        assert!(q.push(req(4), Priority::Low, t0 + LONG, t0, false).refused.is_some());
        let pushed = q.push(req(5), Priority::Normal, t0 + LONG, t0, false);
        assert_eq!(pushed.evicted.map(|e| e.item.id), Some(2));
        // A high one evicts the newest low first, then the newest normal.
        assert_eq!(q.push(req(6), Priority::High, t0 + LONG, t0, false).evicted.map(|e| e.item.id), Some(1));
        assert_eq!(q.push(req(7), Priority::High, t0 + LONG, t0, false).evicted.map(|e| e.item.id), Some(5));
        assert_eq!(q.push(req(8), Priority::High, t0 + LONG, t0, false).evicted.map(|e| e.item.id), Some(3));
        // All high now: another high is refused, but an urgent stop is not.
        assert!(q.push(req(9), Priority::High, t0 + LONG, t0, false).refused.is_some());
        let stop = q.push(req(10), Priority::Low, t0 + LONG, t0, true);
        assert!(stop.refused.is_none());
        assert_eq!(stop.evicted.map(|e| e.item.id), Some(8));
        // The stop is served with the high class.
        assert_eq!(ids(q.next(t0 + Duration::from_millis(5)).0), vec![6, 7, 10]);
    }
}
