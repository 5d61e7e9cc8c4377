//! Hands OOM episodes to worker threads: at most one episode per cgroup at a time, an
//! OOM arriving meanwhile is kept, an audited stall is logged once, and an episode that
//! ran out of steps cools down before the next try. The worker pool is elastic. This
//! module knows nothing of how an episode runs ([`crate::episode`] does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

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
}

/// How an episode ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Resolved {
        by_step: Option<usize>,
        stalled: Duration,
    },
    Unresolved {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Active {
    /// An episode is running; `retrigger` holds the time of an OOM seen meanwhile.
    Running { retrigger: Option<Instant> },
    /// Audit mode logged this stall once; wait until it ends before logging another.
    AuditHeld,
    /// Enforce mode ran out of steps; try again after this instant.
    Cooldown(Instant),
}

/// Hands episodes to workers, at most one per cgroup. The pool is elastic: when every
/// worker is busy (settling, or in a grace period) a new one is started, up to a
/// maximum, so that a burst of stalls never queues behind slow episodes; workers idle
/// for a minute above the minimum exit.
pub struct Dispatcher {
    active: Mutex<HashMap<CgroupPath, Active>>,
    tx: Sender<Job>,
    next_id: AtomicU64,
    cooldown: Duration,
    pool: Pool,
}

struct Pool {
    min: usize,
    max: usize,
    total: AtomicUsize,
    idle: AtomicUsize,
    spawn: OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

const WORKER_IDLE_EXIT: Duration = Duration::from_secs(60);

impl Dispatcher {
    pub fn new(
        tx: Sender<Job>,
        cooldown: Duration,
        min_workers: usize,
        max_workers: usize,
    ) -> Dispatcher {
        Dispatcher {
            active: Mutex::new(HashMap::new()),
            tx,
            next_id: AtomicU64::new(1),
            cooldown,
            pool: Pool {
                min: min_workers.max(1),
                max: max_workers.max(min_workers).max(1),
                total: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                spawn: OnceLock::new(),
            },
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

    /// After queueing a job: make sure some worker is free to take it.
    fn ensure_worker(&self) {
        if self.pool.idle.load(Ordering::SeqCst) < self.tx.len() + 1 {
            self.add_worker();
        }
    }

    /// For a worker: waits for the next job. `None` tells the worker to exit: the
    /// channel closed, or it has been idle for a while and the pool is above its minimum.
    pub fn next_job(&self, rx: &Receiver<Job>) -> Option<Job> {
        let pool = &self.pool;
        loop {
            match rx.recv_timeout(WORKER_IDLE_EXIT) {
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

    /// Starts an episode for `cg` unless one is running (then remember the OOM for
    /// when it ends), audit mode already logged this stall, or a cooldown is on.
    /// Returns the new episode's id.
    pub fn trigger(&self, cg: &CgroupPath, policy: Arc<Policy>, detected: Instant) -> Option<u64> {
        let mut active = self.lock();
        match active.get_mut(cg) {
            Some(Active::Running { retrigger }) => {
                retrigger.get_or_insert(detected);
                return None;
            }
            Some(Active::AuditHeld) => return None,
            Some(Active::Cooldown(until)) if Instant::now() < *until => return None,
            _ => {}
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        active.insert(cg.clone(), Active::Running { retrigger: None });
        let job = Job {
            cgroup: cg.clone(),
            policy,
            episode: id,
            detected,
            start_step: 0,
            resume: false,
        };
        if self.tx.send(job).is_err() {
            active.remove(cg);
            return None;
        }
        self.ensure_worker();
        Some(id)
    }

    /// Resumes an episode after a hold expired. Skipped while another episode runs.
    pub fn resume(&self, cg: &CgroupPath, policy: Arc<Policy>, episode: u64, step: usize) -> bool {
        let mut active = self.lock();
        if matches!(active.get(cg), Some(Active::Running { .. })) {
            return false;
        }
        active.insert(cg.clone(), Active::Running { retrigger: None });
        let job = Job {
            cgroup: cg.clone(),
            policy,
            episode,
            detected: Instant::now(),
            start_step: step,
            resume: true,
        };
        if self.tx.send(job).is_err() {
            active.remove(cg);
            return false;
        }
        self.ensure_worker();
        true
    }

    /// Called by the worker when an episode ends. Returns the time of an OOM that
    /// arrived while it ran, if the caller should start another episode for it.
    pub fn finish(&self, job: &Job, end: &End) -> Option<Instant> {
        let mut active = self.lock();
        let prev = active.remove(&job.cgroup);
        let retrigger = match prev {
            Some(Active::Running { retrigger }) => retrigger,
            _ => None,
        };
        match end {
            End::Unresolved { reason } if reason == "cgroup gone" => None,
            End::Unresolved { .. } if job.policy.mode == Mode::Audit => {
                active.insert(job.cgroup.clone(), Active::AuditHeld);
                None
            }
            End::Unresolved { .. } => {
                active.insert(
                    job.cgroup.clone(),
                    Active::Cooldown(Instant::now() + self.cooldown),
                );
                None
            }
            End::Resolved { .. } => retrigger,
        }
    }

    /// The sweep saw `cg` out of OOM: a later stall there is a new episode. The kernel
    /// marks a whole subtree under OOM, so an audited stall held at an ancestor (a pod
    /// cgroup no policy watches itself) has ended too.
    pub fn clear_held(&self, cg: &CgroupPath) {
        let mut active = self.lock();
        if active.is_empty() {
            return;
        }
        active.retain(|held, a| !(matches!(a, Active::AuditHeld) && cg.is_within(held)));
    }

    pub fn forget(&self, cg: &CgroupPath) {
        let mut active = self.lock();
        if !matches!(active.get(cg), Some(Active::Running { .. })) {
            active.remove(cg);
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
        let d = Dispatcher::new(tx, Duration::from_millis(50), min, max);
        let spawned = Arc::new(AtomicUsize::new(0));
        let s = spawned.clone();
        d.start_workers(Box::new(move || {
            s.fetch_add(1, Ordering::SeqCst);
            true
        }));
        (d, rx, spawned)
    }

    #[test]
    fn one_episode_per_cgroup_and_an_oom_meanwhile_is_kept() {
        let (d, rx, _) = dispatcher(1, 1);
        let p = PolicySet::embedded_default().policies()[0].clone();
        let a = CgroupPath::new("/a");
        let t0 = Instant::now();
        let id = d.trigger(&a, p.clone(), t0).unwrap();
        assert_eq!(d.trigger(&a, p.clone(), t0), None);
        assert_eq!(d.running(), vec![a.clone()]);
        let job = rx.try_recv().unwrap();
        assert_eq!((job.episode, job.start_step, job.resume), (id, 0, false));
        assert!(rx.try_recv().is_err());
        let end = End::Resolved {
            by_step: Some(0),
            stalled: Duration::from_millis(1),
        };
        // The OOM seen while running comes back for the worker to re-check.
        assert_eq!(d.finish(&job, &end), Some(t0));
        assert!(d.running().is_empty());
        assert!(d.trigger(&a, p, t0).unwrap() > id);
    }

    #[test]
    fn audit_stall_is_held_until_it_ends_and_unresolved_cools_down() {
        let (d, rx, _) = dispatcher(1, 1);
        let set = PolicySet::embedded_default().all_audit();
        let audit = set.policies()[0].clone();
        let a = CgroupPath::new("/a");
        d.trigger(&a, audit.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        let un = End::Unresolved {
            reason: "audit mode".into(),
        };
        assert_eq!(d.finish(&job, &un), None);
        assert_eq!(d.trigger(&a, audit.clone(), Instant::now()), None, "held");
        // Out of OOM below it: the stall at /a is over too.
        d.clear_held(&CgroupPath::new("/a/child"));
        assert!(d.trigger(&a, audit, Instant::now()).is_some());
        assert_eq!(rx.try_recv().unwrap().cgroup, a);

        let enforce = PolicySet::embedded_default().policies()[0].clone();
        let b = CgroupPath::new("/b");
        d.trigger(&b, enforce.clone(), Instant::now()).unwrap();
        let job = rx.try_recv().unwrap();
        assert_eq!(job.cgroup, b);
        d.finish(
            &job,
            &End::Unresolved {
                reason: "all steps done".into(),
            },
        );
        assert_eq!(
            d.trigger(&b, enforce.clone(), Instant::now()),
            None,
            "cooling down"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(d.trigger(&b, enforce, Instant::now()).is_some());
    }

    #[test]
    fn pool_grows_when_busy_up_to_its_maximum() {
        let (d, _rx, spawned) = dispatcher(2, 5);
        assert_eq!(spawned.load(Ordering::SeqCst), 2);
        let p = PolicySet::embedded_default().policies()[0].clone();
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
}
