//! `reclaim` on real cgroups: v1 `memory.force_empty` is bounded by the step's
//! `timeout`, even while a task keeps refilling the page cache it empties.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// Starts, in `cg`, a reader that writes a 64 MiB file (page cache charged to `cg`) and
/// then re-reads it without end: whatever force_empty evicts comes straight back, so
/// each of its passes frees something and its loop has no end of its own.
fn cache_churner(s: &mut Scratch, cg: &Cg, file: &std::path::Path) -> i32 {
    let script = format!(
        "echo $$ > {procs}; head -c 64M /dev/zero > {f}; echo ready; \
         while :; do cat {f} > /dev/null; done",
        procs = cg.dir.join("cgroup.procs").display(),
        f = file.display()
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    let (pid, rx) = s.spawn(cmd);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).ok().as_deref(),
        Some("ready"),
        "the cache churner did not start"
    );
    pid
}

fn always() -> bool {
    true
}

fn never() -> bool {
    false
}

/// Not stuck: in a stuck cgroup the kernel has already evicted the cache before it
/// declared the OOM, and without swap (none here) force_empty then ends at once. The
/// long case is a cgroup whose pages come back as fast as they go, which the churner
/// makes: measured here, an unbounded force_empty on it ran about 2 s.
#[test]
fn reclaim_is_cut_short_by_its_timeout() {
    let Some(()) = require_v1("reclaim_is_cut_short_by_its_timeout") else {
        return;
    };
    use oomwake::action::{self, Env, LoanBook, Outcome, StepCtx};
    use oomwake::cgroup::{CgroupPath, Hierarchy};
    use oomwake::policy::{Action, PolicySet};

    let mut s = Scratch::new("reclaim-bound");
    let cg = s.cgroup("", Some(256 * MIB), false);
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("reclaim-churn-{}", std::process::id()));
    let churner = cache_churner(&mut s, &cg, &file);
    let h =
        Hierarchy::detect(std::path::Path::new(MEMROOT), std::path::Path::new("/proc")).unwrap();
    let env = Env {
        ctl: Box::new(oomwake::cgroup::v1::V1::new(h)),
        proc_root: "/proc".into(),
        self_pid: std::process::id() as i32,
        loans: LoanBook::new(None),
        armed: oomwake::armed::Armed::new(),
    };
    let set = PolicySet::embedded_default();
    let path = CgroupPath::new(&cg.rel);
    let ctx = StepCtx {
        cgroup: &path,
        policy: &set.policies()[0],
        episode: 1,
        step: 0,
        audit: false,
        resuming: false,
        early: false,
        still_stuck: &always,
        taken: &|_| {},
        cancelled: &never,
    };
    let usage = cg.usage();
    let r = action::perform(
        &env,
        &ctx,
        &Action::Reclaim {
            timeout: Duration::from_millis(50),
        },
    );
    let _ = std::fs::remove_file(&file);
    // perform returned: the step after it can run. The bound, not the kernel, ended it.
    assert_eq!(r.outcome, Outcome::Done, "{r:?}");
    assert_eq!(r.fields["timed_out"], true, "usage before {usage}: {r:?}");
    assert!(r.fields["took_ms"].is_u64(), "{r:?}");
    assert!(r.fields["freed_bytes"].is_u64(), "{r:?}");
    assert!(s.alive(churner), "reclaim keeps the tasks");
}
