//! Early action (`[early]`): act while usage approaches the limit, so that the workload
//! never enters the kernel's OOM wait. The event loop keeps one usage threshold eventfd
//! per watched cgroup whose policy has `[early]` (v1 `cgroup.event_control` with
//! `memory.usage_in_bytes`), at `at` of the limit then current. A threshold cannot be
//! moved, only closed and registered anew, so every limit the agent writes (a loan moves
//! the wall, a restore moves it back) is reported through [`crate::moves::Moves`],
//! which wakes the loop to re-register. An upward crossing starts an early episode
//! here, on a worker: the policy's early steps in order, each followed by its settle
//! wait, until the workload is away from the wall again (usage below the threshold of
//! the current limit, or the limit raised). If the cgroup reaches its limit meanwhile,
//! the early episode stops at once (a running hook is killed) and hands over to the
//! normal OOM episode.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::action::{self, Outcome, Report, StepCtx};
use crate::audit::Record;
use crate::cgroup::{CgroupPath, Controller};
use crate::dispatcher::{End, Job, HANDED_OVER};
use crate::policy::{Early, Mode};
use crate::shared::Shared;

/// Where the workload stands during an early episode.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Away from the wall again: usage below the threshold, or the limit raised.
    Away(Instant),
    /// Still close to the wall.
    Near,
    /// Under OOM: the early steps did not keep up.
    Wall,
    Gone,
}

/// Limit and usage now; `None` when the cgroup is gone.
fn look(ctl: &dyn Controller, cg: &CgroupPath) -> Option<(u64, u64)> {
    let limit = ctl.limits(cg).ok().flatten()?.memory;
    let usage = ctl.usage(cg).ok().flatten()?;
    Some((limit, usage))
}

fn state(ctl: &dyn Controller, cg: &CgroupPath, early: &Early, fired_limit: u64) -> State {
    match ctl.oom_state(cg) {
        Ok(Some(st)) if st.under_oom => return State::Wall,
        Ok(None) => return State::Gone,
        Err(e) if e.is_gone() => return State::Gone,
        _ => {}
    }
    match look(ctl, cg) {
        None => State::Gone,
        Some((limit, usage)) => {
            let below = early.threshold(limit).is_none_or(|t| usage < t);
            if below || limit > fired_limit {
                State::Away(Instant::now())
            } else {
                State::Near
            }
        }
    }
}

/// A workload hovering at its threshold crosses it up and down many times a second
/// when the early steps do not move the limit (audit mode, a hook that frees a
/// little): one early episode per second and registration at most. A moved limit
/// registers anew and is not held back.
pub const REPEAT_GAP: Duration = Duration::from_secs(1);

/// True if an upward crossing at `now` may start an early episode, given when the same
/// registration last started one.
pub fn may_repeat(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|l| now.saturating_duration_since(l) >= REPEAT_GAP)
}

