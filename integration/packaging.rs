//! What the package and its unit promise: the shipped man pages and completions are the
//! ones the binary generates; the capabilities the unit grants are enough (and each is
//! needed) against real stalls; the agent speaks systemd's notify protocol (READY=1, the
//! watchdog); a SIGHUP from logrotate reopens the audit log even when the policies on
//! disk are invalid.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn files_below(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["man", "completions"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for n in names {
            let body = std::fs::read(dir.join(sub).join(&n)).unwrap();
            out.push((format!("{sub}/{n}"), body));
        }
    }
    out
}

#[test]
fn generated_man_pages_and_completions_match_the_cli() {
    let t = tempfile::tempdir().unwrap();
    let st = Command::new(oomwake_bin())
        .arg("__generate")
        .arg(t.path())
        .status()
        .unwrap();
    assert!(st.success());
    let fresh = files_below(t.path());
    let committed = files_below(&repo("packaging/generated"));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fresh), names(&committed));
    for ((name, a), (_, b)) in fresh.iter().zip(&committed) {
        assert!(
            a == b,
            "packaging/generated/{name} is stale: run `cargo run -- __generate packaging/generated`"
        );
    }
}

/// The unit's `CapabilityBoundingSet=`, as setpriv's `--bounding-set` argument.
fn unit_bounding_set() -> String {
    let unit = read(&repo("packaging/oomwake.service"));
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= in the unit");
    let mut arg = "-all".to_string();
    for cap in line.split_whitespace() {
        arg.push_str(",+");
        arg.push_str(&cap.trim_start_matches("CAP_").to_lowercase());
    }
    arg
}

const NOBODY: u32 = 65534;

