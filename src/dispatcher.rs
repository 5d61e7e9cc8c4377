//! Hands OOM episodes to worker threads, one stall at a time per subtree: an OOM at a
//! cgroup whose ancestor or descendant has an episode running (or whose ancestor's
//! episode has just ended, unless the caller saw the wall at the cgroup itself: see
//! [`Cause::own_wall`]) is the same stall, since the kernel marks the whole subtree
//! of the cgroup whose limit was hit. A stall counts from when it was first seen. An OOM arriving at the same cgroup meanwhile is
//! kept; an audited stall is logged once; a stall the policy could not resolve is
//! retried with a backing-off interval (1 s, 2 s, 4 s ... up to a maximum) unless
//! something changes the picture. The worker pool is elastic. This module knows nothing
//! of how an episode runs ([`crate::episode`] does) and reads nothing from the kernel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupPath;
use crate::policy::{Mode, Policy};

/// Work for a worker thread.
#[derive(Debug, Clone)]
pub struct Job {
    pub cgroup: CgroupPath,
    pub policy: Arc<Policy>,
    pub episode: u64,
    /// When the agent learned of the OOM (eventfd read or sweep).
    pub detected: Instant,
    pub start_step: usize,
    /// Resumed because a loan's hold expired with the workload above its original
    /// limit: the goal is then to fit under the original limit again.
    pub resume: bool,
    /// 0 for a new stall; n for the n-th retry of a stall left unresolved, which
    /// writes a reminder instead of repeating the whole episode in the audit log.
    pub retry: u32,
    /// Whether a retry writes its reminder (and its failed actions): at every
    /// backed-off retry, and at retries 1, 2, 4, 8 ... of a stall retried every second
    /// because an action failed.
    pub remind: bool,
    /// An early episode (`[early]`: usage crossed the threshold, no stall yet).
    pub early: bool,
    /// What started it (for the `oom` audit line).
    pub cause: Cause,
    /// Set when the stall is one the kernel never reports (pinned at the limit, no
    /// OOM): the episode then asks "still pinned?" instead of "still under OOM?".
    pub pinned: Option<crate::pinned::Pinned>,
}

impl Job {
    /// A new stall's episode from its first step: not resumed, not a retry, not early,
    /// with no cause recorded (set the fields that differ).
    pub fn new(cgroup: CgroupPath, policy: Arc<Policy>, episode: u64, detected: Instant) -> Job {
        Job {
            cgroup,
            policy,
            episode,
            detected,
            start_step: 0,
            resume: false,
            retry: 0,
            remind: true,
            early: false,
            cause: Cause::default(),
            pinned: None,
        }
    }
}

/// What noticed a stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// v1: the OOM eventfd of `memory.oom_control`.
    OomEvent,
    /// v2: a change of `memory.events` (its counters rose at a limit).
    Events,
    /// v2: the PSI trigger on `memory.pressure`.
    Pressure,
    /// The safety sweep's read.
    Sweep,
    /// The sweep found the cgroup pinned at its limit without an OOM
    /// ([`crate::pinned`]).
    Pinned,
    /// A stall seen again when an episode ended, or a retry.
    #[default]
    Recheck,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::OomEvent => "oom_event",
            Trigger::Events => "memory.events",
            Trigger::Pressure => "memory.pressure",
            Trigger::Sweep => "sweep",
            Trigger::Pinned => "pinned",
            Trigger::Recheck => "recheck",
        }
    }
}

/// Why an episode started: what noticed the stall and, on v2, the `memory.events`
/// counter rises that read saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cause {
    pub trigger: Trigger,
    pub rises: Option<crate::cgroup::parse::EventRises>,
    /// The caller saw the wall at this cgroup: under OOM with no ancestor under OOM,
    /// and its usage at its own limit. Such a stall is its own, not the tail of a stall
    /// above that ended a moment ago (see [`SAME_STALL_WINDOW`]).
    pub own_wall: bool,
}

/// The reason of the [`End::Unresolved`] an early episode ([`crate::early`]) ends with
/// when the cgroup reached its limit: the dispatcher starts the OOM episode at once.
/// Here, beside [`End`], so that the early episodes depend on the dispatcher and not
/// the other way round.
pub const HANDED_OVER: &str = "the limit was reached: the OOM episode follows";

/// The start of the reason of an episode that panicked (a bug): what its steps did
/// before the panic is unknown, so a stall that ends after it is not said to have ended
/// by itself (a kill may have ended it just before the panic).
pub const PANICKED: &str = "the episode panicked";

/// How an episode ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Resolved {
        by_step: Option<usize>,
        stalled: Duration,
    },
    Unresolved {
        reason: String,
        /// What would help, for the operator (empty when nothing specific is known).
        help: String,
        /// An action failed (an error, not "nothing to do"): worth retrying soon.
        failed: bool,
    },
    /// The cgroup went away mid-episode.
    Gone,
    /// The agent is stopping: no further step was taken.
    Stopped,
}

impl End {
    pub fn unresolved(reason: impl Into<String>) -> End {
        End::Unresolved {
            reason: reason.into(),
            help: String::new(),
            failed: false,
        }
    }
}

/// What a stuck cgroup looked like when its episode gave up: a change in any of these
/// means the policy may do better now, so the retry comes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Picture {
    pub limit: u64,
    pub usage: u64,
    pub tasks: usize,
}

/// Usage must fall by this much to count as "usage down" (it jitters at the limit).
const USAGE_DOWN: u64 = 1 << 20;

impl Picture {
    /// Why `now` differs from `self` in a way that is worth a retry.
    pub fn changed(&self, now: &Picture) -> Option<&'static str> {
        if now.limit != self.limit {
            Some("limit changed")
        } else if now.tasks < self.tasks {
            Some("a task is gone")
        } else if now.usage.saturating_add(USAGE_DOWN) <= self.usage {
            Some("usage down")
        } else {
            None
        }
    }
}

/// A stall the policy could not resolve, held between backed-off retries.
#[derive(Debug, Clone)]
struct Stuck {
    policy: String,
    episode: u64,
    since: SystemTime,
    reason: String,
    /// Episodes run for this stall so far (the first one included).
    tries: u32,
    next_try: Instant,
    /// The last episode ended with a failed action: retried every second.
    failed: bool,
    picture: Option<Picture>,
    /// A pinned stall (see [`crate::pinned`]): `under_oom 0` does not end it.
    pinned: bool,
    /// When the stall was first seen (its first episode's detection): a retry that
    /// resolves it counts its `stalled_ms` from then, not from the retry.
    detected: Instant,
}

/// A stuck, unresolved cgroup as `oomwake status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StuckStatus {
    pub cgroup: CgroupPath,
    pub policy: String,
    pub episode: u64,
    /// RFC 3339 time of the first `unresolved`.
    pub since: String,
    pub reason: String,
    pub tries: u32,
}

