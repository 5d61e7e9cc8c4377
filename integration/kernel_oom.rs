//! `kernel_oom_kill` on real v1 cgroups: the stall is handed to the kernel's own OOM
//! killer (oom_kill_disable 0 through the agent's kept descriptor), the kernel kills,
//! the agent names the victim from /dev/kmsg, and oom_kill_disable is 1 again. Every
//! agent here is rooted at its scratch cgroup (`--cgroup-root`): it sees nothing else.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const STEP: &str = "[[step]]\naction = \"kernel_oom_kill\"\n";

fn oom_kill_disable(cg: &Cg) -> Option<bool> {
    read(&cg.dir.join("memory.oom_control"))
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill_disable "))
        .map(|v| v.trim() == "1")
}

/// Samples `memory.oom_control` every millisecond on a thread; `stop()` returns how
/// many samples saw oom_kill_disable 0.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Sampler {
    fn start(cg: &Cg) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let dir = cg.dir.clone();
        let thread = std::thread::spawn(move || {
            let (mut zero, mut all) = (0, 0);
            while !s.load(Ordering::Relaxed) {
                let t = read(&dir.join("memory.oom_control"));
                if t.contains("oom_kill_disable 0") {
                    zero += 1;
                }
                all += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (zero, all)
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn action_line(agent: &Agent, cg: &str, timeout: Duration) -> Value {
    agent
        .wait_for(timeout, |v| {
            v["event"] == "action" && v["cgroup"] == cg && v["action"] == "kernel_oom_kill"
        })
        .unwrap_or_else(|| panic!("no kernel_oom_kill action line; log:\n{}", agent.log()))
}

/// Agent outside, a policy with only `kernel_oom_kill`: a hog fills a 96 MiB cgroup
/// with oom_kill_disable 1 and sleeps in the OOM wait; the kernel kills it, the audit
/// line names it (pid, comm) from the kernel's own record, oom_kill_disable is 1 again.
#[test]
fn kernel_oom_kill_hands_a_v1_stall_to_the_kernel_and_puts_oom_kill_disable_back() {
    let Some(()) = require_v1("kernel_oom_kill_v1") else {
        return;
    };
    let mut s = Scratch::new("koom-v1");
    let cg = s.cgroup("w", Some(96 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "", STEP))]);
    let agent = Agent::start_in_root(tmp, &s.dir, &[]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "200M", "--hold", "60s", "--tag", "koom"]);
    let oom = agent.expect("oom", "/w", Duration::from_secs(20));
    let act = action_line(&agent, "/w", Duration::from_secs(10));
    let resolved = agent.expect("resolved", "/w", Duration::from_secs(10));
    assert_eq!(act["outcome"], "done", "{act}\nlog:\n{}", agent.log());
    assert_eq!(act["via"], "kernel", "{act}");
    assert_eq!(act["signal"], "SIGKILL", "{act}");
    assert_eq!(act["descriptor"], "kept", "{act}");
    assert_eq!(act["oom_kill_disable_restored"], true, "{act}");
    assert_eq!(act["crash_record"], true, "{act}");
    assert!(act["oom_kills"].as_u64().unwrap_or(0) >= 1, "{act}");
    assert_eq!(act["pid"], hog.pid, "{act}");
    assert_eq!(act["comm"], "oomwake-hog", "{act}");
    assert_eq!(
        oom_kill_disable(&cg),
        Some(true),
        "oom_kill_disable not put back"
    );
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    assert!(
        !agent
            .tmp
            .path()
            .join("state")
            .read_dir()
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("kernel-oom-")),
        "the hand-off's crash record was left behind"
    );
    eprintln!("action line: {act}");
    eprintln!(
        "kernel_oom_kill v1: waited_ms {} (write -> oom_kill counter rose), stalled_ms {} (oom seen -> resolved), oom ts {} action ts {}",
        act["waited_ms"], resolved["stalled_ms"], oom["ts"], act["ts"]
    );
}