/// True if `usage`, read when the threshold's eventfd fired, means the crossing was
/// upwards (the kernel signals crossings in both directions; one downward is no new
/// early episode).
pub fn is_upward(usage: u64, threshold: u64) -> bool {
    usage >= threshold
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs one early episode to its end and writes its audit lines: `early` when it
/// starts, an `action` line per step (with `early: true`), then `early_resolved` or
/// `early_unresolved`.
pub fn run(shared: &Shared, job: &Job) -> End {
    let cg = &job.cgroup;
    let ctl = shared.env.ctl.as_ref();
    // As for a stall (crate::identity): without the container's metadata, a policy
    // keyed on it may outrank this one; wait for it (until the wall), else audit-only.
    let settled = crate::identity::settle(shared, cg, &job.policy, shared.metadata_wait, &|| {
        shared.stop.load(Ordering::SeqCst)
            || shared.dispatcher.stopping()
            || matches!(ctl.oom_state(cg), Ok(Some(st)) if st.under_oom)
    });
    let policy = &settled.policy;
    let Some(early) = policy.early.as_ref() else {
        return End::unresolved("the policy has no [early] steps");
    };
    let audit_mode = policy.mode == Mode::Audit;
    let Some((fired_limit, fired_usage)) = look(ctl, cg) else {
        return End::Gone;
    };
    shared.metrics.early(&policy.name);
    let mut rec = Record::new("early", cg)
        .with("policy", policy.name.clone())
        .with("episode", job.episode)
        .with("usage", fired_usage)
        .with("limit", fired_limit)
        .with("headroom_bytes", fired_limit.saturating_sub(fired_usage));
    if let Some(t) = early.threshold(fired_limit) {
        rec.set("threshold", t);
    }
    rec.merge(settled.fields());
    shared.audit.log(rec);

    let stopping = || shared.stop.load(Ordering::SeqCst) || shared.dispatcher.stopping();
    let check = || state(ctl, cg, early, fired_limit);
    // A step still running when the wall is reached is cut short: the OOM episode
    // must not wait for a hook's timeout.
    let at_wall = || matches!(ctl.oom_state(cg), Ok(Some(st)) if st.under_oom);
    let cancelled = || stopping() || at_wall();
    let mut last_step = None;
    let end = 'steps: {
        for (i, step) in early.steps.iter().enumerate() {
            if stopping() {
                break 'steps End::Stopped;
            }
            shared
                .dispatcher
                .liveness
                .worker_beat(crate::episode::step_bound(step));
            match check() {
                State::Gone => break 'steps End::Gone,
                State::Wall => break 'steps End::unresolved(HANDED_OVER),
                State::Away(at) if !audit_mode => break 'steps away(job, last_step, at),
                _ => {}
            }
            let still_near = || !cancelled() && check() == State::Near;
            let name = step.action.name();
            let record = |event: &str| {
                let mut r = Record::new(event, cg)
                    .with("episode", job.episode)
                    .with("policy", policy.name.clone());
                if event == "action" {
                    r.set("mode", policy.mode.as_str());
                }
                r.with("early", true).with("step", i).with("action", name)
            };
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
                resuming: false,
                early: true,
                still_stuck: &still_near,
                taken: &taken,
                cancelled: &cancelled,
            };
            let report = action::perform(&shared.env, &ctx, &step.action);
            shared.env.loans.fsync_and_compact_if_long();
            shared.metrics.action(
                &policy.name,
                name,
                report.outcome.as_str(),
                report.sigkilled(),
            );
            let sent = taken_fields.borrow_mut().take();
            let mut rec = match &sent {
                Some(_) => record("action_result"),
                None => record("action"),
            }
            .with("outcome", report.outcome.as_str());
            if let Some(e) = &report.error {
                rec.set("error", e.clone());
            }
            let mut fields = report.fields.clone();
            if let Some(sent) = &sent {
                fields.retain(|k, v| sent.get(k) != Some(v));
            }
            rec.merge(fields);
            shared.audit.log(rec);
            if report.outcome == Outcome::Done {
                last_step = Some(i);
            }
            if audit_mode || !report.changed {
                continue;
            }
            match settle(&check, &stopping, step.settle, shared.settle_poll) {
                State::Gone => break 'steps End::Gone,
                State::Wall => break 'steps End::unresolved(HANDED_OVER),
                State::Away(at) => break 'steps away(job, Some(i), at),
                State::Near => {}
            }
        }
        match check() {
            State::Gone => End::Gone,
            State::Wall => End::unresolved(HANDED_OVER),
            State::Away(at) if !audit_mode => away(job, last_step, at),
            _ if audit_mode => End::unresolved("audit mode"),
            _ => End::unresolved("all early steps done, usage still near the limit"),
        }
    };

    match &end {
        End::Resolved { by_step, stalled } => {
            shared.metrics.stall_avoided(&policy.name);
            let mut rec = Record::new("early_resolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("took_ms", ms(*stalled))
                .with("by_step", by_step.map(Value::from).unwrap_or(Value::Null));
            if let Some(i) = by_step {
                rec.set("by_action", early.steps[*i].action.name());
            }
            if let Some((limit, usage)) = look(ctl, cg) {
                rec.set("limit", limit);
                rec.set("headroom_bytes", limit.saturating_sub(usage));
            }
            shared.audit.log(rec);
        }
        End::Unresolved { reason, .. } => {
            let mut rec = Record::new("early_unresolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("reason", reason.clone())
                .with("took_ms", ms(job.detected.elapsed()));
            if reason == HANDED_OVER {
                rec.set("oom_follows", true);
            }
            shared.audit.log(rec);
        }
        End::Gone => shared.audit.log(
            Record::new("early_unresolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("reason", "cgroup gone"),
        ),
        End::Stopped => shared.audit.log(
            Record::new("early_unresolved", cg)
                .with("episode", job.episode)
                .with("policy", policy.name.clone())
                .with("reason", "agent stopping"),
        ),
    }
    end
}

/// The early episode kept the workload from its wall; `stalled` is the time the
/// steps took (from the crossing to the workload being away from the wall).
fn away(job: &Job, by_step: Option<usize>, at: Instant) -> End {
    End::Resolved {
        by_step,
        stalled: at.saturating_duration_since(job.detected),
    }
}

/// Polls until the workload is away from the wall (or at it, or gone) for at most
/// `limit`: first every `poll`, doubling up to 16 ms.
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
        if st != State::Near {
            return st;
        }
        let elapsed = start.elapsed();
        if elapsed >= limit || stopping() {
            return State::Near;
        }
        std::thread::sleep(step.min(limit - elapsed));
        step = (step * 2).min(MAX_POLL.max(poll));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{v1::V1, Hierarchy, Kind};
    use crate::policy::{Amount, Early};

    fn fake(limit: u64, usage: u64, under_oom: bool) -> (tempfile::TempDir, V1) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("app");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("memory.oom_control"),
            format!("oom_kill_disable 1\nunder_oom {}\n", u8::from(under_oom)),
        )
        .unwrap();
        std::fs::write(d.join("memory.limit_in_bytes"), format!("{limit}\n")).unwrap();
        std::fs::write(d.join("memory.usage_in_bytes"), format!("{usage}\n")).unwrap();
        let v = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        (t, v)
    }

    fn early() -> Early {
        Early {
            at: Amount::Percent(0.75),
            steps: Vec::new(),
        }
    }

    #[test]
    fn away_from_the_wall_when_usage_falls_below_or_the_limit_rises() {
        let cg = CgroupPath::new("/app");
        let e = early();
        let (_t, v) = fake(32 << 20, 30 << 20, false);
        assert_eq!(state(&v, &cg, &e, 32 << 20), State::Near);
        let (_t, v) = fake(32 << 20, 20 << 20, false);
        assert!(matches!(state(&v, &cg, &e, 32 << 20), State::Away(_)));
        // A loan moved the wall: away, even with usage above the new threshold.
        let (_t, v) = fake(48 << 20, 40 << 20, false);
        assert!(matches!(state(&v, &cg, &e, 32 << 20), State::Away(_)));
        let (_t, v) = fake(32 << 20, 32 << 20, true);
        assert_eq!(state(&v, &cg, &e, 32 << 20), State::Wall);
        assert_eq!(
            state(&v, &CgroupPath::new("/gone"), &e, 32 << 20),
            State::Gone
        );
    }

    #[test]
    fn a_downward_crossing_is_not_an_episode() {
        assert!(is_upward(24 << 20, 24 << 20));
        assert!(is_upward(25 << 20, 24 << 20));
        assert!(!is_upward((24 << 20) - 4096, 24 << 20));
    }

    #[test]
    fn crossings_of_one_registration_start_one_episode_a_second() {
        let t0 = Instant::now();
        assert!(may_repeat(None, t0));
        assert!(!may_repeat(Some(t0), t0 + Duration::from_millis(300)));
        assert!(may_repeat(Some(t0), t0 + REPEAT_GAP));
    }
}