#[derive(Debug, Clone)]
enum Active {
    /// An episode is running. `retrigger` holds the time of an OOM seen meanwhile at
    /// this cgroup; `waiting` the OOMs of ancestors, started when this one ends.
    Running {
        retrigger: Option<Instant>,
        waiting: Vec<(CgroupPath, Arc<Policy>, Instant)>,
        /// A retry of a stall left unresolved: how it stood before this episode.
        held: Option<Stuck>,
        /// An early episode: no stall yet, so an OOM below it is not its stall.
        early: bool,
    },
    /// Audit mode logged this stall once; wait until it ends (or a reload) before
    /// logging another.
    /// (true: a pinned stall, which `under_oom 0` does not end)
    AuditHeld(bool),
    /// Enforce mode could not resolve the stall; retry at `next_try`.
    Stuck(Stuck),
    /// An episode resolved here at this instant: what is still marked below is its tail.
    Ended(Instant),
}

/// How long after an episode resolved an OOM below it still counts as the same stall:
/// the kernel clears the marks of a subtree one cgroup at a time, and the eventfds of
/// descendants fire with the ancestor's. A stall at a cgroup's own wall
/// ([`Cause::own_wall`]) is not held by it; a new stall below that the caller could
/// not place waits at most this long plus one sweep (and counts from when it was seen).
pub const SAME_STALL_WINDOW: Duration = Duration::from_secs(1);

/// Hands episodes to workers, one per subtree. The pool is elastic: when every worker
/// is busy (settling, or in a grace period) a new one is started, up to a maximum, so
/// that a burst of stalls never queues behind slow episodes; workers idle for a minute
/// above the minimum exit.
pub struct Dispatcher {
    active: Mutex<HashMap<CgroupPath, Active>>,
    tx: Sender<Job>,
    next_id: AtomicU64,
    /// Longest wait between two retries of an unresolved stall.
    retry_max: Duration,
    stopping: AtomicBool,
    /// Bumped when the set of stuck cgroups changes (for the status file).
    generation: AtomicU64,
    /// When an OOM at a cgroup was first seen while it was taken for a stall above it
    /// (an episode running or just ended there): an episode that starts at that cgroup
    /// later counts its stall from then. Locked after `active`, never before.
    first_seen: Mutex<HashMap<CgroupPath, Instant>>,
    pool: Pool,
    /// Episodes of cgroups that hold the agent (its own memory cgroup and those above
    /// it): taken before any other job, by the reserved worker when there is one
    /// ([`Dispatcher::next_urgent_job`]) or by the next free worker.
    urgent: (Sender<Job>, Receiver<Job>),
    /// The agent's own memory cgroup, when it runs in the hierarchy.
    own: OnceLock<CgroupPath>,
    /// The pool was refused growth for the stall at this cgroup (said once per stall).
    refused: Mutex<Option<CgroupPath>>,
    /// Times the pool did not grow because a cgroup holding the agent was stuck.
    growth_refused: AtomicU64,
    /// Heartbeats of the workers (and the loan keeper) for the watchdog ping.
    pub liveness: crate::notify::Liveness,
}

struct Pool {
    min: usize,
    max: usize,
    total: AtomicUsize,
    idle: AtomicUsize,
    spawn: OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

const WORKER_IDLE_EXIT: Duration = Duration::from_secs(60);
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The first episode id of this run: milliseconds since the epoch times 1000, so that
/// ids never repeat across restarts (a run would need more than 1000 episodes per
/// millisecond of its life to reach the next run's first id) and stay below 2^53, exact
/// in every JSON reader.
pub fn first_episode_id(now: SystemTime) -> u64 {
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms.saturating_mul(1000).max(1)
}

fn related(a: &CgroupPath, b: &CgroupPath) -> bool {
    a.is_within(b) || b.is_within(a)
}

/// The wait before retry number `tries` (1 s after the first episode, then doubling).
fn backoff(tries: u32, max: Duration) -> Duration {
    let shift = tries.saturating_sub(1).min(20);
    FIRST_RETRY
        .saturating_mul(1 << shift)
        .min(max.max(FIRST_RETRY))
}

/// A stall left unresolved that has ended now.
#[derive(Debug, Clone, PartialEq)]
pub struct StallEnded {
    pub cgroup: CgroupPath,
    pub policy: String,
    pub episode: u64,
    pub since: SystemTime,
    /// Nothing the agent did can have ended it: false when the last episode panicked
    /// (its steps may have acted before the panic).
    pub unaided: bool,
}

impl Dispatcher {
    pub fn new(
        tx: Sender<Job>,
        retry_max: Duration,
        min_workers: usize,
        max_workers: usize,
    ) -> Dispatcher {
        Dispatcher {
            active: Mutex::new(HashMap::new()),
            tx,
            next_id: AtomicU64::new(first_episode_id(SystemTime::now())),
            retry_max,
            stopping: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            first_seen: Mutex::new(HashMap::new()),
            urgent: crossbeam_channel::unbounded(),
            own: OnceLock::new(),
            refused: Mutex::new(None),
            growth_refused: AtomicU64::new(0),
            pool: Pool {
                min: min_workers.max(1),
                max: max_workers.max(min_workers).max(1),
                total: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                spawn: OnceLock::new(),
            },
            liveness: crate::notify::Liveness::default(),
        }
    }

    /// Sets how a worker thread is started (returns false if it could not be), and
    /// starts the minimum number.
    pub fn start_workers(&self, spawn: Box<dyn Fn() -> bool + Send + Sync>) {
        if self.pool.spawn.set(spawn).is_err() {
            return;
        }
        for _ in 0..self.pool.min {
            self.add_worker();
        }
    }

