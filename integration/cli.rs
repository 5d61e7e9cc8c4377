//! `oomwake check` and `explain` as users run them: exit codes and messages.

use std::process::Command;

use crate::common::oomwake_bin;

fn check(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(oomwake_bin())
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_policies() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let (code, out, err) = check(&["--policies", dir]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for name in ["default", "go-service", "cache", "batch-worker"] {
        assert!(
            out.contains(&format!("ok: {name} ")),
            "{name} missing in:\n{out}"
        );
    }
    assert!(out.contains("    early at 80%: raise_limit\n"), "{out}");
}

#[test]
fn check_reports_file_line_col_and_exits_1() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.toml");
    let bad = t.path().join("bad.toml");
    std::fs::write(
        &good,
        "[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"reclaim\"\n",
    )
    .unwrap();
    std::fs::write(
        &bad,
        "[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"kill\"\nprefer = [\"(oops\"]\n",
    )
    .unwrap();
    let (code, out, _) = check(&[good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("ok: good"), "{out}");
    let (code, _, err) = check(&[good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let expect = format!("{}:5:10: invalid regex", bad.display());
    assert!(err.contains(&expect), "expected {expect:?} in:\n{err}");
}

#[test]
fn check_usage_error_exits_2() {
    let (code, _, err) = check(&["--policies", "/tmp", "/tmp/x.toml"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = check(&["--bogus"]);
    assert_eq!(code, 2);
}

#[test]
fn run_refuses_invalid_policies() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("x.toml"),
        "[match]\ncgroup = [\"/a\"]\n[[step]]\naction = \"nope\"\n",
    )
    .unwrap();
    let out = Command::new(oomwake_bin())
        .arg("run")
        .arg("--config")
        .arg(t.path().join("none.toml"))
        .arg("--policies")
        .arg(t.path())
        .arg("--state-dir")
        .arg(t.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.toml:4:10: "), "{err}");
    assert!(err.contains("not starting"), "{err}");
}

#[test]
fn explain_names_the_policy_and_its_steps() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("api.toml"),
        "priority = 5\n[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"20%\"\n",
    )
    .unwrap();
    let out = Command::new(oomwake_bin())
        .args(["explain", "--policies"])
        .arg(t.path())
        .arg("--cgroup-root")
        .arg(t.path())
        .arg("/docker/abc")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policy: api"), "{text}");
    assert!(text.contains("step 0: raise_limit"), "{text}");
}

/// Issue 16.17: a container name with an ESC sequence cleared the operator's terminal
/// through `oomwake status`. Every control character of a name is shown escaped.
#[test]
fn status_escapes_control_characters_in_names() {
    let t = tempfile::tempdir().unwrap();
    let id = "a".repeat(64);
    let status = serde_json::json!({
        "pid": 1, "running": false, "updated": "2026-12-07T00:00:00Z",
        "cgroup_root": "/sys/fs/cgroup/memory", "policies": ["p\u{1b}[2J"], "dry_run": false,
        "watched": [{
            "cgroup": format!("/docker/{id}"), "policy": "all",
            "container_id": id, "container_name": "api\u{1b}c\u{1b}[2J\u{9b}1;1H",
            "image": "img\nforged line"
        }, {"cgroup": "/x\u{1b}]0;pwned\u{7}", "policy": "all"}],
        "episodes_running": [], "stuck": [], "loans": [],
    });
    std::fs::write(t.path().join("status.json"), status.to_string()).unwrap();
    let out = Command::new(oomwake_bin())
        .args(["status", "--state-dir"])
        .arg(t.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(3), "not running: {text}");
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character reached the terminal: {text:?}"
    );
    assert!(
        text.contains("container api\\x1bc\\x1b[2J\\u{9b}1;1H"),
        "{text}"
    );
    assert!(text.contains("img\\x0aforged line"), "{text}");
    assert!(text.contains("/x\\x1b]0;pwned\\x07"), "{text}");
}

/// Issue 16.17: `explain` printed the cgroup (and container) names raw.
#[test]
fn explain_escapes_control_characters_in_names() {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new(oomwake_bin())
        .args(["explain", "--policies"])
        .arg(t.path())
        .arg("--cgroup-root")
        .arg(t.path())
        .arg("/docker/a\u{1b}[2J\u{1b}cb")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character reached the terminal: {text:?}"
    );
    assert!(text.contains("cgroup: /docker/a\\x1b[2J\\x1bcb"), "{text}");
}

/// Issue 16.17: a path over PATH_MAX was taken for found (ENAMETOOLONG is not "no such
/// cgroup"): any error reading the cgroup fails the command with a message.
#[test]
fn explain_fails_on_a_path_it_cannot_read() {
    let t = tempfile::tempdir().unwrap();
    let long = format!("/{}", "d/".repeat(2500));
    let out = Command::new(oomwake_bin())
        .args(["explain", "--policies"])
        .arg(t.path())
        .arg(long.trim_end_matches('/'))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if text.contains("showing the policy match only") {
        eprintln!("skipped: no cgroup hierarchy to read here: {text}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    assert!(err.contains("cannot read it"), "{err}");
    assert!(
        err.contains("too long") || err.contains("ENAMETOOLONG"),
        "{err}"
    );
}

/// A fake engine on `sock` that answers every connection with a response head trickled
/// a byte every 1.5 s (never a newline), for as long as the test runs.
fn trickling_engine(sock: &std::path::Path) {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Slow: ");
                while s.write_all(b"a").is_ok() {
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                }
            });
        }
    });
}

/// Runs `cmd`, killed (by its pid) after `limit`; None if it had to be killed.
fn output_within(mut cmd: Command, limit: std::time::Duration) -> Option<std::process::Output> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `explain NAME` asks the engine about the container: an engine that trickles its
/// answer a byte every 1.5 s held it for ever; the 2 s deadline holds for every byte.
#[test]
fn explain_a_name_gives_up_on_a_trickling_engine() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("docker.sock");
    trickling_engine(&sock);
    std::fs::write(
        t.path().join("api.toml"),
        "[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"reclaim\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(oomwake_bin());
    cmd.args(["explain", "--policies"])
        .arg(t.path())
        .arg("--cgroup-root")
        .arg(t.path())
        .arg("--docker-socket")
        .arg(&sock)
        .arg("api-1");
    let started = std::time::Instant::now();
    let out = output_within(cmd, std::time::Duration::from_secs(10))
        .expect("explain returned within 10 s");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out after 2s"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(6));
}
