//! One OOM episode: the policy's steps in order, each preceded by a re-check and
//! followed by its settle wait, ending `resolved` (with the stall time) or `unresolved`
//! (with why and what would help). Episodes run on worker threads fed by the
//! [`Dispatcher`](crate::dispatcher::Dispatcher).

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::action::{self, Outcome, Report, StepCtx};
use crate::audit::Record;
use crate::cgroup::{CgroupPath, Controller};
use crate::dispatcher::{End, Job, Picture};
use crate::loan::keeper::{give_back_resumed, Returned};
use crate::policy::{Action, Mode};
use crate::shared::Shared;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Stuck,
    Recovered(Instant),
    Gone,
}

/// A worker: runs episodes until the dispatcher tells it to exit. A panic in an
/// episode (a bug) is caught here: it is logged and audited (`unresolved`, with the
/// panic's message), the episode ends as a failed one (so the stall is retried a
/// second later), the cgroup's subtree is no longer marked running, and the worker
/// goes on with the next job.
pub fn worker(shared: Arc<Shared>, rx: crossbeam_channel::Receiver<Job>) {
    while let Some(job) = shared.dispatcher.next_job(&rx) {
        run_job(&shared, job);
        shared.dispatcher.job_done();
    }
}

/// The reserved worker, started when the agent runs inside a managed cgroup: it runs
/// only the episodes of cgroups that hold the agent ([`Dispatcher::next_urgent_job`]),
/// so that the agent's own stall never waits for a busy pool, nor for a worker the pool
/// may not start while that cgroup is stuck. Not part of the pool's count.
///
/// [`Dispatcher::next_urgent_job`]: crate::dispatcher::Dispatcher::next_urgent_job
pub fn reserved_worker(shared: Arc<Shared>) {
    while let Some(job) = shared.dispatcher.next_urgent_job() {
        run_job(&shared, job);
    }
}

/// Runs one job to its end and tells the dispatcher (and the re-checks it asks for).
fn run_job(shared: &Arc<Shared>, job: Job) {
    let shared = shared.clone();
    let live = &shared.dispatcher.liveness;
    live.worker_busy();
    let finished = std::cell::Cell::new(false);
    let body = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let end = match std::panic::catch_unwind(AssertUnwindSafe(|| {
            if job.early {
                crate::early::run(&shared, &job)
            } else {
                run(&shared, &job)
            }
        })) {
            Ok(end) => end,
            Err(payload) => panicked(&shared, &job, payload.as_ref()),
        };
        let picture = match &end {
            End::Unresolved { .. } if !job.resume && !job.early => {
                picture(shared.env.ctl.as_ref(), &job.cgroup)
            }
            _ => None,
        };
        let again = shared.dispatcher.finish(&job, &end, picture);
        finished.set(true);
        for (cg, policy, at) in again {
            // An OOM arrived (here, or at an ancestor that waited): still stuck now?
            if oom_state(shared.env.ctl.as_ref(), &cg) == State::Stuck {
                shared.dispatcher.trigger(&cg, policy, at);
            }
        }
    }));
    if let Err(payload) = body {
        // Outside the episode (its picture, its end, the re-checks): the running
        // mark must not outlive it.
        let msg = panic_message(payload.as_ref());
        log::error!(
            "{}: episode {} worker panicked: {msg}",
            job.cgroup,
            job.episode
        );
        if !finished.get() {
            let end = End::Unresolved {
                reason: format!("{}: {msg}", crate::dispatcher::PANICKED),
                help: String::new(),
                failed: true,
            };
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                shared.dispatcher.finish(&job, &end, None)
            }));
        }
    }
    live.worker_idle();
}

