//! The default audit sink is stderr: a stderr pipe nobody reads must not hold up a
//! rescue, and the stream is JSON Lines, log records included (root, cgroup v1).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Kills the agent if the test fails before it stops it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn unread_stderr_does_not_stop_a_rescue_and_stays_json_lines() {
    let Some(()) = require_v1("unread_stderr_does_not_stop_a_rescue_and_stays_json_lines") else {
        return;
    };
    let mut s = Scratch::new("stderr");
    // Enough watched cgroups that their `watch` lines overflow a one-page pipe.
    for i in 0..60 {
        s.cgroup(&format!("c{i:02}"), None, true);
    }
    let stuck = s.cgroup("stuck", Some(32 * MIB), true);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    let raise =
        "[[step]]\naction = \"raise_limit\"\nby = \"50%\"\nmax_extra = \"100%\"\nhold = \"60s\"\n";
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("p", &format!("{}/*", s.rel), "", raise),
    )
    .unwrap();
    let mut child = Command::new(oomwake_bin())
        .arg("run")
        .arg("--config")
        .arg(tmp.path().join("oomwake.toml"))
        .arg("--cgroup-root")
        .arg(MEMROOT)
        .arg("--policies")
        .arg(tmp.path().join("policies"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oomwake");
    let err = child.stderr.take().unwrap();
    // One page: the agent's first few lines fill it.
    use std::os::fd::AsRawFd;
    nix::fcntl::fcntl(err.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let mut agent = Guard(child);

    // Nobody reads stderr: the 61 watch lines alone (~200 bytes each) are three pages.
    // The agent writes status.json once it has walked the hierarchy and watched all.
    let status = tmp.path().join("state/status.json");
    let stuck_watched = wait_until(Duration::from_secs(20), || {
        read(&status).contains(&format!("\"{}\"", stuck.rel))
    });
    assert!(
        stuck_watched,
        "the agent never got to watch the stuck cgroup with its stderr full"
    );
    let hog = s.hog(&stuck, &["--touch", "40M", "--hold", "30s"]);
    let report = hog.report(Duration::from_secs(20));
    assert!(
        report.is_some(),
        "the stall was not resolved while stderr was full (limit {}, under_oom {})",
        stuck.limit(),
        stuck.under_oom()
    );
    assert!(stuck.limit() > 32 * MIB);

    // Now read the stream: every line is a JSON object, log records included, and the
    // rescue is in it.
    let reader = std::thread::spawn(move || {
        BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let end = Instant::now() + Duration::from_secs(20);
    let mut status = None;
    while Instant::now() < end {
        if let Ok(Some(st)) = agent.0.try_wait() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = status.expect("the agent did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
    let lines = reader.join().unwrap();
    let mut events = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        assert!(v["ts"].is_string() && v["cgroup"].is_string(), "{l}");
        events.push(v);
    }
    let has = |event: &str, cg: &str| {
        events
            .iter()
            .any(|v| v["event"] == event && v["cgroup"] == cg)
    };
    assert!(
        has("resolved", &stuck.rel),
        "no resolved line in:\n{}",
        lines.join("\n")
    );
    // Shutdown drained the queue: the last log lines are there too.
    assert!(
        events
            .iter()
            .any(|v| v["event"] == "log" && v["level"] == "INFO" && v["message"] == "stopping"),
        "shutdown did not drain the stream"
    );
}
