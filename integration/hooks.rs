//! What an exec hook inherits from the agent, and the agent as PID 1 of a container
//! (root, cgroup v1).

use std::time::Duration;

use crate::common::*;

/// Prints what the hook inherited: its open-file limits, oom_score_adj, and the
/// blocked and ignored signals the shell had when it exec'd grep (not the shell's own
/// status read by a child: the shell blocks every signal while it waits for one).
const REPORT_HOOK: &str = r#"
[[step]]
action = "exec"
command = ["/bin/sh", "-c", "echo $(ulimit -Sn) $(ulimit -Hn) $(cat /proc/self/oom_score_adj); exec grep -E '^Sig(Blk|Ign)' /proc/self/status"]
timeout = "5s"
settle = "10ms"
"#;

/// The soft open-file limit the agent is started with here (below the hard limit, which
/// the agent raises its own soft limit to).
const START_SOFT: u64 = 777;

/// The agent raises its soft RLIMIT_NOFILE to the hard limit at start (a descriptor per
/// watched cgroup); a hook gets the soft limit the agent started with, not the raised
/// one, oom_score_adj 0 (not the agent's shield), and no blocked or ignored signal.
/// Before the fix the hook printed the raised limit (the hard one).
#[test]
fn a_hook_gets_the_open_file_limit_the_agent_started_with() {
    let Some(()) = require_v1("a_hook_gets_the_open_file_limit_the_agent_started_with") else {
        return;
    };
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    assert!(hard > START_SOFT, "hard open-file limit {hard} too low");
    let mut s = Scratch::new("nofile");
    let cg = s.cgroup("w", Some(32 * MIB), true);
    // The agent's root is the scratch tree: its paths start there.
    let tmp = Agent::dir(&[(
        "p.toml",
        &policy("nofile", "/w", "", &format!("{REPORT_HOOK}{LOAN}")),
    )]);
    let soft = format!("--nofile={START_SOFT}:");
    let agent = Agent::start_wrapped(tmp, &s.dir, &["prlimit", &soft, "--"], &[], &[]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    // prlimit execs the agent: same process. It raised its own soft limit.
    let limits = read(std::path::Path::new(&format!(
        "/proc/{}/limits",
        agent.child.id()
    )));
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(open_files, format!("{hard} {hard}"), "{limits}");
    let _hog = s.hog(&cg, &["--touch", "40M", "--hold", "30s"]);
    let exec = agent
        .wait_for(Duration::from_secs(30), |v| {
            v["event"] == "action" && v["action"] == "exec" && v["cgroup"] == "/w"
        })
        .unwrap_or_else(|| panic!("no exec action; log:\n{}", agent.log()));
    let out = exec["stdout"].as_str().unwrap_or_default().to_string();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("{START_SOFT} {hard} 0").as_str()),
        "the hook's soft and hard open-file limits and oom_score_adj: {exec}"
    );
    for l in lines {
        let (name, mask) = l.split_once(':').unwrap();
        assert_eq!(
            mask.trim(),
            "0000000000000000",
            "{name} of the hook: {exec}; the agent's: {}",
            read(std::path::Path::new(&format!(
                "/proc/{}/status",
                agent.child.id()
            )))
            .lines()
            .filter(|l| l.starts_with("Sig"))
            .collect::<Vec<_>>()
            .join(" ")
        );
    }
    agent.expect("resolved", "/w", Duration::from_secs(30));
}

/// A hook that leaves a process behind and fails with a status of its own.
const ORPHAN_HOOK: &str = r#"
[[step]]
action = "exec"
command = ["/bin/sh", "-c", "sleep 1 >/dev/null 2>&1 & exit 3"]
timeout = "5s"
settle = "10ms"
"#;