/// The longest a step may wait by its policy: its grace or timeout, and its settle
/// (for the watchdog's [`Liveness`](crate::notify::Liveness)).
pub fn step_bound(step: &crate::policy::Step) -> Duration {
    let waits = match &step.action {
        Action::Reclaim { timeout }
        | Action::Exec { timeout, .. }
        | Action::KernelOomKill { timeout } => *timeout,
        Action::Signal { grace, .. } => *grace,
        _ => Duration::ZERO,
    };
    waits.saturating_add(step.settle)
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// An episode panicked: says so (log and `unresolved` audit line) and ends it as an
/// episode whose action failed, so that the stall is retried a second later.
/// A retry that panics again says so only at the retries that remind (1, 2, 4, 8 ...:
/// a stall whose episode panics every time is retried every second, and must not
/// write a line a second for ever).
fn panicked(shared: &Shared, job: &Job, payload: &(dyn std::any::Any + Send)) -> End {
    let msg = panic_message(payload);
    shared.metrics.unresolved(&job.policy.name);
    if job.remind {
        log::error!(
            "{}: episode {} panicked: {msg}; the stall is retried",
            job.cgroup,
            job.episode
        );
        let mut rec = Record::new("unresolved", &job.cgroup)
            .with("episode", job.episode)
            .with("policy", job.policy.name.clone())
            .with("reason", crate::dispatcher::PANICKED)
            .with("error", msg.clone());
        if job.retry > 0 {
            rec = rec.with("reminder", true).with("retry", job.retry);
        }
        shared.audit.log(rec);
    } else {
        log::debug!(
            "{}: episode {} panicked again: {msg}",
            job.cgroup,
            job.episode
        );
    }
    End::Unresolved {
        reason: format!("{}: {msg}", crate::dispatcher::PANICKED),
        help: String::new(),
        failed: true,
    }
}

/// What a stuck cgroup looks like (limit, usage, tasks in its subtree): the sweep
/// retries an unresolved stall at once when this changes.
pub fn picture(ctl: &dyn Controller, cg: &CgroupPath) -> Option<Picture> {
    let limit = ctl.limits(cg).ok().flatten()?.memory;
    let usage = ctl.usage(cg).ok().flatten()?;
    let tasks = ctl
        .hierarchy()
        .walk(cg)
        .iter()
        .map(|c| ctl.procs(c).ok().flatten().map_or(0, |p| p.len()))
        .sum();
    Some(Picture {
        limit,
        usage,
        tasks,
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// An OOM episode's question: is the cgroup still under OOM?
fn oom_state(ctl: &dyn Controller, cg: &CgroupPath) -> State {
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
}

/// A pinned episode's question (see [`crate::pinned`]): is the cgroup still at the
/// wall it was pinned at? A new limit (a loan) or usage that left the wall ends it;
/// `under_oom` says nothing here (it was 0 all along).
fn pinned_state(ctl: &dyn Controller, cg: &CgroupPath, limit: u64) -> State {
    let read = ctl.limits(cg).and_then(|l| Ok(l.zip(ctl.usage(cg)?)));
    match read {
        Ok(Some((l, usage))) => {
            if l.memory != limit || !crate::pinned::at_wall(usage, l.memory) {
                State::Recovered(Instant::now())
            } else {
                State::Stuck
            }
        }
        Ok(None) => State::Gone,
        Err(e) if e.is_gone() => State::Gone,
        Err(e) => {
            log::warn!("{cg}: {e}");
            State::Stuck
        }
    }
}

/// A resumed episode's question: could the loan be given back (the workload fits its
/// original limit again)? Gives it back when it can.
fn loan_given_back(shared: &Shared, cg: &CgroupPath) -> State {
    match give_back_resumed(shared, cg) {
        Returned::Yes => State::Recovered(Instant::now()),
        Returned::NotYet => State::Stuck,
        Returned::Gone => State::Gone,
    }
}

/// Why a step could not help, and what would, for the first `unresolved` line.
fn diagnose(action: &Action, report: &Report) -> Option<(String, String)> {
    if !matches!(report.outcome, Outcome::Skipped | Outcome::Failed) {
        return None;
    }
    let err = report.error.clone().unwrap_or_default();
    Some(match action {
        Action::RaiseLimit(_) if report.outcome == Outcome::Skipped => {
            let at = report.fields.get("old_limit").and_then(Value::as_u64);
            match at {
                Some(n) => (
                    format!("ceiling reached at {n} bytes"),
                    format!("the workload needs more than {n} bytes: raise the step's max_extra or max_limit, or add a step after raise_limit"),
                ),
                None => (err, String::new()),
            }
        }
        Action::Signal { .. } | Action::Kill { .. }
            if report.outcome == Outcome::Skipped
                && err.starts_with(crate::action::kill::UNREADABLE) =>
        {
            (
                "victims unreadable".to_string(),
                "the agent runs inside this stuck cgroup, where no file can be opened (ENOMEM), and a task it had not seen before the wall (or beyond its kill kit's 128 tasks and 64 cgroups) cannot be read there: give the agent a cgroup of its own, or end the policy with a raise_limit or kernel_oom_kill step".to_string(),
            )
        }
        Action::Signal { .. } | Action::Kill { .. } | Action::KillAll
            if report.outcome == Outcome::Skipped =>
        {
            (
                "no candidate victim".to_string(),
                "no process in the subtree may be signalled (none left, or only oom_score_adj -1000 ones): widen the victim filters, add another step, or raise the limit by hand".to_string(),
            )
        }
        _ => (format!("{}: {err}", action.name()), String::new()),
    })
}

/// Runs one episode to its end and writes its audit lines. A retry of an unresolved
/// stall (`job.retry > 0`) writes only what changed something, and a reminder.
pub fn run(shared: &Shared, job: &Job) -> End {
    let stopping = || shared.stop.load(Ordering::SeqCst) || shared.dispatcher.stopping();
    // A policy keyed on the container's metadata may outrank the one handed over:
    // wait (bounded) for the metadata, or go audit-only (issue 16.2).
    let settled = crate::identity::settle(
        shared,
        &job.cgroup,
        &job.policy,
        shared.metadata_wait,
        &stopping,
    );
    let policy = &settled.policy;
    // A resumed episode's step was chosen in the policy it was handed; when the
    // metadata that came during the wait chose another, its step is the one after that
    // policy's raise_limit (as after a reload that changed the policy), not the same
    // index in another list of steps.
    let start_step = if job.resume && !Arc::ptr_eq(policy, &job.policy) && settled.unknown.is_none()
    {
        crate::loan::resume_step(policy, job.start_step).unwrap_or(policy.steps.len())
    } else {
        job.start_step
    };
    let audit_mode = policy.mode == Mode::Audit;
    let quiet = job.retry > 0;
    let cg = &job.cgroup;
    let ctl = shared.env.ctl.as_ref();
    // Written before the first action: a long first step must not hide the episode.
    if job.resume {
        let mut rec = Record::new("oom", cg)
            .with("policy", policy.name.clone())
            .with("episode", job.episode)
            .with("resumed", true)
            .with("reason", "hold expired with usage above the original limit")
            .with("start_step", start_step);
        rec.merge(settled.fields());
        shared.audit.log(rec);
    } else if !quiet {
        shared.metrics.oom_event(&policy.name);
        let mut rec = Record::new("oom", cg)
            .with("policy", policy.name.clone())
            .with("episode", job.episode)
            .with("trigger", job.cause.trigger.as_str());
        // v1 has the kernel's flag; v2 the counter rises the trigger saw (none on a
        // re-check, which had no earlier read to compare with).
        match (job.cause.rises, &job.pinned) {
            (Some(r), _) => rec.set("events", serde_json::to_value(r).unwrap_or(Value::Null)),
            // No OOM at all: the line says why the agent acts anyway.
            (None, Some(p)) => {
                rec.set("under_oom", 0);
                rec.set("failcnt_delta", p.failcnt_delta);
                rec.set("usage", p.usage);
                rec.set("limit", p.limit);
                rec.set("file_bytes", p.file_bytes);
                rec.set("progress_events", p.progress_events);
                rec.set("cpu_ms", p.cpu_ms);
                rec.set("window_ms", p.window_ms);
            }
            (None, None) if ctl.hierarchy().kind() == crate::cgroup::Kind::V1 => {
                rec.set("under_oom", 1)
            }
            (None, None) => {}
        }
        rec.merge(settled.fields());
        shared.audit.log(rec);
    }
    crate::loan::fault::point("episode_start");

    let check = || -> State {
        if job.resume {
            loan_given_back(shared, cg)
        } else if let Some(p) = &job.pinned {
            pinned_state(ctl, cg, p.limit)
        } else {
            oom_state(ctl, cg)
        }
    };
    let poll = if job.resume {
        Duration::from_millis(50)
    } else {
        shared.settle_poll
    };

    let mut last_step: Option<usize> = None;
    let mut first_action_at: Option<Instant> = None;
    let mut diagnoses: Vec<(String, String)> = Vec::new();
    let mut failed = false;
    // The step whose SIGKILL emptied the cgroup, if one did: a container engine removes
    // a container's cgroup once its last task is gone, so "gone" after that step is the
    // stall ended by the kill, not a stall left behind.
    let mut killed_by: Option<usize> = None;
    let end = 'steps: {
        for (i, step) in policy.steps.iter().enumerate().skip(start_step) {
            if stopping() {
                break 'steps End::Stopped;
            }
            shared.dispatcher.liveness.worker_beat(step_bound(step));
            // Before every step, the first included: a job may have waited for a free
            // worker, and a stall that ended meanwhile needs nothing (one pread).
            match check() {
                State::Gone => break 'steps End::Gone,
                State::Recovered(at) if !audit_mode => break 'steps resolved(job, last_step, at),
                _ => {}
            }
            let still_stuck = || !stopping() && (job.resume || matches!(check(), State::Stuck));
            let name = step.action.name();
            // Built when written, not before the action: nothing is allocated or
            // formatted between the stall and the step that ends it.
            let record = |event: &str| {
                let mut r = Record::new(event, cg)
                    .with("episode", job.episode)
                    .with("policy", policy.name.clone());
                if event == "action" {
                    r.set("mode", policy.mode.as_str());
                }
                r.with("step", i).with("action", name)
            };
            // An action that waits after acting (a signal's grace) reports what it did
            // first: the line is written then, and its result when known.
            let taken_fields: RefCell<Option<Map<String, Value>>> = RefCell::new(None);
            let taken = |r: &Report| {
                let mut rec = record("action").with("outcome", r.outcome.as_str());
                rec.merge(r.fields.clone());
                rec.set("pending", true);
                shared.audit.log(rec);
                *taken_fields.borrow_mut() = Some(r.fields.clone());
            };
            let ctx = StepCtx {
                cgroup: cg,
                policy,
                episode: job.episode,
                step: i,
                audit: audit_mode,
                resuming: job.resume,
                early: false,
                still_stuck: &still_stuck,
                taken: &taken,
                cancelled: &stopping,
            };
            let report = action::perform(&shared.env, &ctx, &step.action);
            first_action_at.get_or_insert_with(Instant::now);
            crate::loan::fault::point("after_step");
            // A raise leaves the journal unsynced so the limit is written sooner.
            shared.env.loans.fsync_and_compact_if_long();
            shared.metrics.action(
                &policy.name,
                name,
                report.outcome.as_str(),
                report.sigkilled(),
            );
            failed |= report.outcome == Outcome::Failed;
            if let Some(d) = diagnose(&step.action, &report) {
                diagnoses.push(d);
            }
            let logged = taken_fields.borrow_mut().take();
            let changed_nothing = matches!(report.outcome, Outcome::Skipped | Outcome::Would);
            match logged {
                Some(sent) => {
                    // The result of an action already written: only what is new.
                    let mut rec = record("action_result").with("outcome", report.outcome.as_str());
                    if let Some(e) = &report.error {
                        rec.set("error", e.clone());
                    }
                    let mut rest = report.fields.clone();
                    rest.retain(|k, v| sent.get(k) != Some(v));
                    rec.merge(rest);
                    shared.audit.log(rec);
                }
                // A retry of an unresolved stall does not repeat what changed nothing.
                None if quiet && changed_nothing => {}
                None if quiet && report.outcome == Outcome::Failed && !job.remind => {}
                None => {
                    let mut rec = record("action").with("outcome", report.outcome.as_str());
                    if let Some(e) = &report.error {
                        rec.set("error", e.clone());
                    }
                    rec.merge(report.fields.clone());
                    shared.audit.log(rec);
                }
            }
            if report.outcome == Outcome::Done {
                last_step = Some(i);
            }
            if audit_mode {
                continue;
            }
            if report.sigkilled() > 0 {
                killed_by = Some(i);
            }
            if report.changed {
                match settle(&check, &stopping, step.settle, poll) {
                    State::Gone => break 'steps End::Gone,
                    State::Recovered(at) => break 'steps resolved(job, Some(i), at),
                    State::Stuck => {}
                }
            }
        }
        match check() {
            State::Gone => End::Gone,
            State::Recovered(at) if !audit_mode => resolved(job, last_step, at),
            _ if settled.unknown.is_some() => End::unresolved(METADATA_UNKNOWN),
            _ if audit_mode => End::unresolved("audit mode"),
            _ => {
                let reason = if diagnoses.is_empty() {
                    "all steps done".to_string()
                } else {
                    diagnoses
                        .iter()
                        .map(|d| d.0.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                let help = diagnoses
                    .iter()
                    .map(|d| d.1.as_str())
                    .filter(|h| !h.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                End::Unresolved {
                    reason,
                    help,
                    failed,
                }
            }
        }
    };

    let log_resolved = |by_step: Option<usize>, stalled: Duration, gone: bool| {
        shared.metrics.stall(&policy.name, stalled);
        let by = by_step.map(|i| (i, policy.steps[i].action.name()));
        let mut rec = Record::new("resolved", cg)
            .with("episode", job.episode)
            .with("policy", policy.name.clone())
            .with("stalled_ms", ms(stalled))
            .with(
                "by_step",
                by.map(|(i, _)| Value::from(i)).unwrap_or(Value::Null),
            );
        if let Some((_, a)) = by {
            rec.set("by_action", a);
        }
        if gone {
            rec.set("cgroup_gone", true);
        }
        if let Some(t) = first_action_at {
            rec.set(
                "first_action_ms",
                ms(t.saturating_duration_since(job.detected)),
            );
        }
        if quiet {
            rec.set("retry", job.retry);
        }
        shared.audit.log(rec);
    };
    match &end {
        End::Resolved { by_step, stalled } => log_resolved(*by_step, *stalled, false),
        End::Unresolved { .. } if quiet && !job.remind => {}
        End::Unresolved { reason, help, .. } => {
            shared.metrics.unresolved(&policy.name);
            let mut rec = Record::new("unresolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("reason", reason.clone());
            if settled.unknown.is_some() {
                rec.merge(settled.fields());
            }
            if quiet {
                // A reminder: the stall goes on; the next try backs off further.
                rec.set("reminder", true);
                rec.set("retry", job.retry);
            } else if !help.is_empty() {
                rec.set("help", help.clone());
            }
            shared.audit.log(rec);
        }
        // The kill ended the stall and the cgroup went with its last task (Docker,
        // containerd and systemd remove a container's cgroup when it exits).
        End::Gone if killed_by.is_some() => log_resolved(killed_by, job.detected.elapsed(), true),
        End::Gone => shared.audit.log(
            Record::new("unresolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("reason", "cgroup gone"),
        ),
        End::Stopped => shared.audit.log(
            Record::new("unresolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("reason", "agent stopping"),
        ),
    }
    end
}

/// The reason of a stall handled audit-only because the container's metadata, which a
/// higher-priority policy matches on, was unknown (see [`crate::identity`]).
pub const METADATA_UNKNOWN: &str = "container metadata unknown: audit only";

fn resolved(job: &Job, by_step: Option<usize>, at: Instant) -> End {
    End::Resolved {
        by_step,
        stalled: at.saturating_duration_since(job.detected),
    }
}

/// Polls for recovery for at most `limit`, first every `poll`, then backing off
/// (doubling up to 16 ms): most recoveries show within a millisecond of the action, and
/// when many cgroups settle at once, tight polling would take the CPU the woken
/// workloads need.
/// A stop request ends the wait (the step loop then stops).
fn settle(
    check: &dyn Fn() -> State,
    stopping: &dyn Fn() -> bool,
    limit: Duration,
    poll: Duration,
) -> State {
    const MAX_POLL: Duration = Duration::from_millis(16);
    let start = Instant::now();
    let mut step = poll;
    loop {
        let st = check();
        if st != State::Stuck {
            return st;
        }
        let elapsed = start.elapsed();
        if elapsed >= limit || stopping() {
            return State::Stuck;
        }
        std::thread::sleep(step.min(limit - elapsed));
        step = (step * 2).min(MAX_POLL.max(poll));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;

    /// Issue 16.2 on a whole episode: a stuck container cgroup whose name is unknown
    /// (a cache that is never filled), handed the catch-all that kills while a policy
    /// by container name (audit) ranks above it. The kill step only says what it
    /// would do, the real child in the cgroup lives, and the audit says why.
    #[test]
    fn an_episode_without_the_container_name_does_not_kill_with_the_catch_all() {
        const ID: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("memory");
        let proc_root = t.path().join("proc");
        let cgdir = crate::shared::fake_container_cgroup(&root, ID, true);
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::fs::write(cgdir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
        // What the victim reader and the pidfd re-check read of the child.
        let d = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for f in ["stat", "status", "cmdline"] {
            let real = std::fs::read(format!("/proc/{pid}/{f}")).unwrap();
            std::fs::write(d.join(f), real).unwrap();
        }
        std::fs::write(d.join("oom_score"), "0\n").unwrap();
        std::fs::write(d.join("oom_score_adj"), "0\n").unwrap();
        std::fs::write(d.join("cgroup"), format!("5:memory:/docker/{ID}\n")).unwrap();

        let all = crate::policy::load_str(
            "name='all'\npriority=0\n[match]\ncgroup=['/docker/*']\n[[step]]\naction='kill'\nsettle='50ms'\n",
            "all.toml",
        )
        .unwrap();
        let db = crate::policy::load_str(
            "name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n[[step]]\naction='kill'\n",
            "db.toml",
        )
        .unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let mut shared = Shared::for_test(
            t.path(),
            &root,
            vec![all, db],
            Arc::new(crate::container::Containers::detached().unwrap()),
            tx,
            Duration::from_millis(200),
        );
        shared.env.proc_root = proc_root;
        let cg = CgroupPath::new(&format!("/docker/{ID}"));
        let policy = shared.policies().select(&cg, true, None).cloned().unwrap();
        assert_eq!(policy.name, "all");
        let job = Job::new(cg.clone(), policy, 1, Instant::now());
        let end = run(&shared, &job);
        std::thread::sleep(Duration::from_millis(100));
        let alive = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        assert!(alive, "the catch-all killed a container of unknown name");
        assert!(
            matches!(&end, End::Unresolved { reason, .. } if reason == METADATA_UNKNOWN),
            "{end:?}"
        );
        assert!(shared.audit.flush(Duration::from_secs(5)));
        let lines: Vec<Value> = std::fs::read_to_string(t.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let oom = lines.iter().find(|l| l["event"] == "oom").unwrap();
        assert_eq!(oom["metadata"], "unknown", "{oom}");
        assert_eq!(oom["outranked_by"], "db", "{oom}");
        assert!(oom["metadata_wait_ms"].as_f64().unwrap() >= 200.0, "{oom}");
        let act = lines.iter().find(|l| l["event"] == "action").unwrap();
        assert_eq!(
            (act["outcome"].as_str(), act["mode"].as_str()),
            (Some("would"), Some("audit")),
            "{act}"
        );
        let un = lines.iter().find(|l| l["event"] == "unresolved").unwrap();
        assert_eq!(un["reason"], METADATA_UNKNOWN, "{un}");
        assert_eq!(un["metadata"], "unknown", "{un}");
    }

    /// An episode that panics at every retry (retried every second) writes its
    /// `unresolved` line at the retries that remind only.
    #[test]
    fn a_stall_panicking_at_every_retry_is_not_audited_every_second() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("memory");
        std::fs::create_dir_all(&root).unwrap();
        let p = crate::policy::load_str(
            "name='p'\n[match]\ncgroup=['/a']\n[[step]]\naction='kill'\n",
            "p.toml",
        )
        .unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let shared = Shared::for_test(
            t.path(),
            &root,
            vec![p],
            Arc::new(crate::container::Containers::disabled()),
            tx,
            Duration::ZERO,
        );
        let policy = shared.policies().policies()[0].clone();
        let job = |retry: u32, remind: bool| Job {
            cgroup: CgroupPath::new("/a"),
            policy: policy.clone(),
            episode: 7,
            detected: Instant::now(),
            start_step: 0,
            resume: false,
            retry,
            remind,
            early: false,
            cause: Default::default(),
            pinned: None,
        };
        // The first episode, then retries 1 to 8 (reminding at 1, 2, 4 and 8).
        let payload: Box<dyn std::any::Any + Send> = Box::new("boom");
        for (retry, remind) in (0..=8u32).map(|r| (r, r == 0 || r.is_power_of_two())) {
            let end = panicked(&shared, &job(retry, remind), payload.as_ref());
            assert!(
                matches!(end, End::Unresolved { failed: true, .. }),
                "{end:?}"
            );
        }
        assert!(shared.audit.flush(Duration::from_secs(5)));
        let lines: Vec<Value> = std::fs::read_to_string(t.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let retries: Vec<Value> = lines.iter().map(|l| l["retry"].clone()).collect();
        assert_eq!(
            retries,
            vec![Value::Null, 1.into(), 2.into(), 4.into(), 8.into()],
            "{lines:?}"
        );
        assert!(lines
            .iter()
            .all(|l| l["reason"] == crate::dispatcher::PANICKED && l["error"] == "boom"));
    }

    /// A resumed episode (hold expiry) handed the catch-all, with its step after the
    /// catch-all's raise_limit, while the container's name was unknown; the name came
    /// during the wait and chose `db`. The episode ran `db`'s steps from the
    /// catch-all's index: here its kill, skipping the reclaim after its own
    /// raise_limit. The step is the one after `db`'s raise_limit.
    #[test]
    fn a_resumed_episode_whose_policy_changes_with_the_metadata_starts_after_its_raise() {
        const ID: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("memory");
        let cgdir = root.join("docker").join(ID);
        std::fs::create_dir_all(&cgdir).unwrap();
        std::fs::write(
            cgdir.join("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 1\n",
        )
        .unwrap();
        const RAISE: &str = "[[step]]\naction='raise_limit'\nby='50%'\nmax_extra='100%'\n";
        let all = crate::policy::load_str(
            &format!("name='all'\nmode='audit'\npriority=0\n[match]\ncgroup=['/docker/*']\n[[step]]\naction='reclaim'\n{RAISE}[[step]]\naction='kill'\n"),
            "all.toml",
        )
        .unwrap();
        let db = crate::policy::load_str(
            &format!("name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n{RAISE}[[step]]\naction='reclaim'\n[[step]]\naction='kill'\n"),
            "db.toml",
        )
        .unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let shared = Shared::for_test(
            t.path(),
            &root,
            vec![all, db],
            Arc::new(crate::container::Containers::detached().unwrap()),
            tx,
            Duration::from_secs(5),
        );
        let cg = CgroupPath::new(&format!("/docker/{ID}"));
        let policy = shared.policies().select(&cg, true, None).cloned().unwrap();
        assert_eq!(policy.name, "all");
        // What the keeper hands over: the catch-all, at the step after its raise_limit.
        let start_step = crate::loan::resume_step(&policy, 1).unwrap();
        assert_eq!(start_step, 2);
        let job = Job {
            cgroup: cg.clone(),
            policy,
            episode: 1,
            detected: Instant::now(),
            start_step,
            resume: true,
            retry: 0,
            remind: true,
            early: false,
            cause: Default::default(),
            pinned: None,
        };
        let containers = shared.containers.clone();
        let put = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            containers.put(crate::container::Meta {
                id: ID.into(),
                info: crate::policy::ContainerInfo {
                    name: "db-1".into(),
                    ..Default::default()
                },
            });
        });
        let _ = run(&shared, &job);
        put.join().unwrap();
        assert!(shared.audit.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(t.path().join("audit.jsonl")).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let oom = lines.iter().find(|l| l["event"] == "oom").unwrap();
        assert_eq!(oom["policy"], "db", "{text}");
        assert_eq!(oom["start_step"], 1, "{text}");
        let first = lines.iter().find(|l| l["event"] == "action").unwrap();
        assert_eq!(first["action"], "reclaim", "{text}");
    }

    /// The embedded default's step named `name` (reclaim, raise_limit, signal, kill).
    fn action(name: &str) -> Action {
        PolicySet::embedded_default().policies()[0]
            .steps
            .iter()
            .find(|s| s.action.name() == name)
            .map(|s| s.action.clone())
            .unwrap()
    }

    /// Issue 9: the first `unresolved` line of a stall says why (the ceiling and where
    /// it was reached, or that no task may be signalled) and what would help.
    #[test]
    fn the_first_unresolved_line_says_why_and_what_would_help() {
        let raise = action("raise_limit");
        let at_ceiling = Report::skipped("limit 33554432 is already at the ceiling 33554432")
            .with("old_limit", 33_554_432u64)
            .with("new_limit", 33_554_432u64);
        let (why, help) = diagnose(&raise, &at_ceiling).unwrap();
        assert_eq!(why, "ceiling reached at 33554432 bytes");
        assert!(
            help.contains("33554432") && help.contains("max_limit"),
            "{help}"
        );

        let shielded =
            Report::skipped("every process in the cgroup is shielded (oom_score_adj -1000)");
        for a in [action("kill"), action("signal"), Action::KillAll] {
            let (why, help) = diagnose(&a, &shielded).unwrap();
            assert_eq!(why, "no candidate victim", "{}", a.name());
            assert!(help.contains("-1000"), "{}: {help}", a.name());
        }

        // The agent inside the stuck cgroup could not read any victim: that is the
        // reason given, with what would help, not "no candidate victim".
        let unreadable = Report::skipped(format!(
            "{}: opening /proc files fails there (ENOMEM)",
            crate::action::kill::UNREADABLE
        ));
        for a in [action("kill"), action("signal")] {
            let (why, help) = diagnose(&a, &unreadable).unwrap();
            assert_eq!(why, "victims unreadable", "{}", a.name());
            assert!(help.contains("cgroup of its own"), "{}: {help}", a.name());
        }

        // A failed write is named with its error, and nothing specific is suggested.
        let (why, help) = diagnose(&raise, &Report::failed("EBUSY")).unwrap();
        assert_eq!((why.as_str(), help.as_str()), ("raise_limit: EBUSY", ""));
        // A raise skipped for another reason (an unlimited cgroup) says that reason.
        let unlimited = Report::skipped("the limit is unlimited: nothing to raise");
        let (why, _) = diagnose(&raise, &unlimited).unwrap();
        assert_eq!(why, "the limit is unlimited: nothing to raise");
        // Steps that did something, or would have, are no reason.
        assert!(diagnose(&raise, &Report::new(Outcome::Done)).is_none());
        assert!(diagnose(&action("kill"), &Report::new(Outcome::Would)).is_none());
    }
}
