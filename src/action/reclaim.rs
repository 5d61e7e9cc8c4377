//! Reclaim: v1 `memory.force_empty` and v2 `memory.reclaim` (both reclaim what they
//! can, the tasks stay), and the host-wide `drop_caches`.
//!
//! Both reclaim writes loop in the kernel, and can do so for long (v1 without end while a
//! task refills what it empties), so the controller bounds them by the step's `timeout`:
//! after it the write returns and the episode goes on to its next step. The `action`
//! line says how the request ended: `timed_out`, and on v2 `requested_bytes` and
//! `target_reached` (false when the kernel answered EAGAIN: it could not reclaim that
//! much, which is recorded, not a failure).

use std::time::Duration;

use super::{Env, Outcome, Report, StepCtx};
use crate::cgroup::ReclaimEnd;

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
    let done = match env.ctl.reclaim(ctx.cgroup, timeout) {
        Ok(Some(d)) => d,
        Ok(None) => return Report::skipped("the cgroup is gone"),
        Err(e) => return Report::failed(e),
    };
    let freed = done.freed();
    let mut r = Report::new(Outcome::Done)
        .with("freed_bytes", freed)
        .with("timed_out", done.end == ReclaimEnd::TimedOut)
        .with(
            "took_ms",
            u64::try_from(done.took.as_millis()).unwrap_or(u64::MAX),
        );
    if let Some(asked) = done.requested {
        r = r
            .with("requested_bytes", asked)
            .with("target_reached", done.end == ReclaimEnd::Finished);
    }
    // Nothing freed: nothing can have woken the sleepers, skip the wait.
    r.changed = freed > 0;
    r
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
