//! Helpers for root-only tests on the real cgroup v1 hierarchy: scratch cgroups below
//! our own memory cgroup (removed on drop, with the processes we started in them), the
//! hog, and an agent process with its own policies, state and audit log.
//!
//! A test whose prerequisites are missing prints "skipped: <why>" and returns, unless
//! OOMWAKE_REQUIRE_ROOT_TESTS=1 (set by CI), where a missing prerequisite fails it.

#![allow(dead_code)]

pub mod docker;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MIB: u64 = 1 << 20;
pub const MEMROOT: &str = "/sys/fs/cgroup/memory";

pub fn oomwake_bin() -> &'static str {
    env!("CARGO_BIN_EXE_oomwake")
}

pub fn hog_bin() -> &'static str {
    env!("CARGO_BIN_EXE_oomwake-hog")
}

/// Our own memory cgroup, relative to the mount ("/process_api/..." here).
pub fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    oomwake::cgroup::parse::proc_memory_cgroup(&text)
}

/// Checks root + a writable v1 memory hierarchy. `None` means: skip (already reported).
pub fn require_v1(test: &str) -> Option<()> {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root".to_string())
    } else if !Path::new(MEMROOT).join("memory.oom_control").exists() {
        Some(format!("{MEMROOT} is not a cgroup v1 memory hierarchy"))
    } else if own_cgroup().is_none() {
        Some("no memory line in /proc/self/cgroup".to_string())
    } else {
        None
    };
    match why {
        None => Some(()),
        Some(w) if std::env::var("OOMWAKE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") => {
            panic!("{test}: prerequisite missing and OOMWAKE_REQUIRE_ROOT_TESTS=1: {w}")
        }
        Some(w) => {
            eprintln!("{test}: skipped: {w}");
            None
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One step: SIGKILL the largest task (by RSS) of the stalled cgroup.
pub const KILL: &str = r#"
[[step]]
action = "kill"
victim = "largest_rss"
"#;

/// One step: lend 50% (up to 100% extra) for 60s, restored early once usage stays
/// below 90% for 300ms.
/// A plain loan: +50% of the limit at each OOM, up to +100%, held 60 s (given back at
/// hold expiry once the workload fits).
pub const LOAN: &str = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
"#;

pub const RAISE: &str = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
restore_below = "90%"
restore_after = "300ms"
"#;

/// A scratch cgroup tree; everything in it is ours.
pub struct Scratch {
    /// Path relative to the mount, with a leading '/'.
    pub rel: String,
    pub dir: PathBuf,
    children: Vec<Child>,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let own = own_cgroup().expect("own memory cgroup");
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let leaf = format!("oomwake-it-{}-{n}-{name}", std::process::id());
        let rel = format!("{}/{leaf}", own.trim_end_matches('/'));
        let dir = Path::new(MEMROOT).join(rel.trim_start_matches('/'));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Scratch {
            rel,
            dir,
            children: Vec::new(),
        }
    }

    /// Creates (or configures) the cgroup `sub` ("" = the scratch root itself).
    pub fn cgroup(&self, sub: &str, limit: Option<u64>, kill_disable: bool) -> Cg {
        let dir = if sub.is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(sub)
        };
        if !dir.exists() {
            std::fs::create_dir_all(&dir).unwrap();
        }
        if let Some(l) = limit {
            write(&dir.join("memory.limit_in_bytes"), &l.to_string());
        }
        if kill_disable {
            write(&dir.join("memory.oom_control"), "1");
        }
        let rel = if sub.is_empty() {
            self.rel.clone()
        } else {
            format!("{}/{sub}", self.rel)
        };
        Cg { rel, dir }
    }

    /// Starts a hog in `cg`; it is killed when the scratch tree goes.
    pub fn hog(&mut self, cg: &Cg, args: &[&str]) -> Hog {
        let mut cmd = Command::new(hog_bin());
        cmd.arg("--join").arg(&cg.dir).args(args);
        let (pid, report) = self.spawn(cmd);
        // Wait until it has joined, so the next hog starts after it.
        wait_until(Duration::from_secs(5), || {
            read(&cg.dir.join("cgroup.procs"))
                .lines()
                .any(|l| l.trim() == pid.to_string())
                || !Path::new(&format!("/proc/{pid}")).exists()
        });
        Hog { pid, report }
    }

    /// The common stall: waits for `agent` to watch `cg`, starts a hog with `args` in
    /// it, waits for the hog's report (failing with the agent's log) and for the
    /// `resolved` event, which it returns with the hog.
    pub fn stall_resolved(&mut self, agent: &Agent, cg: &Cg, args: &[&str]) -> (Hog, Value) {
        agent.expect("watch", &cg.rel, Duration::from_secs(10));
        let hog = self.hog(cg, args);
        assert!(
            hog.report(Duration::from_secs(15)).is_some(),
            "log:\n{}",
            agent.log()
        );
        let resolved = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
        (hog, resolved)
    }

    /// Starts any program (it must join the cgroup itself); its stdout lines arrive on
    /// the returned channel. It is killed when the scratch tree goes.
    pub fn spawn(&mut self, mut cmd: Command) -> (i32, mpsc::Receiver<String>) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let pid = child.id() as i32;
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.children.push(child);
        (pid, rx)
    }

    /// Kills one of our hogs now (by its Child handle: our own child, PID not reused).
    pub fn kill_hog(&mut self, pid: i32) {
        for c in &mut self.children {
            if c.id() as i32 == pid {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// True if the hog has not exited (reaps it if it has).
    pub fn alive(&mut self, pid: i32) -> bool {
        self.children
            .iter_mut()
            .find(|c| c.id() as i32 == pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// How the hog ended: Some(signal) if killed by a signal.
    pub fn exit_signal(&mut self, pid: i32) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let c = self.children.iter_mut().find(|c| c.id() as i32 == pid)?;
        let st = c.wait().ok()?;
        st.signal()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        oomwake::cgroup::remove_tree(&self.dir, Duration::from_secs(5));
    }
}

pub struct Cg {
    pub rel: String,
    pub dir: PathBuf,
}

impl Cg {
    pub fn under_oom(&self) -> bool {
        read(&self.dir.join("memory.oom_control")).contains("under_oom 1")
    }
    pub fn limit(&self) -> u64 {
        read(&self.dir.join("memory.limit_in_bytes"))
            .trim()
            .parse()
            .unwrap_or(0)
    }
    pub fn usage(&self) -> u64 {
        read(&self.dir.join("memory.usage_in_bytes"))
            .trim()
            .parse()
            .unwrap_or(0)
    }
    pub fn procs(&self) -> Vec<i32> {
        read(&self.dir.join("cgroup.procs"))
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
    /// Waits until the cgroup is stuck and `pid` sleeps in the memcg OOM wait.
    pub fn wait_stuck(&self, pid: i32) {
        let ok = wait_until(Duration::from_secs(20), || {
            self.under_oom() && wchan(pid) == "mem_cgroup_oom_synchronize"
        });
        assert!(
            ok,
            "{} never got stuck (under_oom {}, wchan {:?})",
            self.rel,
            self.under_oom(),
            wchan(pid)
        );
    }
}

pub struct Hog {
    pub pid: i32,
    report: mpsc::Receiver<String>,
}

impl Hog {
    /// The hog's report, once it has touched all its pages.
    pub fn report(&self, timeout: Duration) -> Option<Value> {
        let line = self.report.recv_timeout(timeout).ok()?;
        serde_json::from_str(line.trim()).ok()
    }
}

/// Snapshot and log of the journal in an agent directory.
pub fn journal_text(dir: &Path) -> String {
    read(&dir.join("state/loans.json")) + &read(&dir.join("state/loans.log"))
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn write(p: &Path, v: &str) {
    std::fs::write(p, v).unwrap_or_else(|e| panic!("write {v:?} to {}: {e}", p.display()));
}

pub fn wchan(pid: i32) -> String {
    read(Path::new(&format!("/proc/{pid}/wchan")))
}

/// True if some thread of `pid` sleeps in the memcg OOM wait.
pub fn any_thread_in_oom_wait(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .any(|t| read(&t.path().join("wchan")) == "mem_cgroup_oom_synchronize")
        })
        .unwrap_or(false)
}

pub fn proc_state(pid: i32) -> String {
    let s = read(Path::new(&format!("/proc/{pid}/stat")));
    s.rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// An agent process with its own temporary policies dir, state dir and audit log.
pub struct Agent {
    pub child: Child,
    pub tmp: tempfile::TempDir,
}

impl Agent {
    /// Writes `policies` (file name, text) and starts `oomwake run` with `extra` args.
    pub fn start(policies: &[(&str, &str)], extra: &[&str]) -> Agent {
        Agent::start_in(Agent::dir(policies), extra)
    }

    /// A temporary agent directory with `policies` written in its policies/.
    pub fn dir(policies: &[(&str, &str)]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("policies")).unwrap();
        for (name, text) in policies {
            std::fs::write(tmp.path().join("policies").join(name), text).unwrap();
        }
        tmp
    }

    /// Starts an agent on an existing directory (policies/, state/ inside it).
    pub fn start_in(tmp: tempfile::TempDir, extra: &[&str]) -> Agent {
        Agent::start_in_root(tmp, Path::new(MEMROOT), extra)
    }

    /// [`Agent::start_in`] with another `--cgroup-root` (a subtree of the hierarchy).
    pub fn start_in_root(tmp: tempfile::TempDir, root: &Path, extra: &[&str]) -> Agent {
        Agent::start_in_full(tmp, root, extra, &[])
    }

    /// Like [`Agent::start_in`], with extra environment variables (e.g. OOMWAKE_FAULT).
    pub fn start_in_env(tmp: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_in_full(tmp, Path::new(MEMROOT), extra, env)
    }

    /// [`Agent::start_in_root`] with extra environment variables.
    pub fn start_in_full_env(tmp: tempfile::TempDir, root: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_in_full(tmp, root, &[], env)
    }

    /// [`Agent::start_in_root`] with the agent inside the cgroup directory `join` from
    /// its first instruction (a shell joins it, then becomes the agent).
    pub fn start_joined(tmp: tempfile::TempDir, root: &Path, join: &Path) -> Agent {
        let dir = join.to_str().expect("a UTF-8 cgroup path");
        let join = "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"";
        Agent::start_wrapped(tmp, root, &["sh", "-c", join, "sh", dir], &[], &[])
    }

    fn start_in_full(
        tmp: tempfile::TempDir,
        root: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Agent::start_wrapped(tmp, root, &[], extra, env)
    }

    /// [`Agent::start_in_root`] through `wrapper` (a command that ends by running its
    /// arguments: `prlimit ...`, `unshare ...`): `child` is then the wrapper's process.
    pub fn start_wrapped(
        tmp: tempfile::TempDir,
        root: &Path,
        wrapper: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(tmp.path().join("agent.log"))
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(oomwake_bin());
                c
            }
            None => Command::new(oomwake_bin()),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(tmp.path().join("oomwake.toml"))
            .arg("--cgroup-root")
            .arg(root)
            .arg("--policies")
            .arg(tmp.path().join("policies"))
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .arg("--audit-log")
            .arg(tmp.path().join("audit.jsonl"))
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn oomwake");
        Agent { child, tmp }
    }

    pub fn audit(&self) -> Vec<Value> {
        read(&self.tmp.path().join("audit.jsonl"))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The journal of lent limits as a restarted agent would read it: snapshot + log.
    pub fn journal(&self) -> String {
        journal_text(self.tmp.path())
    }

    pub fn log(&self) -> String {
        read(&self.tmp.path().join("agent.log"))
    }

    /// Audit lines of `event` for `cgroup`.
    pub fn events(&self, event: &str, cgroup: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|v| v["event"] == event && v["cgroup"] == cgroup)
            .collect()
    }

    /// Waits for an audit line matching `pred`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.audit().into_iter().find(|v| pred(v));
            found.is_some()
        });
        found
    }

    /// Waits for `event` on `cgroup`, failing the test (with the agent's log) if it
    /// does not come.
    pub fn expect(&self, event: &str, cgroup: &str, timeout: Duration) -> Value {
        self.wait_for(timeout, |v| v["event"] == event && v["cgroup"] == cgroup)
            .unwrap_or_else(|| {
                panic!(
                    "no {event} event for {cgroup} within {timeout:?}\naudit:\n{}\nlog:\n{}",
                    read(&self.tmp.path().join("audit.jsonl")),
                    self.log()
                )
            })
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Kills the agent with SIGKILL (a crash) and takes its directory for a restart.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let tmp = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.tmp, tmp)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// A policy for exactly `cgroup`: `head` holds top-level keys, `steps` the [[step]]s.
pub fn policy(name: &str, cgroup: &str, head: &str, steps: &str) -> String {
    format!("name = \"{name}\"\n{head}\n[match]\ncgroup = [\"{cgroup}\"]\n\n{steps}\n")
}