/// Audit mode changes nothing: the line says `would` with the counter it would watch,
/// oom_kill_disable stays 1 throughout, and the hog stays in the OOM wait.
#[test]
fn kernel_oom_kill_in_audit_mode_changes_nothing() {
    let Some(()) = require_v1("kernel_oom_kill_audit") else {
        return;
    };
    let mut s = Scratch::new("koom-audit");
    let cg = s.cgroup("w", Some(64 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "mode = \"audit\"", STEP))]);
    let agent = Agent::start_in_root(tmp, &s.dir, &[]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    let sampler = Sampler::start(&cg);
    let hog = s.hog(&cg, &["--touch", "200M", "--hold", "60s"]);
    cg.wait_stuck(hog.pid);
    let act = action_line(&agent, "/w", Duration::from_secs(10));
    assert_eq!(act["outcome"], "would", "{act}");
    assert_eq!(act["file"], "memory.oom_control", "{act}");
    assert!(act["oom_kill"].is_u64(), "{act}");
    std::thread::sleep(Duration::from_secs(1));
    let (zero, all) = sampler.stop();
    assert_eq!(zero, 0, "oom_kill_disable was 0 in {zero} of {all} samples");
    assert!(s.alive(hog.pid), "the hog was killed in audit mode");
    assert_eq!(wchan(hog.pid), "mem_cgroup_oom_synchronize");
    assert_eq!(oom_kill_disable(&cg), Some(true));
    s.kill_hog(hog.pid);
}

/// A healthy workload in the same shape (below its limit) is never touched: no action,
/// oom_kill_disable 1 in every sample, the workload alive.
#[test]
fn kernel_oom_kill_leaves_a_healthy_workload_alone() {
    let Some(()) = require_v1("kernel_oom_kill_healthy") else {
        return;
    };
    let mut s = Scratch::new("koom-healthy");
    let cg = s.cgroup("w", Some(96 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "", STEP))]);
    let agent = Agent::start_in_root(tmp, &s.dir, &[]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    let sampler = Sampler::start(&cg);
    let hog = s.hog(&cg, &["--touch", "48M", "--hold", "60s"]);
    assert!(hog.report(Duration::from_secs(15)).is_some());
    // A second one beside it, still below the limit (80 of 96 MiB in all).
    let busy = s.hog(&cg, &["--touch", "32M", "--hold", "60s"]);
    assert!(busy.report(Duration::from_secs(15)).is_some());
    std::thread::sleep(Duration::from_secs(3));
    let (zero, all) = sampler.stop();
    assert_eq!(zero, 0, "oom_kill_disable was 0 in {zero} of {all} samples");
    let acted: Vec<Value> = agent
        .audit()
        .into_iter()
        .filter(|v| v["event"] == "action" || v["event"] == "oom")
        .collect();
    assert!(acted.is_empty(), "{acted:?}");
    assert!(s.alive(hog.pid) && s.alive(busy.pid));
    assert_eq!(oom_kill_disable(&cg), Some(true));
}

