//! The incident itself: a Go program (Debian's golang-go) hangs at its memory limit with
//! the OOM killer disabled, and oomwake lends it headroom so it finishes (root, cgroup v1,
//! `go` on PATH; CI installs golang-go).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

fn go_program() -> Option<std::path::PathBuf> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("goservice");
    std::fs::create_dir_all(&tmp).ok()?;
    let out = tmp.join("goservice");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/goservice/main.go");
    let st = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .env("GOCACHE", tmp.join("cache"))
        .env("GOPATH", tmp.join("gopath"))
        .env("HOME", &tmp)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .status()
        .ok()?;
    st.success().then_some(out)
}

#[test]
fn go_service_stuck_at_its_limit_is_rescued_by_a_loan() {
    let name = "go_service_stuck_at_its_limit_is_rescued_by_a_loan";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = go_program() else {
        if std::env::var("OOMWAKE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("{name}: cannot build the Go program (is golang-go installed?)");
        }
        eprintln!("{name}: skipped: no Go toolchain (apt-get install golang-go)");
        return;
    };
    let mut s = Scratch::new("go");
    let cg = s.cgroup("", Some(48 * MIB), true);
    let mut cmd = Command::new(&prog);
    cmd.arg(&cg.dir).arg("64").env("GOGC", "50");
    let (pid, lines) = s.spawn(cmd);
    // Without an agent it hangs: a thread sleeps in the memcg OOM wait and the program
    // does not get to its end.
    assert!(
        // Bounded generously: at a load of 10-15 on two cores the Go runtime took more
        // than 20 s to reach its limit once.
        wait_until(Duration::from_secs(45), || cg.under_oom()
            && any_thread_in_oom_wait(pid)),
        "the Go program never got stuck"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(l) => assert!(!l.starts_with("done"), "finished without help: {l}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("the Go program went away: {e}"),
        }
    }
    assert!(cg.under_oom());

    let steps = r#"
[[step]]
action = "raise_limit"
by = "25%"
max_extra = "100%"
hold = "60s"

[[step]]
action = "kill"
"#;
    let agent = Agent::start(
        &[("go.toml", &policy("go-service", &cg.rel, "", steps))],
        &[],
    );
    let done = Instant::now() + Duration::from_secs(30);
    let mut finished = None;
    while let Some(left) = done.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(l) if l.starts_with("done") => {
                finished = Some(l);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(
        finished.as_deref(),
        Some("done 64"),
        "log:\n{}",
        agent.log()
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(r["by_action"], "raise_limit");
    assert!(s.alive(pid), "lending headroom must not kill the service");
    assert!(
        cg.limit() > 48 * MIB && cg.limit() <= 96 * MIB,
        "limit {}",
        cg.limit()
    );
}
