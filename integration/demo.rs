//! `oomwake demo` on the real hierarchy (root, cgroup v1): it shows a rescue and leaves
//! nothing behind, with the default root, with `--cgroup-root` at a subtree, and when
//! interrupted mid-show.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Runs the demo to its end; returns (exit code, stdout, stderr).
fn demo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(oomwake_bin())
        .arg("demo")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run oomwake demo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The scratch cgroup a demo of `pid` makes below `parent`, and its temporary directory.
fn leftovers(parent: &std::path::Path, pid: u32) -> Vec<String> {
    let name = format!("oomwake-demo-{pid}");
    [parent.join(&name), std::env::temp_dir().join(&name)]
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect()
}

/// Every process left in `dir` (a demo's scratch cgroup, made by our own child: its
/// processes are ours) is killed, so that the scratch tree can go even when the test
/// fails.
fn kill_left_in(dir: &std::path::Path) {
    for pid in read(&dir.join("cgroup.procs"))
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    oomwake::cgroup::remove_tree(dir, Duration::from_secs(5));
}

/// Issue 16.18: the demo's loan now covers the hog with room to spare (it lent exactly
/// the 48 MiB the hog touches, and the kill step ended 2 shows of 17), and it cleans up.
#[test]
fn demo_rescues_the_hog_and_leaves_nothing_behind() {
    let Some(()) = require_v1("demo_rescues_the_hog_and_leaves_nothing_behind") else {
        return;
    };
    let s = Scratch::new("demo");
    for _ in 0..2 {
        let (code, out, err) = demo(&["--cgroup-root", s.dir.to_str().unwrap()]);
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("5. The hog finished"), "{out}");
        assert!(out.contains("7. Cleaned up"), "{out}");
        assert!(
            !out.contains("\"action\":\"kill\""),
            "the kill step ran:\n{out}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("oomwake-demo-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Issue 16.18: `--cgroup-root` at a subtree that does not hold the caller: the demo
/// made its path by joining the caller's cgroup below that root, and failed.
#[test]
fn demo_with_a_subtree_as_its_root_runs_there() {
    let Some(()) = require_v1("demo_with_a_subtree_as_its_root_runs_there") else {
        return;
    };
    let s = Scratch::new("demosub");
    let root = s.cgroup("sub", None, false);
    let (code, out, err) = demo(&["--cgroup-root", root.dir.to_str().unwrap()]);
    let made = format!("1. Created {}/oomwake-demo-", root.dir.display());
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&made),
        "not made at the top of the root:\n{out}"
    );
    assert!(out.contains("7. Cleaned up"), "{out}");
}

/// Issue 16.18: Ctrl-C (SIGINT to the demo alone, mid-stall) ends the show and removes
/// the scratch cgroup, its stuck hog and the temporary files; before, the default
/// action of SIGINT ended the demo at once and left all three.
#[test]
fn an_interrupted_demo_cleans_up() {
    let Some(()) = require_v1("an_interrupted_demo_cleans_up") else {
        return;
    };
    let s = Scratch::new("demoint");
    let mut child = Command::new(oomwake_bin())
        .arg("demo")
        .arg("--cgroup-root")
        .arg(&s.dir)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let pid = child.id();
    let dir = s.dir.join(format!("oomwake-demo-{pid}"));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    // "2. Started a hog": the cgroup is made and the hog is on its way to the wall.
    for l in lines.by_ref().map_while(Result::ok) {
        seen.push_str(&l);
        seen.push('\n');
        if l.starts_with("2. ") {
            break;
        }
    }
    let stuck = wait_until(Duration::from_secs(20), || {
        read(&dir.join("memory.oom_control")).contains("under_oom 1")
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let start = Instant::now();
    let mut status = None;
    while start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(st)) = child.try_wait() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reaped here in every case (try_wait's status is kept by Child).
    if status.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let left = leftovers(&s.dir, pid);
    let hogs = read(&dir.join("cgroup.procs"));
    kill_left_in(&dir);
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("oomwake-demo-{pid}")));
    assert!(stuck, "the demo's hog never reached its wall:\n{seen}");
    assert!(
        status.is_some(),
        "the demo did not end within 15 s of SIGINT"
    );
    assert!(left.is_empty(), "left behind: {left:?} (tasks: {hogs:?})");
}