/// An agent process, stopped (SIGTERM, then SIGKILL) when dropped, even on a panic.
struct Limited(std::process::Child);

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent limited to `bounding` capabilities (uid 0, as in the unit).
fn start_limited(bounding: &str, policies: &[(&str, String)]) -> (Limited, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    for (name, text) in policies {
        std::fs::write(tmp.path().join("policies").join(name), text).unwrap();
    }
    let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
    let child = Command::new("setpriv")
        .args(["--bounding-set", bounding, "--inh-caps", "-all", "--"])
        .arg(oomwake_bin())
        .arg("run")
        .arg("--config")
        .arg(tmp.path().join("none.toml"))
        .arg("--policies")
        .arg(tmp.path().join("policies"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--audit-log")
        .arg(tmp.path().join("audit.jsonl"))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("setpriv (util-linux)");
    (Limited(child), tmp)
}

fn audit_lines(tmp: &Path) -> Vec<serde_json::Value> {
    read(&tmp.join("audit.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A hog owned by another user (so signalling it takes CAP_KILL), driven into `cg`'s
/// limit.
fn nobody_hog(s: &mut Scratch, cg: &Cg, hog: &Path) -> i32 {
    for f in ["cgroup.procs", "tasks"] {
        std::os::unix::fs::chown(cg.dir.join(f), Some(NOBODY), None).unwrap();
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(hog)
        .arg("--join")
        .arg(&cg.dir)
        .args(["--touch", "48M", "--hold", "60s"]);
    // Not waited for stuck: the agent, already watching, may resolve it at once.
    let (pid, _report) = s.spawn(cmd);
    pid
}

/// The hog binary where user nobody can execute it (the build tree may be below a
/// directory only root can enter).
fn hog_for_nobody() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = t.path().join("oomwake-hog");
    std::fs::copy(hog_bin(), &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    (t, p)
}

/// Runs a raise and a kill stall against an agent limited to `bounding`; returns the
/// kill action's audit line and whether mlockall worked.
fn stalls_with(test: &str, bounding: &str) -> (serde_json::Value, String) {
    let (_bin_dir, hog) = hog_for_nobody();
    let mut s = Scratch::new(test);
    let raise = s.cgroup("raise", Some(32 * MIB), true);
    let kill = s.cgroup("kill", Some(32 * MIB), true);
    let raise_steps =
        "[[step]]\naction = \"raise_limit\"\nby = \"100%\"\nmax_extra = \"100%\"\nhold = \"60s\"\n";
    let (agent, tmp) = start_limited(
        bounding,
        &[
            ("raise.toml", policy("raise", &raise.rel, "", raise_steps)),
            (
                "kill.toml",
                policy("kill", &kill.rel, "", "[[step]]\naction = \"kill\"\n"),
            ),
        ],
    );
    let watching = wait_until(Duration::from_secs(15), || {
        audit_lines(tmp.path())
            .iter()
            .filter(|v| v["event"] == "watch")
            .count()
            >= 2
    });
    if !watching {
        panic!(
            "agent never watched both cgroups; log:\n{}",
            read(&tmp.path().join("agent.log"))
        );
    }
    let r = nobody_hog(&mut s, &raise, &hog);
    let k = nobody_hog(&mut s, &kill, &hog);
    let action = |cg: &str| {
        let mut found = None;
        wait_until(Duration::from_secs(20), || {
            found = audit_lines(tmp.path())
                .into_iter()
                .find(|v| v["event"] == "action" && v["cgroup"] == cg);
            found.is_some()
        });
        found
    };
    let raised = action(&raise.rel);
    let killed = action(&kill.rel);
    drop(agent);
    let log = read(&tmp.path().join("agent.log"));
    let raised = raised.unwrap_or_else(|| panic!("no raise action; log:\n{log}"));
    assert_eq!(raised["outcome"], "done", "{raised}");
    assert!(s.alive(r), "raise_limit must not kill");
    let killed = killed.unwrap_or_else(|| panic!("no kill action; log:\n{log}"));
    if killed["outcome"] == "done" {
        assert!(
            wait_until(Duration::from_secs(10), || !s.alive(k)),
            "kill reported done but the hog lives"
        );
    }
    (killed, log)
}

#[test]
fn the_units_capabilities_are_enough_against_real_stalls() {
    let Some(()) = require_v1("the_units_capabilities_are_enough_against_real_stalls") else {
        return;
    };
    let caps = unit_bounding_set();
    let (killed, log) = stalls_with("caps", &caps);
    assert_eq!(killed["outcome"], "done", "{killed}\nlog:\n{log}");
    assert!(killed["pid"].as_i64().is_some(), "{killed}");
    assert!(!log.contains("mlockall failed"), "{log}");
}

#[test]
fn without_cap_kill_a_kill_fails_and_without_cap_ipc_lock_mlockall_fails() {
    let Some(()) = require_v1("without_cap_kill_a_kill_fails") else {
        return;
    };
    let caps = unit_bounding_set();
    assert!(
        caps.contains(",+kill") && caps.contains(",+ipc_lock"),
        "{caps}"
    );
    let (killed, log) = stalls_with("nocaps", "-all");
    assert_eq!(killed["outcome"], "failed", "{killed}");
    let err = killed["error"].as_str().unwrap_or("");
    assert!(err.contains("Operation not permitted"), "{killed}");
    assert!(log.contains("mlockall failed"), "{log}");
}

#[test]
fn the_agent_sends_ready_and_pings_the_watchdog() {
    let Some(()) = require_v1("the_agent_sends_ready_and_pings_the_watchdog") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    // A policy that matches nothing: the agent idles, only the watchdog keeps it busy.
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy(
            "none",
            "/oomwake-no-such-cgroup",
            "",
            "[[step]]\naction = \"reclaim\"\n",
        ),
    )
    .unwrap();
    let sock_path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
    let agent = Command::new(oomwake_bin())
        .arg("run")
        .arg("--config")
        .arg(tmp.path().join("none.toml"))
        .arg("--policies")
        .arg(tmp.path().join("policies"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--audit-log")
        .arg(tmp.path().join("audit.jsonl"))
        .env("NOTIFY_SOCKET", &sock_path)
        // 3 s: a ping due every 1.5 s, while the 1 s sweep wakes the loop more often.
        .env("WATCHDOG_USEC", "3000000")
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let agent = Limited(agent);
    let mut got = Vec::new();
    let mut buf = [0u8; 128];
    let start = Instant::now();
    while got.iter().filter(|(m, _)| m == "WATCHDOG=1").count() < 3 {
        match sock.recv(&mut buf) {
            Ok(n) => got.push((
                String::from_utf8_lossy(&buf[..n]).into_owned(),
                start.elapsed(),
            )),
            Err(_) => break,
        }
    }
    drop(agent);
    let msgs: Vec<&str> = got.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        msgs,
        ["READY=1", "WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"],
        "log:\n{}",
        read(&tmp.path().join("agent.log"))
    );
    // Paced at half the interval (1.5 s), not on every turn of the loop: three pings
    // take at least 3 s (the first comes with READY=1).
    let last = got.last().map(|(_, t)| *t).unwrap_or_default();
    let first = got[1].1;
    assert!(last - first >= Duration::from_millis(2900), "{got:?}");
}

#[test]
fn sighup_reopens_the_audit_log_even_when_the_reload_is_refused() {
    let Some(()) = require_v1("sighup_reopens_the_audit_log_even_when_the_reload_is_refused")
    else {
        return;
    };
    let s = Scratch::new("hup");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(
        &[(
            "p.toml",
            &policy(
                "p",
                &cg.rel,
                "mode = \"audit\"",
                "[[step]]\naction = \"kill\"\n",
            ),
        )],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    // logrotate moves the file away, and the policies on disk are broken just then.
    let audit = agent.tmp.path().join("audit.jsonl");
    std::fs::rename(&audit, agent.tmp.path().join("audit.jsonl.1")).unwrap();
    std::fs::write(agent.tmp.path().join("policies/broken.toml"), "name = \n").unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .log()
            .contains("reload refused")),
        "{}",
        agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || audit.exists()),
        "the audit log was not reopened after SIGHUP; log:\n{}",
        agent.log()
    );
}