/// The sidecar shape: the agent in POD/agent, a grower and a small sleeping task in
/// POD/app, the limit and oom_kill_disable 1 on POD. The agent cannot open anything at
/// the wall; the hand-off goes through the descriptor kept open, the kernel kills the
/// grower (the largest), the small task and the agent live, oom_kill_disable is 1.
#[test]
fn kernel_oom_kill_from_inside_the_stuck_pod_kills_the_grower_only() {
    let Some(()) = require_v1("kernel_oom_kill_inside") else {
        return;
    };
    let mut s = Scratch::new("koom-pod");
    let pod = s.cgroup("pod", Some(128 * MIB), true);
    let agent_cg = s.cgroup("pod/agent", None, false);
    let app = s.cgroup("pod/app", None, false);
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("pod", "/pod", "", STEP),
    )
    .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$1/cgroup.procs\" && exec \"$2\" run --config \"$3/oomwake.toml\" --cgroup-root \"$4\" --policies \"$3/policies\" --state-dir \"$3/state\" --audit-log \"$3/audit.jsonl\" 2>\"$3/agent.log\"")
        .arg("sh")
        .arg(&agent_cg.dir)
        .arg(oomwake_bin())
        .arg(tmp.path())
        .arg(&s.dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let (agent_pid, _out) = s.spawn(cmd);
    let audit_path = tmp.path().join("audit.jsonl");
    let log = || read(&tmp.path().join("agent.log"));
    let audit = || -> Vec<Value> {
        read(&audit_path)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(20), || audit()
            .iter()
            .any(|v| v["event"] == "watch" && v["cgroup"] == "/pod")),
        "agent never watched; log:\n{}",
        log()
    );
    assert!(agent_cg.procs().contains(&agent_pid));
    let small = s.hog(&app, &["--touch", "2M", "--hold", "120s", "--tag", "small"]);
    assert!(small.report(Duration::from_secs(10)).is_some());
    let grower = s.hog(
        &app,
        &["--touch", "300M", "--hold", "60s", "--tag", "grower"],
    );
    let found = wait_until(Duration::from_secs(30), || {
        audit().iter().any(|v| {
            v["event"] == "action" && v["cgroup"] == "/pod" && v["action"] == "kernel_oom_kill"
        })
    });
    assert!(found, "no kernel_oom_kill line; log:\n{}", log());
    let resolved = wait_until(Duration::from_secs(10), || {
        audit()
            .iter()
            .any(|v| v["event"] == "resolved" && v["cgroup"] == "/pod")
    });
    let act = audit()
        .into_iter()
        .find(|v| v["event"] == "action" && v["action"] == "kernel_oom_kill")
        .unwrap();
    eprintln!("inside: {act}");
    assert_eq!(act["outcome"], "done", "{act}\nlog:\n{}", log());
    assert_eq!(act["descriptor"], "kept", "{act}");
    assert_eq!(act["oom_kill_disable_restored"], true, "{act}");
    assert_eq!(s.exit_signal(grower.pid), Some(libc::SIGKILL));
    assert!(s.alive(small.pid), "the small task was killed");
    assert!(s.alive(agent_pid), "the agent died; log:\n{}", log());
    assert_eq!(oom_kill_disable(&pod), Some(true));
    assert!(resolved, "never resolved; log:\n{}", log());
    let stalled = audit()
        .into_iter()
        .find(|v| v["event"] == "resolved" && v["cgroup"] == "/pod")
        .map(|v| v["stalled_ms"].clone());
    eprintln!(
        "kernel_oom_kill inside: waited_ms {} (write -> kill seen), stalled_ms {:?} (oom seen -> resolved)",
        act["waited_ms"], stalled
    );
    if act.get("pid").is_some() {
        assert_eq!(act["pid"], grower.pid, "{act}");
    } else {
        assert_eq!(act["victim"], "unknown", "{act}");
    }
    // SIGTERM ends it.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(wait_until(Duration::from_secs(10), || !s.alive(agent_pid)));
    s.kill_hog(small.pid);
}

