//! Process-facing actions on real cgroups: `kill_all` and the -1000 promise.

use std::path::Path;
use std::time::Duration;

use oomwake::action::{self, Env, LoanBook, Outcome, StepCtx};
use oomwake::cgroup::{CgroupPath, Hierarchy};
use oomwake::policy::PolicySet;

use crate::common::*;

/// A `/proc` for the action whose entries for `pids` point at the real ones, except
/// `oom_score_adj`, which says what the test wants: no process here can be given -1000
/// (the sandbox's bounding set lacks CAP_SYS_RESOURCE), so the shield is faked and
/// everything else (the stuck cgroup, the pidfds, the kills) is real.
fn mirrored_proc(root: &Path, pids: &[(i32, i64)]) {
    for &(pid, adj) in pids {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        for f in ["stat", "status", "cmdline", "cgroup", "oom_score"] {
            std::os::unix::fs::symlink(format!("/proc/{pid}/{f}"), d.join(f)).unwrap();
        }
        std::fs::write(d.join("oom_score_adj"), format!("{adj}\n")).unwrap();
    }
}

fn always() -> bool {
    true
}

#[test]
fn kill_all_spares_a_shielded_task_in_a_stuck_cgroup() {
    let Some(()) = require_v1("kill_all_spares_a_shielded_task_in_a_stuck_cgroup") else {
        return;
    };
    let mut s = Scratch::new("killall-shield");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let shielded = s.hog(
        &cg,
        &["--touch", "4M", "--hold", "60s", "--tag", "shielded"],
    );
    assert!(shielded.report(Duration::from_secs(10)).is_some());
    let normal = s.hog(&cg, &["--touch", "40M", "--hold", "60s", "--tag", "normal"]);
    cg.wait_stuck(normal.pid);

    let proc_dir = tempfile::tempdir().unwrap();
    mirrored_proc(proc_dir.path(), &[(shielded.pid, -1000), (normal.pid, 0)]);
    let h = Hierarchy::detect(Path::new(MEMROOT), Path::new("/proc")).unwrap();
    let env = Env {
        ctl: Box::new(oomwake::cgroup::v1::V1::new(h)),
        proc_root: proc_dir.path().to_path_buf(),
        self_pid: std::process::id() as i32,
        loans: LoanBook::new(None),
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
        still_stuck: &always,
    };
    let r = action::perform(&env, &ctx, &oomwake::policy::Action::KillAll);
    assert_eq!(r.outcome, Outcome::Done, "{r:?}");
    assert_eq!(r.fields["pids"], serde_json::json!([normal.pid]), "{r:?}");
    assert_eq!(
        r.fields["spared"],
        serde_json::json!([shielded.pid]),
        "{r:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !s.alive(normal.pid)),
        "the normal task survived kill_all"
    );
    assert!(
        s.alive(shielded.pid),
        "kill_all killed a task with oom_score_adj -1000"
    );
    // The stall ended with the normal task's memory: the cgroup is usable again.
    assert!(wait_until(Duration::from_secs(10), || !cg.under_oom()));
}