/// SIGKILL to a process when dropped (still running: the test failed).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Every child of `pid` (of any of its threads: a hook is the child of the episode
/// worker that started it, an orphan the child of the main thread) with its state.
fn children(pid: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        for c in read(&t.path().join("children")).split_whitespace() {
            let Ok(c) = c.parse::<i32>() else { continue };
            let stat = read(std::path::Path::new(&format!("/proc/{c}/stat")));
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.chars().next())
                .unwrap_or('?');
            out.push((c, state));
        }
    }
    out
}

/// The agent as PID 1 of a PID namespace (`docker run` without `--init`): what a hook
/// leaves behind (`sleep 1 &`) is handed to it when the hook exits, and it reaps it once
/// it ends, without taking the hook's own exit status from the episode (3 here, read
/// while the agent reaps every 10 ms); SIGTERM still stops it (PID 1 gets no default
/// action for a signal it does not handle). Before the fix the `sleep` stayed a zombie
/// child of the agent for good.
#[test]
fn as_pid_1_the_agent_reaps_what_its_hooks_leave_and_stops_on_sigterm() {
    let name = "as_pid_1_the_agent_reaps_what_its_hooks_leave_and_stops_on_sigterm";
    let Some(()) = require_v1(name) else { return };
    let mut s = Scratch::new("pid1");
    let _cg = s.cgroup("w", Some(32 * MIB), true);
    let tmp = Agent::dir(&[(
        "p.toml",
        &policy("pid1", "/w", "", &format!("{ORPHAN_HOOK}{LOAN}")),
    )]);
    std::fs::write(
        tmp.path().join("oomwake.toml"),
        "sweep_interval = \"10ms\"\n",
    )
    .unwrap();
    let mut agent = Agent::start_wrapped(
        tmp,
        &s.dir,
        &["unshare", "--pid", "--fork", "--mount-proc", "--"],
        &[],
        &[],
    );
    let unshare = agent.child.id() as i32;
    let mut agent_pid = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            agent_pid = children(unshare).first().map_or(0, |c| c.0);
            agent_pid > 0
        }),
        "unshare started no agent; log:\n{}",
        agent.log()
    );
    // Killing unshare would leave the agent running: a failed test kills the agent.
    let guard = KillOnDrop(agent_pid);
    let status = read(std::path::Path::new(&format!("/proc/{agent_pid}/status")));
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default();
    assert!(
        nspid.ends_with("\t1"),
        "not PID 1 of its namespace: {nspid}"
    );
    agent.expect("watch", "/w", Duration::from_secs(10));
    let hog = s.hog(&_cg, &["--touch", "40M", "--hold", "30s"]);
    let exec = agent
        .wait_for(Duration::from_secs(30), |v| {
            v["event"] == "action" && v["action"] == "exec" && v["cgroup"] == "/w"
        })
        .unwrap_or_else(|| panic!("no exec action; log:\n{}", agent.log()));
    assert_eq!(exec["exit_code"], 3, "the hook's status was taken: {exec}");
    agent.expect("resolved", "/w", Duration::from_secs(30));
    // The orphan became the agent's child (seen while it sleeps, or as a zombie).
    let mut orphans = Vec::new();
    wait_until(Duration::from_secs(1), || {
        orphans = children(agent_pid);
        !orphans.is_empty()
    });
    // `sleep 1` ends within a second of the hook; then it is reaped at a sweep.
    let reaped = wait_until(Duration::from_secs(5), || children(agent_pid).is_empty());
    assert!(
        reaped,
        "children of the agent left: {:?} (seen before: {orphans:?}); log:\n{}",
        children(agent_pid),
        agent.log()
    );
    assert!(
        agent.log().contains("gets orphaned processes"),
        "{}",
        agent.log()
    );
    s.kill_hog(hog.pid);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stopped = wait_until(Duration::from_secs(10), || {
        agent.child.try_wait().is_ok_and(|s| s.is_some())
    });
    assert!(
        stopped,
        "the agent as PID 1 did not stop on SIGTERM; log:\n{}",
        agent.log()
    );
    // Gone: its PID is not ours to signal any more.
    std::mem::forget(guard);
    eprintln!("{name}: orphans seen before the reap: {orphans:?}");
}