/// The agent dies between its two writes (oom_kill_disable 0 written, 1 not yet): the
/// record it wrote before the first one makes the next start put 1 back.
#[test]
fn kernel_oom_kill_interrupted_by_a_crash_is_put_back_at_the_next_start() {
    let Some(()) = require_v1("kernel_oom_kill_crash") else {
        return;
    };
    let mut s = Scratch::new("koom-crash");
    let cg = s.cgroup("w", Some(64 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "", STEP))]);
    let mut agent =
        Agent::start_in_full_env(tmp, &s.dir, &[("OOMWAKE_FAULT", "handoff_enabled:abort")]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "200M", "--hold", "60s"]);
    assert!(
        wait_until(Duration::from_secs(20), || !agent.running()),
        "the agent did not abort; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("aborting at handoff_enabled"),
        "{}",
        agent.log()
    );
    assert_eq!(
        oom_kill_disable(&cg),
        Some(false),
        "the crash left the kernel's killer on"
    );
    // (The kernel's OOM killer, enabled, has taken the hog by now.)
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    let agent = Agent::start_in_root(agent.crash(), &s.dir, &[]);
    let rec = agent.expect("oom_kill_disable_restored", "/w", Duration::from_secs(10));
    assert_eq!(rec["result"], "restored", "{rec}");
    assert_eq!(rec["reason"], "startup", "{rec}");
    assert_eq!(oom_kill_disable(&cg), Some(true));
    assert!(
        !agent
            .tmp
            .path()
            .join("state")
            .read_dir()
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("kernel-oom-")),
        "the record was left behind"
    );
}

/// The cgroup is removed and made again (a service restarted under the same name)
/// while the hand-off waits: `oom_kill_disable 1` is not written to the new cgroup,
/// which the operator never set (it would stall at its limit with nobody's OOM killer).
#[test]
fn kernel_oom_kill_puts_nothing_on_a_cgroup_made_again_under_the_same_name() {
    let Some(()) = require_v1("kernel_oom_kill_recreated") else {
        return;
    };
    let mut s = Scratch::new("koom-again");
    let cg = s.cgroup("w", Some(64 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "", STEP))]);
    let agent = Agent::start_in_full_env(
        tmp,
        &s.dir,
        &[("OOMWAKE_FAULT", "handoff_enabled:pause-3000")],
    );
    agent.expect("watch", "/w", Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "200M", "--hold", "60s"]);
    // The kernel, enabled by the hand-off, kills the hog during the pause.
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::remove_dir(&cg.dir)
            .is_ok()),
        "rmdir {}",
        cg.dir.display()
    );
    let again = s.cgroup("w", None, false);
    assert_eq!(oom_kill_disable(&again), Some(false));
    let act = action_line(&agent, "/w", Duration::from_secs(15));
    assert_eq!(
        oom_kill_disable(&again),
        Some(false),
        "oom_kill_disable 1 written to the new cgroup: {act}\nlog:\n{}",
        agent.log()
    );
    assert_eq!(act["oom_kill_disable_restored"], false, "{act}");
    assert_eq!(act["cgroup_gone"], true, "{act}");
}

/// SIGTERM while a hand-off is between its two writes: the agent puts
/// `oom_kill_disable 1` back before it exits (or leaves its record for the next start).
#[test]
fn kernel_oom_kill_stopped_by_sigterm_mid_hand_off_puts_oom_kill_disable_back() {
    let Some(()) = require_v1("kernel_oom_kill_sigterm") else {
        return;
    };
    let mut s = Scratch::new("koom-term");
    // The fault point's pause holds the hand-off between its writes while SIGTERM comes.
    let cg = s.cgroup("w", Some(64 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "", STEP))]);
    let mut agent = Agent::start_in_full_env(
        tmp,
        &s.dir,
        &[("OOMWAKE_FAULT", "handoff_enabled:pause-2000")],
    );
    agent.expect("watch", "/w", Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "200M", "--hold", "60s"]);
    assert!(
        wait_until(Duration::from_secs(20), || agent.log().contains("pausing")),
        "{}",
        agent.log()
    );
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(20), || !agent.running()),
        "the agent did not stop; log:\n{}",
        agent.log()
    );
    let _ = s.exit_signal(hog.pid);
    let record_left = agent
        .tmp
        .path()
        .join("state")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("kernel-oom-"));
    assert!(
        oom_kill_disable(&cg) == Some(true) || record_left,
        "SIGTERM left oom_kill_disable 0 and no record; log:\n{}",
        agent.log()
    );
    eprintln!(
        "after SIGTERM: oom_kill_disable {:?}, record left {record_left}",
        oom_kill_disable(&cg)
    );
}
