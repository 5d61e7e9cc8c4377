//! The agent inside the cgroup it rescues (a sidecar sharing a pod's limit): its memory
//! is resident and locked before the stall, so it does not park itself in the wait it
//! has to end, and it still answers SIGTERM (root, cgroup v1).
//!
//! Not yet covered: resolving that stall. Writes that need new page cache (the journal
//! append before a raise, the audit file) are charged to the stuck cgroup and fail with
//! ENOMEM; see CHANGELOG.

use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use crate::common::*;

const RAISE: &str = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
"#;

#[test]
fn agent_inside_the_stuck_cgroup_is_not_parked_and_stops_on_sigterm() {
    let Some(()) = require_v1("agent_inside_the_stuck_cgroup_is_not_parked_and_stops_on_sigterm")
    else {
        return;
    };
    let mut s = Scratch::new("inside");
    let cg = s.cgroup("", Some(128 * MIB), true);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("inside", &cg.rel, "", RAISE),
    )
    .unwrap();
    // The shell joins the cgroup, then becomes the agent: every page the agent ever
    // faults in is charged to the cgroup it watches.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$1/cgroup.procs\" && exec \"$2\" run --config \"$3/oomwake.toml\" --cgroup-root \"$4\" --policies \"$3/policies\" --state-dir \"$3/state\" --audit-log \"$3/audit.jsonl\" 2>\"$3/agent.log\"")
        .arg("sh")
        .arg(&cg.dir)
        .arg(oomwake_bin())
        .arg(tmp.path())
        .arg(MEMROOT)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let (agent_pid, _out) = s.spawn(cmd);
    let audit = tmp.path().join("audit.jsonl");
    let logged = |event: &str| {
        read(&audit)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["event"] == event && v["cgroup"] == cg.rel.as_str())
    };
    assert!(
        wait_until(Duration::from_secs(20), || logged("watch")),
        "agent never watched; log:\n{}",
        read(&tmp.path().join("agent.log"))
    );
    assert!(
        cg.procs().contains(&agent_pid),
        "the agent is not in the cgroup"
    );
    let agent_usage = cg.usage();

    // The hog fills what is left: the cgroup, agent included, is at its wall.
    let _hog = s.hog(&cg, &["--touch", "160M", "--hold", "30s"]);
    // The cgroup reaches its wall (the agent may resolve it at once, when the kernel
    // lets its journal append through).
    let walled = wait_until(Duration::from_secs(20), || {
        cg.under_oom() || cg.limit() > 128 * MIB
    });
    assert!(walled, "the hog never reached the wall");
    // The agent runs its episode in the stuck cgroup (it reads, formats and logs) and
    // its loop keeps sweeping: none of its threads may fault into the OOM wait.
    let parked = wait_until(Duration::from_secs(5), || any_thread_in_oom_wait(agent_pid));
    assert!(
        !parked,
        "an agent thread sleeps in mem_cgroup_oom_synchronize; log:\n{}",
        read(&tmp.path().join("agent.log"))
    );

    // SIGTERM is still answered (the loop is not parked in the OOM wait).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let end = Instant::now() + Duration::from_secs(20);
    let mut gone = false;
    while Instant::now() < end && !gone {
        gone = !s.alive(agent_pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent_log = read(&tmp.path().join("agent.log"));
    assert!(
        gone,
        "the agent did not stop on SIGTERM; threads: {}; signals: {}; log:\n{agent_log}",
        threads(agent_pid),
        read(std::path::Path::new(&format!("/proc/{agent_pid}/status")))
            .lines()
            .filter(|l| l.starts_with("Sig") || l.starts_with("ShdPnd"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let locked = agent_log
        .lines()
        .find(|l| l.contains("memory locked:"))
        .unwrap_or("(no memory locked line)");
    eprintln!(
        "agent inside the cgroup: {locked}; cgroup usage with the agent alone {} KiB",
        agent_usage >> 10
    );
}

/// Each thread of `pid` with its wait channel, for failure messages.
fn threads(pid: i32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .map(|t| {
                    format!(
                        "{}:{}",
                        read(&t.path().join("comm")).trim(),
                        read(&t.path().join("wchan"))
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
