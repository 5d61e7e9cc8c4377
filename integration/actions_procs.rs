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

fn never() -> bool {
    false
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

/// The default audit sink is stderr: a chatty hook must not break its JSON Lines.
#[test]
fn hook_output_lands_bounded_in_the_audit_line_not_on_stderr() {
    let Some(()) = require_v1("hook_output_lands_bounded_in_the_audit_line_not_on_stderr") else {
        return;
    };
    let mut s = Scratch::new("exec-output");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let tmp = tempfile::tempdir().unwrap();
    let policies = tmp.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let policy = format!(
        r#"name = "chatty"
[match]
cgroup = ["{}"]

[[step]]
action = "exec"
command = ["/bin/sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo stdout line $i; echo stderr line $i >&2; i=$((i+1)); done"]
timeout = "20s"

[[step]]
action = "kill"
"#,
        cg.rel
    );
    std::fs::write(policies.join("p.toml"), policy).unwrap();
    let stderr_path = tmp.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let mut agent = std::process::Command::new(oomwake_bin())
        .arg("run")
        .arg("--config")
        .arg(tmp.path().join("oomwake.toml"))
        .arg("--cgroup-root")
        .arg(MEMROOT)
        .arg("--policies")
        .arg(&policies)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .env("RUST_LOG", "off")
        .stderr(std::process::Stdio::from(stderr))
        .spawn()
        .unwrap();
    let lines = || -> Vec<String> { read(&stderr_path).lines().map(str::to_string).collect() };
    let has = |ev: &str| {
        lines().iter().any(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["event"] == ev && v["cgroup"] == cg.rel.as_str())
        })
    };
    let watched = wait_until(Duration::from_secs(10), || has("watch"));
    let hog = if watched {
        let hog = s.hog(&cg, &["--touch", "40M", "--hold", "60s"]);
        cg.wait_stuck(hog.pid);
        Some(hog)
    } else {
        None
    };
    let resolved = watched && wait_until(Duration::from_secs(30), || has("resolved"));
    let _ = agent.kill();
    let _ = agent.wait();
    let text = read(&stderr_path);
    assert!(hog.is_some() && resolved, "no episode ran:\n{text}");
    let mut exec_line = None;
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("stderr is not JSON Lines ({e}): {l:?}"));
        if v["event"] == "action" && v["action"] == "exec" {
            exec_line = Some(v);
        }
    }
    let exec = exec_line.unwrap_or_else(|| panic!("no exec action line:\n{text}"));
    assert!(exec["stdout"]
        .as_str()
        .unwrap()
        .starts_with("stdout line 0\n"));
    assert!(exec["stderr"]
        .as_str()
        .unwrap()
        .starts_with("stderr line 0\n"));
    assert!(exec["stdout"].as_str().unwrap().len() <= oomwake::action::exec::OUTPUT_CAP);
    assert!(exec["stderr"].as_str().unwrap().len() <= oomwake::action::exec::OUTPUT_CAP);
    assert_eq!(exec["output_truncated"], true);
}
