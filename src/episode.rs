//! One OOM episode: the policy's steps in order, each followed by its settle wait and a
//! re-check, ending `resolved` (with the stall time) or `unresolved` (with why).
//! Episodes run on worker threads fed by the [`Dispatcher`](crate::dispatcher::Dispatcher).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::action::{self, Outcome, StepCtx};
use crate::audit::Record;
use crate::dispatcher::{End, Job};
use crate::loan::keeper::{give_back_resumed, Returned};
use crate::policy::Mode;
use crate::shared::Shared;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Stuck,
    Recovered(Instant),
    Gone,
}

/// A worker: runs episodes until the dispatcher tells it to exit.
pub fn worker(shared: Arc<Shared>, rx: crossbeam_channel::Receiver<Job>) {
    while let Some(job) = shared.dispatcher.next_job(&rx) {
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
        shared.dispatcher.job_done();
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
    // Written before the first action: a long first step must not hide the episode.
    // An OOM job is dispatched only after under_oom was read as 1.
    let oom = Record::new("oom", cg)
        .with("policy", policy.name.clone())
        .with("episode", job.episode);
    shared.audit.log(if job.resume {
        oom.with("resumed", true)
            .with("reason", "hold expired with usage above the original limit")
            .with("start_step", job.start_step)
    } else {
        shared.metrics.oom_event(&policy.name);
        oom.with("under_oom", 1)
    });

    // For an OOM: stuck while under_oom. For a resume: stuck until the loan could be
    // given back (usage fits the original limit again).
    let check = || -> State {
        if job.resume {
            return match give_back_resumed(shared, cg) {
                Returned::Yes => State::Recovered(Instant::now()),
                Returned::NotYet => State::Stuck,
                Returned::Gone => State::Gone,
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

/// Polls for recovery for at most `limit`, first every `poll`, then backing off
/// (doubling up to 16 ms): most recoveries show within a millisecond of the action, and
/// when many cgroups settle at once, tight polling would take the CPU the woken
/// workloads need.
fn settle(check: &dyn Fn() -> State, limit: Duration, poll: Duration) -> State {
    const MAX_POLL: Duration = Duration::from_millis(16);
    let start = Instant::now();
    let mut step = poll;
    loop {
        let st = check();
        if st != State::Stuck {
            return st;
        }
        let elapsed = start.elapsed();
        if elapsed >= limit {
            return State::Stuck;
        }
        std::thread::sleep(step.min(limit - elapsed));
        step = (step * 2).min(MAX_POLL.max(poll));
    }
}
