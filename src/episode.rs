//! One OOM episode: the policy's steps in order, each followed by its settle wait and a
//! re-check, ending `resolved` (with the stall time) or `unresolved` (with why).
//! Episodes run on worker threads; the [`Dispatcher`] makes sure a cgroup has at most
//! one at a time and that an OOM arriving meanwhile is not lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde_json::Value;

use crate::action::{self, raise::Restore, Outcome, StepCtx};
use crate::agent::Shared;
use crate::audit::Record;
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
enum State {
    Stuck,
    Recovered(Instant),
    Gone,
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

/// Hands episodes to workers, at most one per cgroup.
pub struct Dispatcher {
    active: Mutex<HashMap<CgroupPath, Active>>,
    tx: Sender<Job>,
    next_id: AtomicU64,
    cooldown: Duration,
}

impl Dispatcher {
    pub fn new(tx: Sender<Job>, cooldown: Duration) -> Dispatcher {
        Dispatcher {
            active: Mutex::new(HashMap::new()),
            tx,
            next_id: AtomicU64::new(1),
            cooldown,
        }
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
        true
    }

    /// Called by the worker when an episode ends. Returns the time of an OOM that
    /// arrived while it ran, if the caller should start another episode for it.
    fn finish(&self, job: &Job, end: &End) -> Option<Instant> {
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

    /// The sweep saw the cgroup out of OOM: a later stall is a new episode.
    pub fn clear_held(&self, cg: &CgroupPath) {
        let mut active = self.lock();
        if matches!(active.get(cg), Some(Active::AuditHeld)) {
            active.remove(cg);
        }
    }

    pub fn forget(&self, cg: &CgroupPath) {
        let mut active = self.lock();
        if !matches!(active.get(cg), Some(Active::Running { .. })) {
            active.remove(cg);
        }
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

/// A worker: runs episodes until the channel closes.
pub fn worker(shared: Arc<Shared>, rx: crossbeam_channel::Receiver<Job>) {
    for job in rx {
        let end = run(&shared, &job);
        if let Some(at) = shared.dispatcher.finish(&job, &end) {
            // Another OOM arrived while this episode ran: still stuck now?
            let stuck = shared
                .env
                .ctl
                .oom_state(&job.cgroup)
                .ok()
                .flatten()
                .is_some_and(|s| s.under_oom);
            if stuck {
                shared
                    .dispatcher
                    .trigger(&job.cgroup, job.policy.clone(), at);
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs one episode to its end and writes its audit lines.
pub fn run(shared: &Shared, job: &Job) -> End {
    let policy = &job.policy;
    let audit_mode = policy.mode == Mode::Audit;
    let cg = &job.cgroup;
    let ctl = shared.env.ctl.as_ref();
    // The `oom` line is written before the first action (a long first step must not hide
    // the episode from the log), with under_oom from the first re-check.
    let mut pending_oom = Some(if job.resume {
        Record::new("oom", cg)
            .with("policy", policy.name.clone())
            .with("episode", job.episode)
            .with("resumed", true)
            .with("reason", "hold expired with usage above the original limit")
            .with("start_step", job.start_step)
    } else {
        shared.metrics.oom_event(&policy.name);
        Record::new("oom", cg)
            .with("policy", policy.name.clone())
            .with("episode", job.episode)
    });

    // For an OOM: stuck while under_oom. For a resume: stuck until the loan could be
    // given back (usage fits the original limit again).
    let check = || -> State {
        if job.resume {
            return match shared.env.loans.restore(ctl, cg) {
                Ok(Restore::Restored { old, new }) => {
                    shared.audit.log(
                        Record::new("restore", cg)
                            .with("old_limit", old)
                            .with("new_limit", new)
                            .with("reason", "hold_expired"),
                    );
                    State::Recovered(Instant::now())
                }
                Ok(Restore::Busy) => State::Stuck,
                Ok(Restore::Gone) => State::Gone,
                Ok(Restore::ChangedExternally { .. }) | Ok(Restore::NoLoan) => {
                    State::Recovered(Instant::now())
                }
                Err(e) => {
                    log::warn!("{cg}: restore failed: {e}");
                    State::Stuck
                }
            };
        }
        match ctl.oom_state(cg) {
            Ok(Some(st)) if st.under_oom => State::Stuck,
            Ok(Some(_)) => State::Recovered(Instant::now()),
            Ok(None) => State::Gone,
            Err(e) if e.is_gone() => State::Gone,
            Err(e) => {
                log::warn!("{cg}: {e}");
                State::Stuck
            }
        }
    };
    let poll = if job.resume {
        Duration::from_millis(50)
    } else {
        shared.settle_poll
    };

    let mut last_step: Option<usize> = None;
    let mut first_action_at: Option<Instant> = None;
    let end = 'steps: {
        for (i, step) in policy.steps.iter().enumerate().skip(job.start_step) {
            // Before the first step of an OOM episode the dispatcher has just read
            // under_oom 1; reading it again would only delay the rescue.
            let state = if i == 0 && !job.resume {
                State::Stuck
            } else {
                check()
            };
            if let (Some(rec), false) = (pending_oom.as_mut(), job.resume) {
                rec.set("under_oom", u8::from(state == State::Stuck));
            }
            if let Some(oom) = pending_oom.take() {
                shared.audit.log(oom);
            }
            match state {
                State::Gone => break 'steps gone(),
                State::Recovered(at) if !audit_mode => break 'steps resolved(job, last_step, at),
                _ => {}
            }
            let still_stuck = || job.resume || matches!(check(), State::Stuck);
            let ctx = StepCtx {
                cgroup: cg,
                policy,
                episode: job.episode,
                step: i,
                audit: audit_mode,
                resuming: job.resume,
                still_stuck: &still_stuck,
            };
            let report = action::perform(&shared.env, &ctx, &step.action);
            first_action_at.get_or_insert_with(Instant::now);
            // A raise leaves the journal unsynced so the limit is written sooner.
            shared.env.loans.sync();
            let name = step.action.name();
            shared.metrics.action(name, report.outcome.as_str());
            let mut rec = Record::new("action", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("mode", policy.mode.as_str())
                .with("step", i)
                .with("action", name)
                .with("outcome", report.outcome.as_str());
            if let Some(e) = &report.error {
                rec.set("error", e.clone());
            }
            rec.merge(report.fields);
            shared.audit.log(rec);
            if report.outcome == Outcome::Done {
                last_step = Some(i);
            }
            if audit_mode {
                continue;
            }
            if report.settle {
                match settle(&check, step.settle, poll) {
                    State::Gone => break 'steps gone(),
                    State::Recovered(at) => break 'steps resolved(job, Some(i), at),
                    State::Stuck => {}
                }
            }
        }
        match check() {
            State::Gone => gone(),
            State::Recovered(at) if !audit_mode => resolved(job, last_step, at),
            _ if audit_mode => End::Unresolved {
                reason: "audit mode".into(),
            },
            _ => End::Unresolved {
                reason: "all steps done".into(),
            },
        }
    };

    if let Some(oom) = pending_oom.take() {
        shared.audit.log(oom);
    }
    match &end {
        End::Resolved { by_step, stalled } => {
            shared.metrics.stall(*stalled);
            let by = by_step.map(|i| (i, policy.steps[i].action.name()));
            let mut rec = Record::new("resolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("stalled_ms", ms(*stalled))
                .with(
                    "by_step",
                    by.map(|(i, _)| Value::from(i)).unwrap_or(Value::Null),
                );
            if let Some((_, a)) = by {
                rec.set("by_action", a);
            }
            if let Some(t) = first_action_at {
                rec.set(
                    "first_action_ms",
                    ms(t.saturating_duration_since(job.detected)),
                );
            }
            shared.audit.log(rec);
        }
        End::Unresolved { reason } => {
            shared.metrics.unresolved(&policy.name);
            shared.audit.log(
                Record::new("unresolved", cg)
                    .with("episode", job.episode)
                    .with("policy", policy.name.clone())
                    .with("reason", reason.clone()),
            );
        }
    }
    end
}

fn gone() -> End {
    End::Unresolved {
        reason: "cgroup gone".into(),
    }
}

fn resolved(job: &Job, by_step: Option<usize>, at: Instant) -> End {
    End::Resolved {
        by_step,
        stalled: at.saturating_duration_since(job.detected),
    }
}

/// Polls for recovery for at most `limit`: fine-grained at first (most recoveries
/// happen within a millisecond of the action), coarser later.
fn settle(check: &dyn Fn() -> State, limit: Duration, poll: Duration) -> State {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        let st = check();
        if st != State::Stuck {
            return st;
        }
        let elapsed = start.elapsed();
        if elapsed >= limit {
            return State::Stuck;
        }
        // 100 polls at `poll`, then ten times slower.
        let step = if n < 100 { poll } else { poll * 10 };
        n += 1;
        std::thread::sleep(step.min(limit - elapsed));
    }
}