    fn add_worker(&self) {
        let Some(spawn) = self.pool.spawn.get() else {
            return;
        };
        if self.pool.total.fetch_add(1, Ordering::SeqCst) >= self.pool.max {
            self.pool.total.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        self.pool.idle.fetch_add(1, Ordering::SeqCst);
        if !spawn() {
            self.pool.total.fetch_sub(1, Ordering::SeqCst);
            self.pool.idle.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// After queueing a job (with `active` still locked): make sure some worker is free
    /// to take it. Not by starting a thread while a cgroup holding the agent is stuck:
    /// the new thread's stack and its first writes are charged there, and a fault of
    /// its (or of the caller, the event loop, writing the new thread's control block)
    /// parks in the very stall the agent has to end. The job waits for a free worker
    /// then; a stall of the agent's own cgroup jumps the queue (see `urgent`).
    fn ensure_worker(&self, active: &HashMap<CgroupPath, Active>) {
        let queued = self.tx.len() + self.urgent.1.len();
        if self.pool.idle.load(Ordering::SeqCst) > queued {
            return;
        }
        if let Some(stuck) = self.own_stuck(active) {
            self.growth_refused.fetch_add(1, Ordering::Relaxed);
            let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused.as_ref() != Some(&stuck) {
                log::warn!(
                    "{stuck}: stuck, and the agent runs inside it: no new episode worker is started until it is resolved (its stack would be charged to the stuck cgroup); {queued} episode(s) wait for one of the {} workers",
                    self.workers()
                );
                *refused = Some(stuck);
            }
            return;
        }
        self.add_worker();
    }

    /// The agent's own memory cgroup (None when it runs outside the hierarchy): a stall
    /// of it or of a cgroup above it is the agent's too.
    pub fn set_own_cgroup(&self, own: Option<CgroupPath>) {
        if let Some(own) = own {
            let _ = self.own.set(own);
        }
    }

    /// Whether `cg` holds the agent (it is the agent's memory cgroup or above it).
    fn holds_agent(&self, cg: &CgroupPath) -> bool {
        self.own.get().is_some_and(|own| own.is_within(cg))
    }

    /// A cgroup holding the agent that is stuck by what the dispatcher knows: an OOM
    /// episode runs there or waits for one below it, or its stall is held (unresolved,
    /// or in audit mode). Early episodes are no stall.
    fn own_stuck(&self, active: &HashMap<CgroupPath, Active>) -> Option<CgroupPath> {
        self.own.get()?;
        for (cg, a) in active {
            let stuck = match a {
                Active::Running { early, .. } => !early,
                Active::Stuck(_) | Active::AuditHeld(_) => true,
                Active::Ended(_) => false,
            };
            if stuck && self.holds_agent(cg) {
                return Some(cg.clone());
            }
            if let Active::Running { waiting, .. } = a {
                if let Some((c, _, _)) = waiting.iter().find(|(c, _, _)| self.holds_agent(c)) {
                    return Some(c.clone());
                }
            }
        }
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
        None
    }

    /// Times the pool was not grown because a cgroup holding the agent was stuck.
    pub fn growth_refused(&self) -> u64 {
        self.growth_refused.load(Ordering::Relaxed)
    }

    /// Queues `job`: on the urgent queue when its cgroup holds the agent. False if the
    /// queue is closed.
    fn send(&self, job: Job) -> bool {
        let queue = if self.holds_agent(&job.cgroup) {
            &self.urgent.0
        } else {
            &self.tx
        };
        queue.send(job).is_ok()
    }

    /// For the reserved worker, started when the agent runs inside a managed cgroup: the
    /// next episode of a cgroup holding the agent. It waits for nothing but these, so
    /// such a stall never waits for a busy pool nor for a thread that cannot start.
    /// `None` once the agent stops.
    pub fn next_urgent_job(&self) -> Option<Job> {
        loop {
            match self.urgent.1.recv_timeout(Duration::from_millis(500)) {
                Ok(job) => return Some(job),
                Err(RecvTimeoutError::Timeout) if self.stopping() => return None,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// For a worker: waits for the next job. `None` tells the worker to exit: the
    /// channel closed, or it has been idle for a while and the pool is above its minimum.
    pub fn next_job(&self, rx: &Receiver<Job>) -> Option<Job> {
        let pool = &self.pool;
        loop {
            let got = match self.urgent.1.try_recv() {
                Ok(job) => Ok(job),
                Err(_) => crossbeam_channel::select! {
                    recv(self.urgent.1) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
                    recv(rx) -> j => j.map_err(|_| RecvTimeoutError::Disconnected),
                    default(WORKER_IDLE_EXIT) => Err(RecvTimeoutError::Timeout),
                },
            };
            match got {
                Ok(job) => {
                    pool.idle.fetch_sub(1, Ordering::SeqCst);
                    return Some(job);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let total = pool.total.load(Ordering::SeqCst);
                    if total > pool.min
                        && pool
                            .total
                            .compare_exchange(total, total - 1, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                    {
                        pool.idle.fetch_sub(1, Ordering::SeqCst);
                        return None;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// For a worker: it is idle again after a job.
    pub fn job_done(&self) {
        self.pool.idle.fetch_add(1, Ordering::SeqCst);
    }

    /// Worker threads now (for status and tests).
    pub fn workers(&self) -> usize {
        self.pool.total.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CgroupPath, Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<CgroupPath, Instant>> {
        self.first_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An OOM at `cg` taken for a stall above it: remembered (the earliest) so that an
    /// episode at `cg` later counts from it.
    fn note_seen(&self, cg: &CgroupPath, detected: Instant) {
        let mut seen = self.seen();
        let at = seen.entry(cg.clone()).or_insert(detected);
        *at = (*at).min(detected);
    }

    /// The agent is stopping: no episode starts from now on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Changes whenever the set of stuck, unresolved cgroups changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Starts an episode for `cg` unless this is a stall already being handled: an
    /// episode runs at `cg` (its OOM is remembered for when it ends), above it (the same
    /// stall), or below it (this one waits for it to end); an episode above it ended a
    /// moment ago (the tail of that stall, unless [`Cause::own_wall`]); audit mode
    /// already logged it; or it is stuck and unresolved and its next retry is not due.
    /// An OOM taken for a stall above is remembered: an episode that starts at `cg`
    /// later counts from it. Returns the episode's id.
    pub fn trigger(&self, cg: &CgroupPath, policy: Arc<Policy>, detected: Instant) -> Option<u64> {
        self.trigger_by(cg, policy, detected, Cause::default())
    }

    /// [`trigger`](Self::trigger), saying what noticed the stall.
    pub fn trigger_by(
        &self,
        cg: &CgroupPath,
        policy: Arc<Policy>,
        detected: Instant,
        cause: Cause,
    ) -> Option<u64> {
        self.trigger_with(cg, policy, detected, cause, None)
    }

    /// [`trigger`](Self::trigger) for a stall the kernel does not report (see
    /// [`crate::pinned`]): the same one-stall-per-subtree, audit-hold and backoff rules.
    pub fn trigger_pinned(
        &self,
        cg: &CgroupPath,
        policy: Arc<Policy>,
        detected: Instant,
        pinned: crate::pinned::Pinned,
    ) -> Option<u64> {
        let cause = Cause {
            trigger: Trigger::Pinned,
            rises: None,
            own_wall: false,
        };
        self.trigger_with(cg, policy, detected, cause, Some(pinned))
    }

    fn trigger_with(
        &self,
        cg: &CgroupPath,
        policy: Arc<Policy>,
        detected: Instant,
        cause: Cause,
        pinned: Option<crate::pinned::Pinned>,
    ) -> Option<u64> {
        if self.stopping() {
            return None;
        }
        let now = Instant::now();
        let mut active = self.lock();
        active.retain(|_, a| !matches!(a, Active::Ended(at) if now >= *at + SAME_STALL_WINDOW));
        let mut below = None;
        for (other, a) in active.iter() {
            if other == cg || !related(cg, other) {
                continue;
            }
            let above = cg.is_within(other);
            match a {
                // An early episode above marks nothing: an OOM below is a stall of
                // its own (the early one hands over if it reaches its own wall).
                Active::Running { early: true, .. } if above => {}
                Active::Running { .. } if above => {
                    self.note_seen(cg, detected);
                    return None;
                }
                Active::Running { .. } => below = Some(other.clone()),
                // An episode above resolved a moment ago: what is still marked below
                // is its tail, unless the wall is here (this cgroup at its own limit,
                // under OOM while nothing above it is): then it is a new stall.
                Active::Ended(_) if above && cause.own_wall => {}
                Active::Ended(_) if above => {
                    self.note_seen(cg, detected);
                    return None;
                }
                Active::AuditHeld(_) | Active::Stuck(_) if above => return None,
                _ => {}
            }
        }
        if let Some(b) = below {
            if let Some(Active::Running { waiting, .. }) = active.get_mut(&b) {
                if !waiting.iter().any(|(c, _, _)| c == cg) {
                    waiting.push((cg.clone(), policy, detected));
                }
            }
            return None;
        }
        let held = match active.get_mut(cg) {
            Some(Active::Running { retrigger, .. }) => {
                retrigger.get_or_insert(detected);
                return None;
            }
            Some(Active::AuditHeld(_)) => return None,
            Some(Active::Stuck(s)) if now < s.next_try => return None,
            Some(Active::Stuck(s)) => Some(s.clone()),
            _ => None,
        };
        let (episode, retry, remind) = match &held {
            Some(s) => (s.episode, s.tries, !s.failed || s.tries.is_power_of_two()),
            None => (self.next_id.fetch_add(1, Ordering::Relaxed), 0, true),
        };
        // The stall counts from when it was first seen, if that was while it was taken
        // for the tail of a stall above.
        let first = self.seen().remove(cg);
        let detected = first.map_or(detected, |f| f.min(detected));
        // A retry of a stall left unresolved: the stall began with its first episode.
        let detected = held.as_ref().map_or(detected, |s| s.detected.min(detected));
        let prev = active.insert(
            cg.clone(),
            Active::Running {
                retrigger: None,
                waiting: Vec::new(),
                held,
                early: false,
            },
        );
        let job = Job {
            retry,
            remind,
            cause,
            pinned,
            ..Job::new(cg.clone(), policy, episode, detected)
        };
        if !self.send(job) {
            match prev {
                Some(p) => active.insert(cg.clone(), p),
                None => active.remove(cg),
            };
            return None;
        }
        self.ensure_worker(&active);
        Some(episode)
    }

    /// Starts an early episode for `cg` (usage crossed its `[early]` threshold) unless
    /// anything runs or is held at `cg` or in its subtree or above it: a stall there
    /// is handled by its own episode, and a second crossing while an early episode
    /// runs is the same approach to the wall. Returns the episode's id.
    pub fn trigger_early(
        &self,
        cg: &CgroupPath,
        policy: Arc<Policy>,
        detected: Instant,
    ) -> Option<u64> {
        if self.stopping() {
            return None;
        }
        let now = Instant::now();
        let mut active = self.lock();
        active.retain(|_, a| !matches!(a, Active::Ended(at) if now >= *at + SAME_STALL_WINDOW));
        let busy = active
            .iter()
            .any(|(c, a)| related(c, cg) && !matches!(a, Active::Ended(_)));
        if busy {
            return None;
        }
        let episode = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prev = active.insert(
            cg.clone(),
            Active::Running {
                retrigger: None,
                waiting: Vec::new(),
                held: None,
                early: true,
            },
        );
        let job = Job {
            early: true,
            ..Job::new(cg.clone(), policy, episode, detected)
        };
        if !self.send(job) {
            match prev {
                Some(p) => active.insert(cg.clone(), p),
                None => active.remove(cg),
            };
            return None;
        }
        self.ensure_worker(&active);
        Some(episode)
    }

    /// Resumes an episode after a hold expired. Skipped while another episode runs in
    /// the same subtree, or when stopping.
    pub fn resume(&self, cg: &CgroupPath, policy: Arc<Policy>, episode: u64, step: usize) -> bool {
        if self.stopping() {
            return false;
        }
        let mut active = self.lock();
        if active
            .iter()
            .any(|(c, a)| matches!(a, Active::Running { .. }) && related(c, cg))
        {
            return false;
        }
        let prev = active.insert(
            cg.clone(),
            Active::Running {
                retrigger: None,
                waiting: Vec::new(),
                held: None,
                early: false,
            },
        );
        // A stall held here (stuck and unresolved) is no longer listed: status and the
        // stuck gauge must see the change.
        if matches!(prev, Some(Active::Stuck(_))) {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        let job = Job {
            start_step: step,
            resume: true,
            ..Job::new(cg.clone(), policy, episode, Instant::now())
        };
        if !self.send(job) {
            match prev {
                Some(p) => active.insert(cg.clone(), p),
                None => active.remove(cg),
            };
            return false;
        }
        self.ensure_worker(&active);
        true
    }

    /// Called by the worker when an episode ends, with what the cgroup looked like if
    /// it is still stuck. Returns the OOMs to re-check now: one that arrived at this
    /// cgroup while a resolved episode ran, and those of ancestors that waited for it.
    pub fn finish(
        &self,
        job: &Job,
        end: &End,
        picture: Option<Picture>,
    ) -> Vec<(CgroupPath, Arc<Policy>, Instant)> {
        let now = Instant::now();
        let mut active = self.lock();
        let (retrigger, mut again, held) = match active.remove(&job.cgroup) {
            Some(Active::Running {
                retrigger,
                waiting,
                held,
                ..
            }) => (retrigger, waiting, held),
            _ => (None, Vec::new(), None),
        };
        if job.early {
            // An early episode leaves no mark: neither a stall held nor the tail of one.
            // Ancestors that waited go first (the stall is theirs if they are still
            // under OOM), then an OOM that arrived here meanwhile, or the one the
            // episode handed over to.
            let handed_over =
                matches!(end, End::Unresolved { reason, .. } if reason == HANDED_OVER);
            if let Some(at) = retrigger.or(handed_over.then_some(now)) {
                again.push((job.cgroup.clone(), job.policy.clone(), at));
            }
            return again;
        }
        if held.is_some() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        // What was seen below while this episode ran was this stall: a new one there
        // counts from when it is seen again.
        self.seen()
            .retain(|c, _| c == &job.cgroup || !c.is_within(&job.cgroup));
        match end {
            End::Gone | End::Stopped => {}
            End::Unresolved { .. } if job.policy.mode == Mode::Audit => {
                active.insert(job.cgroup.clone(), Active::AuditHeld(job.pinned.is_some()));
            }
            // A resumed episode's retries are the loan keeper's to make.
            End::Unresolved { .. } if job.resume => {}
            End::Unresolved { reason, failed, .. } => {
                let tries = held.as_ref().map_or(0, |s| s.tries) + 1;
                // A failed write (ENOMEM in a stuck cgroup, EBUSY) may go through a
                // moment later; a policy that ran out of steps will not.
                let wait = if *failed {
                    FIRST_RETRY
                } else {
                    backoff(tries, self.retry_max)
                };
                let stuck = Stuck {
                    policy: job.policy.name.clone(),
                    episode: job.episode,
                    since: held.as_ref().map_or_else(SystemTime::now, |s| s.since),
                    reason: reason.clone(),
                    tries,
                    next_try: now + wait,
                    failed: *failed,
                    pinned: job.pinned.is_some(),
                    picture,
                    detected: held.as_ref().map_or(job.detected, |s| s.detected),
                };
                active.insert(job.cgroup.clone(), Active::Stuck(stuck));
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            End::Resolved { .. } => {
                active.insert(job.cgroup.clone(), Active::Ended(now));
                if let Some(at) = retrigger {
                    again.insert(0, (job.cgroup.clone(), job.policy.clone(), at));
                }
            }
        }
        again
    }

    /// Stuck cgroups waiting for their next retry, with what they looked like: the
    /// caller compares and [`kick`](Self::kick)s those that changed.
    pub fn waiting_pictures(&self) -> Vec<(CgroupPath, Picture)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter_map(|(c, a)| match a {
                Active::Stuck(s) if now < s.next_try => s.picture.map(|p| (c.clone(), p)),
                _ => None,
            })
            .collect()
    }

    /// Something changed the picture of a stuck cgroup: its next retry is due now.
    pub fn kick(&self, cg: &CgroupPath) -> bool {
        match self.lock().get_mut(cg) {
            Some(Active::Stuck(s)) => {
                s.next_try = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// The policies were reloaded: stalls held in audit mode or left unresolved are
    /// evaluated again at the next trigger, under the new policies.
    pub fn reloaded(&self) {
        let now = Instant::now();
        let mut active = self.lock();
        active.retain(|_, a| !matches!(a, Active::AuditHeld(_)));
        for a in active.values_mut() {
            if let Active::Stuck(s) = a {
                s.next_try = now;
            }
        }
    }

    /// The sweep saw `cg` out of OOM: a later stall there is a new episode. The kernel
    /// marks a whole subtree under OOM, so a stall held at an ancestor (a pod cgroup no
    /// policy watches itself) has ended too. Returns the unresolved stalls that ended.
    pub fn clear_held(&self, cg: &CgroupPath) -> Vec<StallEnded> {
        let mut active = self.lock();
        self.seen().retain(|held, _| !cg.is_within(held));
        if active.is_empty() {
            return Vec::new();
        }
        let mut ended = Vec::new();
        active.retain(|held, a| {
            if !cg.is_within(held) {
                return true;
            }
            match a {
                Active::AuditHeld(_) => false,
                Active::Stuck(s) => {
                    ended.push(StallEnded {
                        cgroup: held.clone(),
                        policy: s.policy.clone(),
                        episode: s.episode,
                        since: s.since,
                        unaided: !s.reason.starts_with(PANICKED),
                    });
                    false
                }
                _ => true,
            }
        });
        if !ended.is_empty() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        ended
    }

    /// The pinned stalls held at `cg` or an ancestor (audited once, or unresolved and
    /// waiting for their retry): the sweep keeps them held while the cgroup is still at
    /// its wall, since `under_oom 0` does not mean such a stall has ended.
    pub fn held_at(&self, cg: &CgroupPath) -> Vec<CgroupPath> {
        let active = self.lock();
        if active.is_empty() {
            return Vec::new();
        }
        active
            .iter()
            .filter(|(held, a)| {
                cg.is_within(held)
                    && matches!(
                        a,
                        Active::AuditHeld(true) | Active::Stuck(Stuck { pinned: true, .. })
                    )
            })
            .map(|(held, _)| held.clone())
            .collect()
    }

    pub fn forget(&self, cg: &CgroupPath) {
        let mut active = self.lock();
        self.seen().remove(cg);
        match active.get(cg) {
            Some(Active::Running { .. }) | None => {}
            Some(a) => {
                if matches!(a, Active::Stuck(_)) {
                    self.generation.fetch_add(1, Ordering::Relaxed);
                }
                active.remove(cg);
            }
        }
    }

    /// How many episodes run now (no allocation: the sweep asks every second).
    pub fn running_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|a| matches!(a, Active::Running { .. }))
            .count()
    }

    /// Cgroups with an episode running now.
    pub fn running(&self) -> Vec<CgroupPath> {
        let mut v: Vec<CgroupPath> = self
            .lock()
            .iter()
            .filter(|(_, a)| matches!(a, Active::Running { .. }))
            .map(|(c, _)| c.clone())
            .collect();
        v.sort();
        v
    }

    /// Cgroups stuck with their stall unresolved, for `oomwake status`.
    pub fn stuck(&self) -> Vec<StuckStatus> {
        let mut v: Vec<StuckStatus> = self
            .lock()
            .iter()
            .filter_map(|(c, a)| match a {
                Active::Stuck(s) | Active::Running { held: Some(s), .. } => Some(StuckStatus {
                    cgroup: c.clone(),
                    policy: s.policy.clone(),
                    episode: s.episode,
                    since: humantime::format_rfc3339_seconds(s.since).to_string(),
                    reason: s.reason.clone(),
                    tries: s.tries,
                }),
                _ => None,
            })
            .collect();
        v.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
        v
    }

    /// How many cgroups each policy has stuck and unresolved (for the gauge).
    pub fn stuck_by_policy(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for a in self.lock().values() {
            if let Active::Stuck(s) | Active::Running { held: Some(s), .. } = a {
                *m.entry(s.policy.clone()).or_insert(0) += 1;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;

    fn dispatcher(
        min: usize,
        max: usize,
    ) -> (
        Dispatcher,
        crossbeam_channel::Receiver<Job>,
        Arc<AtomicUsize>,
    ) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let d = Dispatcher::new(tx, Duration::from_secs(300), min, max);
        let spawned = Arc::new(AtomicUsize::new(0));
        let s = spawned.clone();
        d.start_workers(Box::new(move || {
            s.fetch_add(1, Ordering::SeqCst);
            true
        }));
        (d, rx, spawned)
    }

    fn enforce() -> Arc<Policy> {
        PolicySet::embedded_default().policies()[0].clone()
    }

    fn resolved() -> End {
        End::Resolved {
            by_step: Some(0),
            stalled: Duration::from_millis(1),
        }
    }

    #[test]
    fn one_episode_per_cgroup_and_an_oom_meanwhile_is_kept() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let a = CgroupPath::new("/a");
        let t0 = Instant::now();
        let id = d.trigger(&a, p.clone(), t0).unwrap();
        assert_eq!(d.trigger(&a, p.clone(), t0), None);
        assert_eq!(d.running(), vec![a.clone()]);
        let job = rx.try_recv().unwrap();
        assert_eq!(
            (job.episode, job.start_step, job.resume, job.retry),
            (id, 0, false, 0)
        );
        assert!(rx.try_recv().is_err());
        // The OOM seen while running comes back for the worker to re-check.
        let again = d.finish(&job, &resolved(), None);
        assert_eq!(again.len(), 1);
        assert_eq!((&again[0].0, again[0].2), (&a, t0));
        assert!(d.running().is_empty());
        assert!(d.trigger(&a, p, t0).unwrap() > id);
    }

    #[test]
    fn one_stall_per_subtree() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let (top, mid, deep) = (
            CgroupPath::new("/p"),
            CgroupPath::new("/p/c"),
            CgroupPath::new("/p/c/d/e"),
        );
        let now = Instant::now();
        // An episode at /p/c: the same stall seen below is not a second episode; the
        // ancestor's own OOM waits for it and is handed back when it ends.
        d.trigger(&mid, p.clone(), now).unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(d.trigger(&deep, p.clone(), now), None);
        assert_eq!(d.trigger(&top, p.clone(), now), None);
        assert_eq!(d.running(), vec![mid.clone()]);
        let again = d.finish(&job, &resolved(), None);
        assert_eq!(
            again.iter().map(|a| a.0.clone()).collect::<Vec<_>>(),
            vec![top.clone()]
        );
        // Just after it resolved, what is still marked below it is its tail ...
        assert_eq!(d.trigger(&deep, p.clone(), now), None);
        // ... but the ancestor's stall, or an unrelated one, starts at once.
        assert!(d.trigger(&top, p.clone(), now).is_some());
        assert!(d.trigger(&CgroupPath::new("/q"), p.clone(), now).is_some());
        let job = rx.try_recv().unwrap();
        assert_eq!(job.cgroup, top);
        assert_eq!(d.trigger(&mid, p.clone(), now), None, "ancestor running");
        d.finish(&job, &resolved(), None);
        std::thread::sleep(SAME_STALL_WINDOW + Duration::from_millis(50));
        assert!(d.trigger(&deep, p, now).is_some(), "a new stall later");
    }

    fn at_own_wall() -> Cause {
        Cause {
            trigger: Trigger::OomEvent,
            rises: None,
            own_wall: true,
        }
    }

    #[test]
    fn a_childs_own_wall_right_after_the_parents_episode_is_a_new_stall() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let (top, child) = (CgroupPath::new("/p"), CgroupPath::new("/p/c"));
        let t0 = Instant::now();
        d.trigger(&top, p.clone(), t0).unwrap();
        let job = rx.try_recv().unwrap();
        d.finish(&job, &resolved(), None);
        // The parent's subtree-wide OOM, still marked below it: the same stall.
        let echo = Instant::now();
        assert_eq!(d.trigger(&child, p.clone(), echo), None);
        assert!(rx.try_recv().is_err());
        // The child at its own limit, under OOM while its parent is not: a stall of
        // its own, started now, counted from when it was seen.
        let seen = Instant::now();
        let id = d.trigger_by(&child, p.clone(), seen, at_own_wall());
        assert!(id.is_some(), "the child's own stall waited for the window");
        let job = rx.try_recv().unwrap();
        assert_eq!(job.cgroup, child);
        assert!(job.cause.own_wall);
        d.finish(&job, &resolved(), None);
        // While an episode runs above, even a wall below is the same stall (one at a
        // time per subtree).
        d.trigger(&top, p.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(
            d.trigger_by(&child, p.clone(), Instant::now(), at_own_wall()),
            None
        );
        d.finish(&job, &resolved(), None);
    }

    #[test]
    fn a_stall_counts_from_when_it_was_first_seen() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let (top, child) = (CgroupPath::new("/p"), CgroupPath::new("/p/c"));
        d.trigger(&top, p.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        // Seen while the parent's episode runs: that stall's, forgotten when it ends.
        assert_eq!(d.trigger(&child, p.clone(), Instant::now()), None);
        d.finish(&job, &resolved(), None);
        // Seen in the tail window with no evidence of a wall of its own: held back ...
        let first = Instant::now();
        assert_eq!(d.trigger(&child, p.clone(), first), None);
        std::thread::sleep(SAME_STALL_WINDOW + Duration::from_millis(50));
        // ... and when the sweep starts it later, the stall counts from then.
        let later = Instant::now();
        d.trigger(&child, p.clone(), later).unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(job.detected, first);
        d.finish(&job, &resolved(), None);
        // Out of OOM in between: a later stall is new and counts from its own time.
        d.trigger(&top, p.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        d.finish(&job, &resolved(), None);
        assert_eq!(d.trigger(&child, p.clone(), Instant::now()), None);
        d.clear_held(&child);
        std::thread::sleep(SAME_STALL_WINDOW + Duration::from_millis(50));
        let fresh = Instant::now();
        d.trigger(&child, p, fresh).unwrap();
        assert_eq!(rx.try_recv().unwrap().detected, fresh);
    }

    #[test]
    fn resume_over_a_stuck_stall_changes_the_generation() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let a = CgroupPath::new("/a");
        d.trigger(&a, p.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        d.finish(&job, &End::unresolved("all steps done"), None);
        assert_eq!(d.stuck().len(), 1);
        let g = d.generation();
        assert!(d.resume(&a, p, 7, 1));
        // The stuck entry is gone from status: the status file must be rewritten.
        assert!(d.stuck().is_empty());
        assert_ne!(
            d.generation(),
            g,
            "status and the stuck gauge lose the change"
        );
    }

    #[test]
    fn early_episodes_share_the_subtree_sensibly() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let (top, mid, deep) = (
            CgroupPath::new("/p"),
            CgroupPath::new("/p/c"),
            CgroupPath::new("/p/c/d"),
        );
        let now = Instant::now();
        // An early episode at /p/c: a second crossing there, or one above or below it,
        // is no second early episode.
        let id = d.trigger_early(&mid, p.clone(), now).unwrap();
        let early = rx.try_recv().unwrap();
        assert!(early.early && early.episode == id);
        assert_eq!(d.trigger_early(&mid, p.clone(), now), None);
        assert_eq!(d.trigger_early(&top, p.clone(), now), None);
        assert_eq!(d.trigger_early(&deep, p.clone(), now), None);
        // An OOM below it is a stall of its own (an early episode marks nothing) ...
        assert!(d.trigger(&deep, p.clone(), now).is_some());
        let below = rx.try_recv().unwrap();
        assert!(!below.early);
        d.finish(&below, &resolved(), None);
        // ... an OOM at it is kept for when it ends, and so is one above it.
        let oom_at = now + Duration::from_millis(3);
        assert_eq!(d.trigger(&mid, p.clone(), oom_at), None);
        assert_eq!(d.trigger(&top, p.clone(), oom_at), None);
        let handed = End::unresolved(HANDED_OVER);
        let again = d.finish(&early, &handed, None);
        // The ancestor first: the stall is its own if it is still under OOM.
        assert_eq!(
            again.iter().map(|a| (a.0.clone(), a.2)).collect::<Vec<_>>(),
            vec![(top.clone(), oom_at), (mid.clone(), oom_at)]
        );
        // It leaves no mark: no held stall, no tail window for an OOM below.
        assert!(d.running().is_empty() && d.stuck().is_empty());
        assert!(d.trigger(&deep, p.clone(), now).is_some());
        let job = rx.try_recv().unwrap();
        d.finish(&job, &resolved(), None);
        // Not while an OOM episode runs in the subtree, nor while a stall is held.
        d.trigger(&top, p.clone(), now).unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(d.trigger_early(&mid, p.clone(), now), None);
        d.finish(&job, &End::unresolved("all steps done"), None);
        assert_eq!(d.trigger_early(&mid, p.clone(), now), None);
        assert_eq!(d.trigger_early(&top, p.clone(), now), None);
        // A hand-over with no OOM seen meanwhile still asks the worker to re-check.
        let q = CgroupPath::new("/q");
        d.trigger_early(&q, p.clone(), now).unwrap();
        let job = rx.try_recv().unwrap();
        let again = d.finish(&job, &handed, None);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, q);
        // Resolved early episodes hand nothing back.
        d.trigger_early(&q, p.clone(), now).unwrap();
        let job = rx.try_recv().unwrap();
        assert!(d.finish(&job, &resolved(), None).is_empty());
        assert!(d.trigger_early(&q, p, now).is_some());
    }

    #[test]
    fn resume_waits_for_an_episode_in_the_subtree() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        d.trigger(&CgroupPath::new("/p/c"), p.clone(), Instant::now())
            .unwrap();
        assert!(!d.resume(&CgroupPath::new("/p"), p.clone(), 7, 1));
        let job = rx.try_recv().unwrap();
        d.finish(&job, &resolved(), None);
        assert!(d.resume(&CgroupPath::new("/p"), p, 7, 1));
    }

    #[test]
    fn audit_stall_is_held_until_it_ends_or_a_reload() {
        let (d, rx, _) = dispatcher(1, 1);
        let set = PolicySet::embedded_default().all_audit();
        let audit = set.policies()[0].clone();
        let a = CgroupPath::new("/a");
        d.trigger(&a, audit.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        assert!(d
            .finish(&job, &End::unresolved("audit mode"), None)
            .is_empty());
        assert_eq!(d.trigger(&a, audit.clone(), Instant::now()), None, "held");
        // Out of OOM below it: the stall at /a is over too.
        d.clear_held(&CgroupPath::new("/a/child"));
        assert!(d.trigger(&a, audit.clone(), Instant::now()).is_some());
        let job = rx.try_recv().unwrap();
        d.finish(&job, &End::unresolved("audit mode"), None);
        assert_eq!(d.trigger(&a, audit, Instant::now()), None, "held");
        // A reload (say, to enforce) evaluates the held stall again.
        d.reloaded();
        assert!(d.trigger(&a, enforce(), Instant::now()).is_some());
    }

    #[test]
    fn unresolved_backs_off_and_a_change_retries_at_once() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let b = CgroupPath::new("/b");
        let id = d.trigger(&b, p.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        let pic = Picture {
            limit: 100 << 20,
            usage: 100 << 20,
            tasks: 2,
        };
        d.finish(&job, &End::unresolved("no candidate victim"), Some(pic));
        assert_eq!(
            d.trigger(&b, p.clone(), Instant::now()),
            None,
            "backing off"
        );
        let st = d.stuck();
        assert_eq!(st.len(), 1);
        assert_eq!((st[0].episode, st[0].tries), (id, 1));
        assert_eq!(st[0].reason, "no candidate victim");
        assert_eq!(d.stuck_by_policy().get(&p.name), Some(&1));
        assert_eq!(d.waiting_pictures(), vec![(b.clone(), pic)]);
        // Something changed: the retry is due now, in the same episode.
        assert!(d.kick(&b));
        assert_eq!(d.trigger(&b, p.clone(), Instant::now()), Some(id));
        let job = rx.try_recv().unwrap();
        assert_eq!(job.retry, 1);
        assert_eq!(d.stuck().len(), 1, "still listed while retrying");
        d.finish(&job, &End::unresolved("no candidate victim"), Some(pic));
        assert_eq!(d.stuck()[0].tries, 2);
        // The stall ends by itself: reported once, and no longer stuck.
        let ended = d.clear_held(&b);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].episode, id);
        assert!(ended[0].unaided);
        assert!(d.stuck().is_empty());
        assert!(d.trigger(&b, p, Instant::now()).unwrap() > id);
    }

    /// A stall whose episode panicked (after a kill, say) and that then ends is not
    /// reported as ended by itself.
    /// A retry counts the stall from its first episode's detection (README: a stall
    /// counts from when the agent first saw it), not from the retry.
    #[test]
    fn a_retry_counts_the_stall_from_when_it_was_first_seen() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let c = CgroupPath::new("/c");
        let first = Instant::now();
        d.trigger(&c, p.clone(), first).unwrap();
        let job = rx.try_recv().unwrap();
        d.finish(&job, &End::unresolved("no candidate victim"), None);
        assert!(d.kick(&c));
        let later = first + Duration::from_secs(4);
        d.trigger(&c, p.clone(), later).unwrap();
        let retry = rx.try_recv().unwrap();
        assert_eq!(retry.retry, 1);
        assert_eq!(retry.detected, first);
        // And the next retry too.
        d.finish(&retry, &End::unresolved("no candidate victim"), None);
        assert!(d.kick(&c));
        d.trigger(&c, p, later + Duration::from_secs(8)).unwrap();
        assert_eq!(rx.try_recv().unwrap().detected, first);
    }

    #[test]
    fn a_stall_ending_after_a_panic_is_not_unaided() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let c = CgroupPath::new("/c");
        d.trigger(&c, p.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        let end = End::Unresolved {
            reason: format!("{PANICKED}: boom"),
            help: String::new(),
            failed: true,
        };
        d.finish(&job, &end, None);
        let ended = d.clear_held(&c);
        assert_eq!(ended.len(), 1);
        assert!(!ended[0].unaided);
    }

    #[test]
    fn a_failed_action_is_retried_every_second_with_sparse_reminders() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = enforce();
        let c = CgroupPath::new("/c");
        d.trigger(&c, p.clone(), Instant::now()).unwrap();
        let failed = End::Unresolved {
            reason: "raise_limit: ENOMEM".into(),
            help: String::new(),
            failed: true,
        };
        let mut job = rx.try_recv().unwrap();
        let mut seen = Vec::new();
        for _ in 0..8 {
            d.finish(&job, &failed, None);
            assert_eq!(
                d.trigger(&c, p.clone(), Instant::now()),
                None,
                "not at once"
            );
            d.kick(&c);
            d.trigger(&c, p.clone(), Instant::now()).unwrap();
            job = rx.try_recv().unwrap();
            seen.push((job.retry, job.remind));
        }
        let want: Vec<(u32, bool)> = (1..=8).map(|n: u32| (n, n.is_power_of_two())).collect();
        assert_eq!(seen, want);
        // After eight tries the wait is still a second, not a backed-off two minutes.
        d.finish(&job, &failed, None);
        std::thread::sleep(FIRST_RETRY + Duration::from_millis(50));
        assert!(d.trigger(&c, p, Instant::now()).is_some());
    }

    #[test]
    fn a_pinned_stall_stays_held_only_as_a_pinned_one() {
        let (d, rx, _) = dispatcher(1, 1);
        let audit = PolicySet::embedded_default().all_audit().policies()[0].clone();
        let pin = crate::pinned::Pinned {
            failcnt_delta: 3,
            usage: 16 << 20,
            limit: 16 << 20,
            file_bytes: 0,
            progress_events: 0,
            cpu_ms: 0,
            window_ms: 1000,
        };
        let (a, b) = (CgroupPath::new("/a"), CgroupPath::new("/b"));
        d.trigger_pinned(&a, audit.clone(), Instant::now(), pin)
            .unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(job.pinned, Some(pin));
        d.finish(&job, &End::unresolved("audit mode"), None);
        // Held once, like an OOM in audit mode, and known as pinned (under_oom 0 does
        // not end it) at the cgroup and below it.
        assert_eq!(
            d.trigger_pinned(&a, audit.clone(), Instant::now(), pin),
            None
        );
        assert_eq!(d.held_at(&a), vec![a.clone()]);
        assert_eq!(d.held_at(&CgroupPath::new("/a/c")), vec![a.clone()]);
        // An OOM held in audit mode is not a pinned hold.
        d.trigger(&b, audit, Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(job.pinned, None);
        d.finish(&job, &End::unresolved("audit mode"), None);
        assert!(d.held_at(&b).is_empty());
        // Unresolved in enforce mode: backs off like an OOM, still pinned.
        let c = CgroupPath::new("/c");
        d.trigger_pinned(&c, enforce(), Instant::now(), pin)
            .unwrap();
        let job = rx.try_recv().unwrap();
        d.finish(&job, &End::unresolved("all steps done"), None);
        assert_eq!(d.trigger_pinned(&c, enforce(), Instant::now(), pin), None);
        assert_eq!(d.held_at(&c), vec![c.clone()]);
        d.clear_held(&c);
        assert!(d.held_at(&c).is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=11).map(|t| backoff(t, max).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX, max), max);
    }

    #[test]
    fn pictures_that_are_worth_a_retry() {
        let p = Picture {
            limit: 100,
            usage: 50 << 20,
            tasks: 3,
        };
        assert_eq!(p.changed(&p), None);
        let q = |f: fn(&mut Picture)| {
            let mut n = p;
            f(&mut n);
            p.changed(&n)
        };
        assert_eq!(q(|n| n.limit = 200), Some("limit changed"));
        assert_eq!(q(|n| n.tasks = 2), Some("a task is gone"));
        assert_eq!(q(|n| n.tasks = 4), None);
        assert_eq!(q(|n| n.usage -= 4096), None, "jitter");
        assert_eq!(q(|n| n.usage -= 2 << 20), Some("usage down"));
    }

    #[test]
    fn episode_ids_do_not_repeat_across_restarts() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let first = first_episode_id(t);
        // A run that started a millisecond later starts beyond a thousand episodes.
        assert_eq!(first_episode_id(t + Duration::from_millis(1)), first + 1000);
        assert!(first < 1 << 53, "exact in JSON");
        let (d, rx, _) = dispatcher(1, 1);
        let id = d
            .trigger(&CgroupPath::new("/x"), enforce(), Instant::now())
            .unwrap();
        let _ = rx.try_recv();
        assert!(id >= first_episode_id(SystemTime::now() - Duration::from_secs(5)));
    }

    #[test]
    fn nothing_starts_once_stopping() {
        let (d, rx, _) = dispatcher(1, 1);
        d.stop();
        assert_eq!(
            d.trigger(&CgroupPath::new("/a"), enforce(), Instant::now()),
            None
        );
        assert!(!d.resume(&CgroupPath::new("/a"), enforce(), 1, 1));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn pool_grows_when_busy_up_to_its_maximum() {
        let (d, _rx, spawned) = dispatcher(2, 5);
        assert_eq!(spawned.load(Ordering::SeqCst), 2);
        let p = enforce();
        // Nobody takes the jobs (no real workers): each trigger finds no idle worker
        // for the queued work and asks for one more, up to the maximum.
        for i in 0..10 {
            d.trigger(
                &CgroupPath::new(&format!("/c{i}")),
                p.clone(),
                Instant::now(),
            );
        }
        assert_eq!(d.workers(), 5);
        assert_eq!(spawned.load(Ordering::SeqCst), 5);
    }

    /// With the agent inside /pod (its own cgroup /pod/agent): while /pod is stuck the
    /// pool does not start a thread (its stack would be charged to /pod, and the event
    /// loop starting it could park there), however many other stalls queue; /pod's
    /// episode goes first. Once /pod's stall is over, the pool grows again.
    #[test]
    fn the_pool_does_not_grow_while_a_cgroup_holding_the_agent_is_stuck() {
        let (d, rx, spawned) = dispatcher(1, 8);
        d.set_own_cgroup(Some(CgroupPath::new("/pod/agent")));
        let p = enforce();
        let pod = CgroupPath::new("/pod");
        // The one worker is busy with /a.
        d.trigger(&CgroupPath::new("/a"), p.clone(), Instant::now())
            .unwrap();
        let a = d.next_job(&rx).unwrap();
        // (The pool keeps one worker free beyond the queue: it grew for /a.)
        let base = spawned.load(Ordering::SeqCst);
        d.trigger(&pod, p.clone(), Instant::now()).unwrap();
        for i in 0..5 {
            d.trigger(
                &CgroupPath::new(&format!("/c{i}")),
                p.clone(),
                Instant::now(),
            )
            .unwrap();
        }
        assert_eq!(d.workers(), base, "the pool grew while /pod was stuck");
        assert_eq!(spawned.load(Ordering::SeqCst), base);
        assert!(d.growth_refused() >= 5);
        // The next free worker takes /pod first, then the others in order.
        d.finish(&a, &resolved(), None);
        d.job_done();
        let first = d.next_job(&rx).unwrap();
        assert_eq!(first.cgroup, pod);
        // Unresolved and held: still stuck, still no growth.
        d.finish(&first, &End::unresolved("all steps done"), None);
        d.job_done();
        d.trigger(&CgroupPath::new("/d"), p.clone(), Instant::now())
            .unwrap();
        assert_eq!(d.workers(), base);
        // The stall ends: the pool may grow again.
        d.clear_held(&pod);
        d.trigger(&CgroupPath::new("/e"), p.clone(), Instant::now())
            .unwrap();
        assert!(d.workers() > base, "the pool did not grow after the stall");
        // A stall of a cgroup below the agent's (not holding it) never held growth.
        let (d, _rx, _) = dispatcher(1, 8);
        d.set_own_cgroup(Some(CgroupPath::new("/pod/agent")));
        d.trigger(&CgroupPath::new("/pod/app"), p.clone(), Instant::now())
            .unwrap();
        d.trigger(&CgroupPath::new("/x"), p, Instant::now())
            .unwrap();
        assert_eq!(d.workers(), 3);
        assert_eq!(d.growth_refused(), 0);
    }

    /// The reserved worker takes the episodes of cgroups holding the agent, and only
    /// those: the others stay for the pool.
    #[test]
    fn the_reserved_worker_takes_only_the_agents_own_stalls() {
        let (d, rx, _) = dispatcher(1, 1);
        d.set_own_cgroup(Some(CgroupPath::new("/pod/agent")));
        let p = enforce();
        d.trigger(&CgroupPath::new("/a"), p.clone(), Instant::now())
            .unwrap();
        d.trigger(&CgroupPath::new("/pod/agent"), p.clone(), Instant::now())
            .unwrap();
        let own = d.next_urgent_job().unwrap();
        assert_eq!(own.cgroup.as_str(), "/pod/agent");
        assert_eq!(rx.try_recv().unwrap().cgroup.as_str(), "/a");
        // Nothing else is urgent; once stopping, the reserved worker ends.
        d.stop();
        assert!(d.next_urgent_job().is_none());
    }
}
