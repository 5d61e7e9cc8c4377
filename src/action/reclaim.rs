//! Reclaim: v1 `memory.force_empty` (reclaims what it can, tasks stay), and the
//! host-wide `drop_caches`.
//!
//! `force_empty` loops in the kernel for as long as each pass frees something: with a
//! task that keeps faulting pages back in (a reader refilling the page cache, a working
//! set paged back from swap), that is without end. It checks for a pending signal
//! between passes, so the write is made under a [`ThreadAlarm`]: after the step's
//! `timeout` the write returns `EINTR` and the episode goes on to its next step.

use std::io::Write;
use std::time::{Duration, Instant};

use super::{Env, Outcome, Report, StepCtx};
use crate::cgroup::Kind;
use crate::sys::ThreadAlarm;

/// After the first interrupt, how often it is repeated (in case it landed just before
/// the write began).
const REPEAT: Duration = Duration::from_millis(20);

pub fn reclaim(env: &Env, ctx: &StepCtx, timeout: Duration) -> Report {
    if ctx.audit {
        let usage = env.ctl.usage(ctx.cgroup).ok().flatten().unwrap_or(0);
        let cache = env
            .ctl
            .stat(ctx.cgroup)
            .ok()
            .flatten()
            .and_then(|s| s.get("total_cache").or(s.get("file")).copied());
        let mut r = Report::new(Outcome::Would).with("usage_bytes", usage);
        if let Some(c) = cache {
            r = r.with("reclaimable_cache_bytes", c);
        }
        return r;
    }
    if env.ctl.hierarchy().kind() != Kind::V1 {
        // v2 memory.reclaim asks for an amount and stops there.
        return match env.ctl.reclaim(ctx.cgroup) {
            Ok((before, after)) => {
                let freed = before.saturating_sub(after);
                let mut r = Report::new(Outcome::Done).with("freed_bytes", freed);
                // Nothing freed: nothing can have woken the sleepers, skip the wait.
                r.changed = freed > 0;
                r
            }
            Err(e) => Report::failed(e),
        };
    }
    let before = match env.ctl.usage(ctx.cgroup) {
        Ok(Some(u)) => u,
        Ok(None) => return Report::skipped("the cgroup is gone"),
        Err(e) => return Report::failed(e),
    };
    let path = env
        .ctl
        .hierarchy()
        .dir(ctx.cgroup)
        .join("memory.force_empty");
    let start = Instant::now();
    let timed_out = match force_empty(&path, timeout) {
        Ok(t) => t,
        Err(e) => return Report::failed(format!("{}: {e}", path.display())),
    };
    let took = start.elapsed();
    let after = env.ctl.usage(ctx.cgroup).ok().flatten().unwrap_or(before);
    let freed = before.saturating_sub(after);
    let mut r = Report::new(Outcome::Done)
        .with("freed_bytes", freed)
        .with("timed_out", timed_out)
        .with(
            "took_ms",
            u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        );
    // Nothing freed: nothing can have woken the sleepers, skip the wait.
    r.changed = freed > 0;
    r
}

/// Writes `memory.force_empty`, interrupted after `timeout`. `Ok(true)`: it was cut
/// short by the bound.
fn force_empty(path: &std::path::Path, timeout: Duration) -> std::io::Result<bool> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let alarm = ThreadAlarm::arm(timeout, REPEAT)?;
    // One write(2), not write_all: an EINTR must end it, not be retried.
    let res = f.write(b"0");
    drop(alarm);
    match res {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

pub fn drop_caches(env: &Env, ctx: &StepCtx, level: u8) -> Report {
    if ctx.audit {
        return Report::new(Outcome::Would).with("level", level);
    }
    let path = env.proc_root.join("sys/vm/drop_caches");
    match std::fs::write(&path, level.to_string()) {
        Ok(()) => Report::new(Outcome::Done).with("level", level),
        Err(e) => Report::failed(format!("{}: {e}", path.display())).with("level", level),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::testing;
    use crate::cgroup::CgroupPath;
    use crate::policy::PolicySet;

    #[test]
    fn drop_caches_writes_level_under_proc_root() {
        let t = tempfile::tempdir().unwrap();
        let knob = t.path().join("proc/sys/vm/drop_caches");
        std::fs::create_dir_all(knob.parent().unwrap()).unwrap();
        std::fs::write(&knob, "").unwrap();
        let env = testing::env(t.path(), &t.path().join("proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let r = drop_caches(&env, &testing::ctx(&cg, &set.policies()[0], false), 3);
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(std::fs::read_to_string(&knob).unwrap(), "3");
        std::fs::write(&knob, "").unwrap();
        let r = drop_caches(&env, &testing::ctx(&cg, &set.policies()[0], true), 1);
        assert_eq!(r.outcome, Outcome::Would);
        assert_eq!(std::fs::read_to_string(&knob).unwrap(), "");
    }
}
