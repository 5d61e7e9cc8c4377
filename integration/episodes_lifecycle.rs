//! An episode's life on real cgroups: the re-check before the first step, the signal
//! recorded when sent, shutdown that stops episodes before giving loans back, episode
//! ids across restarts, and registration failures that leave a cgroup covered.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

fn pid_alive(pid: i32) -> bool {
    // Not our child: gone (or a zombie of another parent) when its stat says so.
    let st = proc_state(pid);
    !st.is_empty() && st != "Z"
}

#[test]
fn a_job_that_waited_for_a_worker_rechecks_before_its_first_step() {
    let Some(()) = require_v1("a_job_that_waited_for_a_worker_rechecks_before_its_first_step")
    else {
        return;
    };
    let mut s = Scratch::new("recheck");
    let a = s.cgroup("a", Some(32 * MIB), true);
    let b = s.cgroup("b", Some(32 * MIB), true);
    let slow = r#"
[[step]]
action = "exec"
command = ["/bin/sleep", "4"]
timeout = "10s"
settle = "100ms"

[[step]]
action = "kill"
victim = "largest_rss"
"#;
    let tmp = Agent::dir(&[
        ("a.toml", &policy("slow", &a.rel, "", slow)),
        ("b.toml", &policy("quick", &b.rel, "", KILL)),
    ]);
    // One worker: B's job waits behind A's slow episode.
    std::fs::write(
        tmp.path().join("oomwake.toml"),
        "workers = 1\nmax_workers = 1\n",
    )
    .unwrap();
    let agent = Agent::start_in(tmp, &[]);
    agent.expect("watch", &b.rel, Duration::from_secs(10));
    let ha = s.hog(&a, &["--touch", "40M", "--hold", "120s"]);
    agent.expect("oom", &a.rel, Duration::from_secs(30));
    let hb = s.hog(&b, &["--touch", "40M", "--hold", "120s"]);
    b.wait_stuck(hb.pid);
    // The stall at B ends by other means before a worker is free for it.
    write(
        &b.dir.join("memory.limit_in_bytes"),
        &(64 * MIB).to_string(),
    );
    assert!(hb.report(Duration::from_secs(10)).is_some());
    // A's episode ends with its kill; then B's job runs and must find nothing to do.
    assert!(wait_until(Duration::from_secs(20), || !s.alive(ha.pid)));
    agent.expect("resolved", &b.rel, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    assert!(s.alive(hb.pid), "audit:\n{:#?}", agent.audit());
    assert!(
        agent.events("action", &b.rel).is_empty(),
        "{:#?}",
        agent.events("action", &b.rel)
    );
}

#[test]
fn the_signal_is_recorded_when_sent_not_after_the_grace() {
    let Some(()) = require_v1("the_signal_is_recorded_when_sent_not_after_the_grace") else {
        return;
    };
    let mut s = Scratch::new("grace");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let steps = r#"
[[step]]
action = "signal"
signal = "SIGTERM"
victim = "largest_rss"
grace = "30s"
"#;
    let mut agent = Agent::start(&[("p.toml", &policy("term", &cg.rel, "", steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    // A victim that ignores SIGTERM keeps the agent in its grace.
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(format!(
        "trap '' TERM; exec {} --join {} --touch 40M --hold 120s",
        hog_bin(),
        cg.dir.display()
    ));
    let (pid, _out) = s.spawn(cmd);
    cg.wait_stuck(pid);
    let act = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["event"] == "action" && v["cgroup"] == cg.rel.as_str()
        })
        .unwrap_or_else(|| panic!("no action line during the grace; log:\n{}", agent.log()));
    assert_eq!(act["signal"], "SIGTERM");
    assert_eq!(act["pid"], pid);
    assert_eq!(act["outcome"], "done");
    assert_eq!(act["pending"], true);
    assert!(s.alive(pid), "the victim ignores SIGTERM");
    // Stopped during the grace: the result is written as the wait is cut short.
    assert!(agent.stop().is_some(), "log:\n{}", agent.log());
    let res = agent.expect("action_result", &cg.rel, Duration::from_secs(1));
    assert_eq!(res["exited"], false);
    assert_eq!(res["episode"], act["episode"]);
}

#[test]
fn shutdown_stops_episodes_and_kills_running_hooks_before_restoring() {
    let Some(()) = require_v1("shutdown_stops_episodes_and_kills_running_hooks_before_restoring")
    else {
        return;
    };
    let mut s = Scratch::new("shutdown");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    let steps = format!(
        r#"
[[step]]
action = "exec"
command = ["/bin/sh", "-c", "echo $$ > {}; exec /bin/sleep 60"]
timeout = "120s"
settle = "100ms"

[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
"#,
        pidfile.path().display()
    );
    let mut agent = Agent::start(&[("p.toml", &policy("hook", &cg.rel, "", &steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "120s"]);
    cg.wait_stuck(hog.pid);
    let mut hook = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            hook = read(pidfile.path()).trim().parse().unwrap_or(0);
            hook > 0
        }),
        "hook never ran; log:\n{}",
        agent.log()
    );
    assert!(pid_alive(hook));
    let t = Instant::now();
    let st = agent.stop();
    assert!(st.is_some(), "shutdown hung; log:\n{}", agent.log());
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(
        wait_until(Duration::from_secs(2), || !pid_alive(hook)),
        "hook {hook} orphaned after shutdown"
    );
    // No step after the stop: nothing lent, nothing journaled.
    assert_eq!(cg.limit(), 32 * MIB);
    assert!(!agent.journal().contains(&cg.rel), "{}", agent.journal());
    let un = agent.expect("unresolved", &cg.rel, Duration::from_secs(1));
    assert_eq!(un["reason"], "agent stopping");
}

#[test]
fn episode_ids_do_not_repeat_across_restarts() {
    let Some(()) = require_v1("episode_ids_do_not_repeat_across_restarts") else {
        return;
    };
    let mut s = Scratch::new("ids");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let mut agent = Agent::start(&[("p.toml", &policy("ids", &cg.rel, "", KILL))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let h1 = s.hog(&cg, &["--touch", "40M", "--hold", "120s"]);
    let first = agent.expect("resolved", &cg.rel, Duration::from_secs(15));
    assert!(wait_until(Duration::from_secs(5), || !s.alive(h1.pid)));
    assert!(agent.stop().is_some());
    let tmp = agent.crash();
    let audit = tmp.path().join("audit.jsonl");
    std::fs::rename(&audit, tmp.path().join("audit.1.jsonl")).unwrap();
    let agent = Agent::start_in(tmp, &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let h2 = s.hog(&cg, &["--touch", "40M", "--hold", "120s"]);
    let second = agent.expect("resolved", &cg.rel, Duration::from_secs(15));
    assert!(wait_until(Duration::from_secs(5), || !s.alive(h2.pid)));
    let (a, b) = (first["episode"].as_u64(), second["episode"].as_u64());
    assert!(a.is_some() && b.is_some() && a != b, "{first}\n{second}");
    assert!(b > a, "ids grow across restarts: {a:?} then {b:?}");
}

#[test]
fn failed_epoll_add_keeps_the_cgroup_covered_and_is_retried() {
    let Some(()) = require_v1("failed_epoll_add_keeps_the_cgroup_covered_and_is_retried") else {
        return;
    };
    let mut s = Scratch::new("epollfail");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("cov", &cg.rel, "", KILL))]);
    let agent = Agent::start_in_env(tmp, &[], &[("OOMWAKE_FAULT_EPOLL_ADD", "1")]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .log()
            .contains("registered for OOM events on retry")),
        "log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("epoll add"), "log:\n{}", agent.log());
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "120s"]);
    agent.expect("resolved", &cg.rel, Duration::from_secs(15));
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    assert!(
        !Path::new(&format!("/proc/{}", hog.pid))
            .join("wchan")
            .exists()
            || !s.alive(hog.pid)
    );
}

#[test]
fn a_second_stop_signal_cuts_a_hung_shutdown_short() {
    let Some(()) = require_v1("a_second_stop_signal_cuts_a_hung_shutdown_short") else {
        return;
    };
    let mut s = Scratch::new("secondterm");
    let cg = s.cgroup("", Some(32 * MIB), true);
    // A loan the keeper will not give back early (restore_after 60 s).
    let steps = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
restore_after = "60s"
"#;
    let tmp = Agent::dir(&[("p.toml", &policy("lend", &cg.rel, "", steps))]);
    // The shutdown restore hangs between its two writes.
    let mut agent = Agent::start_in_env(
        tmp,
        &[],
        &[("OOMWAKE_FAULT", "after_restore_memory:pause-60000")],
    );
    let (_hog, _) = s.stall_resolved(
        &agent,
        &cg,
        &["--touch", "40M", "--hold", "200ms", "--free-after", "120s"],
    );
    // Freed: the restore at shutdown fits and starts (then hangs at the fault point).
    assert!(wait_until(Duration::from_secs(10), || cg.usage() < 8 * MIB));
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || agent.log().contains("pausing")),
        "the shutdown restore never reached the fault point; log:\n{}",
        agent.log()
    );
    assert!(agent.running(), "still in its hung shutdown");
    let t = Instant::now();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(5), || !agent.running()),
        "a second SIGTERM did not end the shutdown; log:\n{}",
        agent.log()
    );
    eprintln!("exited {:?} after the second SIGTERM", t.elapsed());
    assert!(
        agent.log().contains("second stop signal"),
        "log:\n{}",
        agent.log()
    );
    // The loan is still journaled for the next start.
    assert!(agent.journal().contains(&cg.rel), "{}", agent.journal());
}
