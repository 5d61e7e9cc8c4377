//! The audit log's reopen on SIGHUP (logrotate) with something hostile planted at the
//! path in between (issue 16.5; root, cgroup v1): a FIFO must not hang the event loop
//! (stalls are rescued, SIGTERM is answered), and a file owned by another user is not
//! written; in both cases the lines go on into the file opened before.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::common::*;

/// Audit lines of a regular file (never the planted FIFO: reading it would block).
fn lines(p: &Path) -> Vec<Value> {
    read(p)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_line(p: &Path, event: &str, cgroup: &str, agent: &Agent) -> Value {
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        found = lines(p)
            .into_iter()
            .find(|v| v["event"] == event && v["cgroup"] == cgroup);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {event} for {cgroup} in {}\nlog:\n{}",
            p.display(),
            agent.log()
        )
    })
}

/// Sends SIGHUP and waits for the n-th reload outcome in the log; false if none came
/// (the event loop is stuck).
fn reload(agent: &Agent, n: usize) -> bool {
    agent.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(10), || {
        let log = agent.log();
        log.matches("reloaded: ").count() + log.matches("reload refused").count() >= n
    })
}

#[test]
fn a_fifo_or_a_foreign_file_at_the_audit_path_is_refused_on_sighup() {
    let Some(()) = require_v1("a_fifo_or_a_foreign_file_at_the_audit_path_is_refused_on_sighup")
    else {
        return;
    };
    let mut s = Scratch::new("auditfifo");
    let cg1 = s.cgroup("a", Some(32 * MIB), true);
    let cg2 = s.cgroup("b", Some(32 * MIB), true);
    let pattern = format!("{}/*", s.rel);
    let mut agent = Agent::start(&[("p.toml", &policy("lend", &pattern, "", RAISE))], &[]);
    agent.expect("watch", &cg1.rel, Duration::from_secs(10));
    agent.expect("watch", &cg2.rel, Duration::from_secs(10));
    let path = agent.tmp.path().join("audit.jsonl");
    let old = agent.tmp.path().join("audit.jsonl.1");

    // logrotate moved the log; a FIFO (nobody reading) was planted in its place.
    std::fs::rename(&path, &old).unwrap();
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    if !reload(&agent, 1) {
        // Unblock the agent's open (so that it can be stopped) before failing.
        let _ = std::fs::File::open(&path);
        panic!("the event loop hung on the SIGHUP:\n{}", agent.log());
    }
    // The event loop is alive: a stall is rescued, its lines in the old file.
    let hog = s.hog(&cg1, &["--touch", "40M", "--hold", "60s"]);
    assert!(
        hog.report(Duration::from_secs(15)).is_some(),
        "the stall was not rescued:\n{}",
        agent.log()
    );
    wait_line(&old, "resolved", &cg1.rel, &agent);
    let said = |what: &str| wait_until(Duration::from_secs(5), || agent.log().contains(what));
    assert!(said("reopening the audit log"), "{}", agent.log());

    // A regular file owned by nobody in its place: refused, nothing appended to it.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    assert!(reload(&agent, 2), "no reload outcome:\n{}", agent.log());
    let hog2 = s.hog(&cg2, &["--touch", "40M", "--hold", "60s"]);
    assert!(
        hog2.report(Duration::from_secs(15)).is_some(),
        "{}",
        agent.log()
    );
    wait_line(&old, "resolved", &cg2.rel, &agent);
    assert_eq!(
        read(&path),
        "",
        "root's audit lines went into nobody's file"
    );
    assert!(said("owned by uid 65534"), "{}", agent.log());

    // SIGTERM is answered at once.
    let t = Instant::now();
    let st = agent.stop();
    assert!(
        st.is_some_and(|st| st.success()) && t.elapsed() < Duration::from_secs(5),
        "stop: {st:?} after {:?}\n{}",
        t.elapsed(),
        agent.log()
    );
}
