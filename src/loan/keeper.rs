//! The agent-facing side of loans: recovery of journaled loans at start, the keeper
//! thread that gives headroom back (and resumes episodes whose hold expired), the
//! restores at shutdown, and the one builder of the `restore` audit line.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{unix_ms, Restore, TickEvent};
use crate::audit::Record;
use crate::cgroup::CgroupPath;
use crate::journal::LoanRecord;
use crate::shared::Shared;

/// The `restore` audit line: a loan given back.
pub fn restore_record(cg: &CgroupPath, old: u64, new: u64, reason: &str) -> Record {
    Record::new("restore", cg)
        .with("old_limit", old)
        .with("new_limit", new)
        .with("reason", reason)
}

/// At start, every journaled loan is either given back (hold expired, or the
/// cgroup's limit no longer what we lent) or re-adopted with its remaining hold.
pub fn recover(shared: &Shared, recs: Vec<LoanRecord>) {
    if recs.is_empty() {
        return;
    }
    let now_ms = unix_ms();
    let (expired, live): (Vec<_>, Vec<_>) = recs
        .into_iter()
        .partition(|r| r.hold_until_unix_ms <= now_ms);
    let loans = &shared.env.loans;
    loans.adopt(live.clone());
    loans.adopt(expired.clone());
    for r in &live {
        log::info!(
            "re-adopted the loan on {} ({} -> {} bytes)",
            r.cgroup,
            r.original.memory,
            r.lent.memory
        );
    }
    for r in expired {
        match loans.restore(shared.env.ctl.as_ref(), &r.cgroup) {
            Ok(Restore::Restored { old, new }) => {
                shared
                    .audit
                    .log(restore_record(&r.cgroup, old, new, "startup"))
            }
            Ok(Restore::DoesNotFit) => log::warn!(
                "{}: hold expired while the agent was down and usage is above the original limit; keeping the loan",
                r.cgroup
            ),
            Ok(other) => log::info!("{}: journaled loan dropped: {other:?}", r.cgroup),
            Err(e) => log::error!("{}: restoring journaled loan failed: {e}", r.cgroup),
        }
    }
}

/// The keeper thread: gives headroom back and resumes episodes whose hold expired.
pub fn run(shared: Arc<Shared>, every: Duration) {
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(every);
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        for ev in shared
            .env
            .loans
            .tick(shared.env.ctl.as_ref(), Instant::now())
        {
            match ev {
                TickEvent::Restored {
                    cgroup,
                    old,
                    new,
                    reason,
                } => shared.audit.log(restore_record(&cgroup, old, new, reason)),
                TickEvent::Resume {
                    cgroup,
                    policy,
                    episode,
                    step,
                } => {
                    let set = shared.policies();
                    let p = set.policies().iter().find(|p| p.name == policy).cloned();
                    match p {
                        Some(p) if step < p.steps.len() => {
                            shared.dispatcher.resume(&cgroup, p, episode, step);
                        }
                        Some(_) => log::warn!(
                            "{cgroup}: hold expired, usage above the original limit, and policy {policy} has no step after raise_limit; retrying the restore"
                        ),
                        None => log::warn!(
                            "{cgroup}: hold expired but policy {policy} is gone; retrying the restore"
                        ),
                    }
                }
                TickEvent::GivenUp { cgroup, why } => {
                    log::warn!("{cgroup}: loan dropped: {why}");
                }
            }
        }
    }
}

/// At shutdown: gives every loan back where usage allows; what does not fit stays in
/// the journal for the next start.
pub fn restore_all(shared: &Shared) {
    for (cg, r) in shared.env.loans.restore_all(shared.env.ctl.as_ref()) {
        match r {
            Ok(Restore::Restored { old, new }) => {
                shared.audit.log(restore_record(&cg, old, new, "shutdown"))
            }
            Ok(Restore::DoesNotFit) => log::warn!(
                "{cg}: usage is still above the original limit; the loan stays in the journal and is restored at the next start"
            ),
            Ok(other) => log::info!("{cg}: loan dropped at shutdown: {other:?}"),
            Err(e) => log::error!("{cg}: restoring at shutdown failed: {e}; kept in the journal"),
        }
    }
}
