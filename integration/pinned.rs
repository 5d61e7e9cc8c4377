//! Stalls the kernel never reports (root, cgroup v1, `gcc` for the pinned workload,
//! `javac`/`java` for the JVM; CI installs both): a workload pinned at its limit with
//! `memory.failcnt` rising and `under_oom 0` is resolved by the policy's steps as an
//! OOM is, and a JVM whose -Xmx is above its cgroup's limit never pauses for seconds
//! at the wall.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::common::*;

fn required(name: &str, what: &str) {
    if std::env::var("OOMWAKE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{name}: {what}");
    }
    eprintln!("{name}: skipped: {what}");
}

/// Compiles integration/pinned/pinned.c, once per test binary run (tests run in
/// parallel: a second compile over a binary another test runs would fail with ETXTBSY).
fn pinned_program() -> Option<PathBuf> {
    static BUILT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pinned");
            std::fs::create_dir_all(&dir).ok()?;
            let out = dir.join(format!("pinned-{}", std::process::id()));
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/pinned/pinned.c");
            let st = Command::new("gcc")
                .args(["-O2", "-Wall", "-o"])
                .arg(&out)
                .arg(&src)
                .status()
                .ok()?;
            st.success().then_some(out)
        })
        .clone()
}

fn failcnt(cg: &Cg) -> u64 {
    read(&cg.dir.join("memory.failcnt"))
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits for a line starting with `prefix` (other lines are skipped).
fn line(rx: &Receiver<String>, prefix: &str, timeout: Duration) -> Option<String> {
    let end = Instant::now() + timeout;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return Some(l),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Starts the pinned workload in `cg` and checks that it is stuck the silent way:
/// failcnt rising, usage at the limit, no OOM, no progress, for two seconds.
fn pinned_and_silent(s: &mut Scratch, cg: &Cg, prog: &Path, retry_ms: u32) -> Receiver<String> {
    let mut cmd = Command::new(prog);
    cmd.arg(&cg.dir).arg(retry_ms.to_string());
    let (_, lines) = s.spawn(cmd);
    assert!(
        line(&lines, "filled", Duration::from_secs(20)).is_some(),
        "the pinned workload never filled its cgroup"
    );
    let before = failcnt(cg);
    let end = Instant::now() + Duration::from_millis(2000 + 2 * u64::from(retry_ms));
    while Instant::now() < end {
        assert!(!cg.under_oom(), "a real OOM: not the stall under test");
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(100)) {
            panic!("the pinned workload progressed without help: {l}");
        }
    }
    assert!(failcnt(cg) > before, "failcnt did not rise");
    assert!(
        cg.usage() + MIB >= cg.limit(),
        "usage {} not at the limit {}",
        cg.usage(),
        cg.limit()
    );
    lines
}

#[test]
fn pinned_stall_without_an_oom_is_resolved_by_the_policy() {
    let name = "pinned_stall_without_an_oom_is_resolved_by_the_policy";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned");
    let cg = s.cgroup("", Some(16 * MIB), true);
    let lines = pinned_and_silent(&mut s, &cg, &prog, 20);

    let agent = Agent::start(&[("p.toml", &policy("pinned", &cg.rel, "", RAISE))], &[]);
    let progress = line(&lines, "progress", Duration::from_secs(20));
    assert!(progress.is_some(), "never unpinned\nlog:\n{}", agent.log());
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(5));
    assert_eq!(oom["trigger"], "pinned", "{oom}");
    assert_eq!(oom["under_oom"], 0);
    assert!(oom["failcnt_delta"].as_u64().unwrap_or(0) > 0, "{oom}");
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(r["by_action"], "raise_limit");
    assert_eq!(r["episode"], oom["episode"]);
    assert!(cg.limit() > 16 * MIB);
}

#[test]
fn pinned_stall_in_audit_mode_is_logged_once_and_left_alone() {
    let name = "pinned_stall_in_audit_mode_is_logged_once_and_left_alone";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned-audit");
    let cg = s.cgroup("", Some(16 * MIB), true);
    // Retries every 1.5 s: some sweeps (every second) see failcnt still. The stall
    // goes on all the same, so it stays one audited episode.
    let lines = pinned_and_silent(&mut s, &cg, &prog, 1500);
    let agent = Agent::start(
        &[(
            "p.toml",
            &policy("pinned", &cg.rel, "mode = \"audit\"", RAISE),
        )],
        &[],
    );
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(10));
    assert_eq!(oom["trigger"], "pinned");
    let would = agent.expect("action", &cg.rel, Duration::from_secs(5));
    assert_eq!(would["outcome"], "would");
    // Several sweeps later: still pinned, still one episode, nothing changed.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(agent.events("oom", &cg.rel).len(), 1, "{:?}", agent.audit());
    assert!(agent.events("resolved", &cg.rel).is_empty());
    assert_eq!(cg.limit(), 16 * MIB);
    assert!(lines.try_recv().is_err(), "audit mode must not unpin it");
}

/// Compiles integration/jvm/Pause.java into a temporary directory.
fn java_classes(tmp: &Path) -> Option<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/jvm/Pause.java");
    let st = Command::new("javac")
        .arg("-d")
        .arg(tmp)
        .arg(&src)
        .status()
        .ok()?;
    st.success().then_some(())
}

#[test]
fn jvm_above_its_limit_never_pauses_for_seconds_without_an_oom() {
    let name = "jvm_above_its_limit_never_pauses_for_seconds_without_an_oom";
    let Some(()) = require_v1(name) else { return };
    let classes = tempfile::tempdir().unwrap();
    if java_classes(classes.path()).is_none() {
        return required(
            name,
            "cannot compile Pause.java (apt-get install default-jdk-headless)",
        );
    }
    let mut s = Scratch::new("jvm");
    let cg = s.cgroup("", Some(128 * MIB), true);
    // A plain loan: +50% at each OOM, up to +100% (256 MiB).
    let steps = LOAN;
    let agent = Agent::start(&[("jvm.toml", &policy("jvm", &cg.rel, "", steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > '{}/cgroup.procs' && exec java -Xmx256m -XX:+UseSerialGC -cp '{}' Pause 64 20",
        cg.dir.display(),
        classes.path().display()
    ));
    let (_, lines) = s.spawn(cmd);
    let done = line(&lines, "done", Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the JVM did not finish\nlog:\n{}", agent.log()));
    let max_gap_ms: u64 = done
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("{name}: the JVM's longest pause: {max_gap_ms} ms");
    // Two sweep intervals (1 s each), plus what a loaded 2-core machine adds to a JVM
    // warming up.
    assert!(
        max_gap_ms < 2500,
        "the JVM paused {max_gap_ms} ms\naudit:\n{:?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
}
