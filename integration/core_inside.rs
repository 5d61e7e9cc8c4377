//! The agent inside the cgroup it rescues (a sidecar sharing a pod's limit): its memory
//! is resident and locked before the stall, so it does not park itself in the wait it
//! has to end; it resolves that stall (the raise writes the limit before its journal
//! line, which needs a page charged to the stuck cgroup), and it still answers SIGTERM
//! (root, cgroup v1).

use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use crate::common::*;

/// A hook before the raise: the agent reads its output without starting a thread (a
/// new thread's stack would be charged to the stuck cgroup and park there).
const HOOK: &str = r#"
[[step]]
action = "exec"
command = ["/bin/echo", "hook"]
timeout = "1s"
settle = "10ms"
"#;

/// In about 1 run of 6 under load this agent used to die of SIGSEGV before acting: the
/// hook was started with fork, which write-protected the agent's pages, and the kernel's
/// next write to one of them (the restartable-sequence area of a thread, on its way back
/// to user mode) needed a copy charged to the stuck cgroup. Hooks now start without
/// copying the agent (`sys::spawn`); the test below proves that part deterministically.
#[test]
fn agent_inside_the_stuck_cgroup_resolves_it_and_stops_on_sigterm() {
    let Some(()) = require_v1("agent_inside_the_stuck_cgroup_resolves_it_and_stops_on_sigterm")
    else {
        return;
    };
    let mut s = Scratch::new("inside");
    let cg = s.cgroup("", Some(128 * MIB), true);
    let (agent_pid, tmp, _out) = start_inside(
        &mut s,
        &cg,
        &policy("inside", &cg.rel, "", &format!("{HOOK}{LOAN}")),
    );
    let audit = tmp.path().join("audit.jsonl");
    let agent_usage = cg.usage();

    // The hog fills what is left: the cgroup, agent included, is at its wall.
    let hog = s.hog(&cg, &["--touch", "160M", "--hold", "30s"]);
    // The agent runs its episode in the stuck cgroup (it reads, formats and logs) and
    // its loop keeps sweeping: none of its threads may fault into the OOM wait, and the
    // raise must go through although its journal line needs a page there.
    // The hook may end an episode first: killed at its timeout (it sits in the stuck
    // cgroup too), it frees pages and the hog moves on for a moment, `resolved` by the
    // exec step (seen in the VM under emulation); the next episode raises. So this
    // waits for the raise and the resolution that follows it.
    let mut parked = false;
    let resolved = wait_until(Duration::from_secs(30), || {
        parked |= any_thread_in_oom_wait(agent_pid);
        read(&audit)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| {
                v["event"] == "resolved"
                    && v["cgroup"] == cg.rel.as_str()
                    && v["by_action"] == "raise_limit"
            })
    });
    let agent_log = || read(&tmp.path().join("agent.log"));
    assert!(
        resolved,
        "the agent did not resolve its own cgroup's stall (limit {}, under_oom {}); threads: {}; stat: {}; audit:\n{}\nlog:\n{}",
        cg.limit(),
        cg.under_oom(),
        threads(agent_pid),
        // State and, for a zombie, the exit code (field 52): how the agent ended when
        // it could not write a word of it to its log in the stuck cgroup.
        read(std::path::Path::new(&format!("/proc/{agent_pid}/stat"))),
        read(&audit),
        agent_log()
    );
    assert!(
        !parked,
        "an agent thread slept in mem_cgroup_oom_synchronize; log:\n{}",
        agent_log()
    );
    assert!(cg.limit() > 128 * MIB, "limit {}", cg.limit());
    assert!(
        hog.report(Duration::from_secs(20)).is_some(),
        "the hog never finished touching its memory"
    );
    // The loan was journaled once there was room: a restart would give it back.
    let journal = journal_text(tmp.path());
    assert!(
        journal.contains(cg.rel.as_str()),
        "the loan is not in the journal: {journal}"
    );

    // SIGTERM is still answered (the loop is not parked in the OOM wait).
    let agent_log = stops_on_sigterm(&mut s, agent_pid, &tmp);
    let locked = agent_log
        .lines()
        .find(|l| l.contains("memory locked:"))
        .unwrap_or("(no memory locked line)");
    eprintln!(
        "agent inside the cgroup: {locked}; cgroup usage with the agent alone {} KiB",
        agent_usage >> 10
    );
}

/// A reload in the middle of its own cgroup's stall: the agent inside the cgroup holds
/// the stall in audit mode (nothing changed), the operator switches the policy to
/// enforce and sends SIGHUP. Inside a cgroup at its wall opening a file mostly fails
/// (the kernel's `struct file` and dentries are charged there too: ENOMEM, seen with
/// strace), so the reload often cannot be read at first. It is deferred, not lost: the
/// agent tries again at every sweep (a try can get through when the kernel has a few
/// bytes of kernel memory to spare) and in any case once the stall ends, here by the
/// operator killing the hog; either way the new policy rescues the cgroup, and no agent
/// thread parks in the OOM wait. Without the deferral the SIGHUP was dropped with an
/// error nobody could read (the log is in the same cgroup): 3 runs of 3 gave no loan in
/// 20 s (with a CI run beside them), and the next stall was held in audit mode again.
/// The SIGHUP comes 3 s into the stall, when the first try fails (see below).
#[test]
fn agent_inside_does_not_lose_a_reload_its_stuck_cgroup_cannot_read() {
    let Some(()) = require_v1("agent_inside_does_not_lose_a_reload_its_stuck_cgroup_cannot_read")
    else {
        return;
    };
    let mut s = Scratch::new("insidereload");
    let cg = s.cgroup("", Some(128 * MIB), true);
    let (agent_pid, tmp, _out) = start_inside(
        &mut s,
        &cg,
        &policy("inside", &cg.rel, "mode = \"audit\"", LOAN),
    );
    let log = || read(&tmp.path().join("agent.log"));
    let hog = s.hog(&cg, &["--touch", "160M", "--hold", "30s"]);
    cg.wait_stuck(hog.pid);
    // A few sweeps at the wall first: right after the stall began the kernel still had
    // a little kernel memory to spare for the agent and the first try of a reload got
    // through (8 runs of 8); after 3 s it failed in every run.
    std::thread::sleep(Duration::from_secs(3));
    // Cgroups made meanwhile (by the operator, outside): the agent's inotify events
    // cannot be allocated at the wall, the kernel queues an overflow, and the agent
    // rescans a hierarchy whose directories it cannot open (the new cgroups are made
    // beside this one: below a cgroup at its wall mkdir itself fails). That rescan
    // used to take
    // the stuck cgroup for removed and unwatch it (seen when other tests made cgroups
    // beside this one), so the reload below had nothing to rescue.
    let beside = Scratch::new("insidereload-beside");
    for i in 0..3 {
        beside.cgroup(&format!("c{i}"), None, false);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(cg.limit(), 128 * MIB, "audit mode changed the limit");
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("inside", &cg.rel, "mode = \"enforce\"", LOAN),
    )
    .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGHUP,
    );
    let mut parked = false;
    let lent_in_the_stall = wait_until(Duration::from_secs(5), || {
        parked |= any_thread_in_oom_wait(agent_pid);
        cg.limit() > 128 * MIB
    });
    assert!(
        !parked,
        "an agent thread slept in the OOM wait; log:\n{}",
        log()
    );
    assert!(s.alive(agent_pid), "the agent died; log:\n{}", log());
    if !lent_in_the_stall {
        // The operator ends the stall: the deferred reload goes through at the next
        // sweep, and the next stall is the new policy's.
        s.kill_hog(hog.pid);
        assert!(
            wait_until(Duration::from_secs(10), || log()
                .contains("the deferred reload went through")),
            "the reload was not applied after the stall; log:\n{}",
            log()
        );
        let hog = s.hog(&cg, &["--touch", "160M", "--hold", "30s"]);
        assert!(
            wait_until(Duration::from_secs(20), || cg.limit() > 128 * MIB),
            "the reload was lost: no loan under the enforce policy (under_oom {}); log:\n{}",
            cg.under_oom(),
            log()
        );
        assert!(
            hog.report(Duration::from_secs(20)).is_some(),
            "the second hog never finished touching its memory"
        );
    }
    let audit = read(&tmp.path().join("audit.jsonl"));
    let unwatched: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"unwatch\"") && l.contains(&format!("\"{}\"", cg.rel)))
        .collect();
    assert!(
        unwatched.is_empty(),
        "the stuck cgroup was unwatched: {unwatched:?}"
    );
    let log = stops_on_sigterm(&mut s, agent_pid, &tmp);
    assert!(
        log.contains("reloaded: 1 policy"),
        "no reload in the log:\n{log}"
    );
    eprintln!(
        "reload mid-stall inside: applied {}",
        match (lent_in_the_stall, log.contains("reload deferred")) {
            (true, true) => "during the stall, by a later try",
            (true, false) => "during the stall, at the first try",
            (false, _) => "after the stall",
        }
    );
}

/// A kill step with the agent inside the stuck cgroup: choosing a victim reads
/// `/proc/PID/*` and the kill needs a pidfd, and inside a cgroup at its wall every open
/// fails (ENOMEM). The kill kit ([`oomwake::armed`]) keeps what the kill needs open
/// ahead of time, so the kill acts, through the kit, and the raise after it is never
/// needed. This test used to accept a skipped kill (then the raise resolved), and
/// failed CI when neither happened ("no candidate process": the unreadable task list
/// taken for an empty one); the kill is now the only outcome it accepts.
#[test]
fn agent_inside_kills_at_its_own_wall_through_its_kill_kit() {
    let Some(()) = require_v1("agent_inside_kills_at_its_own_wall_through_its_kill_kit") else {
        return;
    };
    let mut s = Scratch::new("insidekill");
    let cg = s.cgroup("", Some(128 * MIB), true);
    let (agent_pid, tmp, _out) = start_inside(
        &mut s,
        &cg,
        &policy("inside", &cg.rel, "", &format!("{KILL}{LOAN}")),
    );
    let audit = tmp.path().join("audit.jsonl");
    let lines = || audit_of(&audit, &cg.rel);
    let go = tmp.path().join("go");
    let barrier = format!("{}:1M", go.display());
    let hog = s.hog(
        &cg,
        &["--touch", "160M", "--hold", "30s", "--barrier", &barrier],
    );
    wait_armed(&tmp.path().join("state"), hog.pid);
    write(&go, "");
    let mut parked = false;
    let resolved = wait_until(Duration::from_secs(20), || {
        parked |= any_thread_in_oom_wait(agent_pid);
        lines()
            .iter()
            .any(|v| v["event"] == "resolved" && v["by_step"].is_u64())
    });
    assert!(
        resolved,
        "not resolved (under_oom {}); threads: {}; audit:\n{:#?}",
        cg.under_oom(),
        threads(agent_pid),
        lines()
    );
    assert!(!parked, "an agent thread slept in the OOM wait");
    let kill = lines()
        .into_iter()
        .find(|v| v["event"] == "action" && v["action"] == "kill")
        .expect("no kill action line");
    assert_eq!(kill["outcome"], "done", "{kill}");
    assert_eq!(kill["via"], "armed", "{kill}");
    assert_eq!(kill["pid"], hog.pid, "{kill}");
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    let resolved = lines()
        .into_iter()
        .find(|v| v["event"] == "resolved")
        .unwrap();
    assert_eq!(resolved["by_action"], "kill", "{resolved}");
    assert!(
        !lines().iter().any(|v| v["action"] == "raise_limit"),
        "a raise ran after the kill: {:#?}",
        lines()
    );
    stops_on_sigterm(&mut s, agent_pid, &tmp);
}

/// The sidecar of the issue it was built for: the agent in `POD/agent`, a small task
/// and a grower in `POD/app`, the limit and `oom_kill_disable` on `POD`, a policy whose
/// only step is `kill`. Round after round (20 by default, `OOMWAKE_INSIDE_ROUNDS`), a
/// new grower fills the pod: it is killed (SIGKILL, named in the audit, within 1 s of
/// the stall), the small task and the agent live, no agent thread sleeps in the OOM
/// wait; then `status` answers and SIGTERM stops the agent. The agent's heap is warm
/// after the first rounds (the second half of rounds runs with the history of the
/// first).
#[test]
fn a_sidecar_in_its_pod_kills_the_grower_at_the_pods_wall_every_time() {
    let Some(()) = require_v1("a_sidecar_in_its_pod_kills_the_grower_at_the_pods_wall_every_time")
    else {
        return;
    };
    let rounds = inside_rounds();
    let mut s = Scratch::new("insidepod");
    let pod = s.cgroup("", Some(128 * MIB), true);
    let agent_cg = s.cgroup("agent", None, false);
    let app = s.cgroup("app", None, false);
    let (agent_pid, tmp, _out) = start_inside_at(
        &mut s,
        &agent_cg,
        &pod,
        &policy("pod", &pod.rel, "", KILL_SETTLE),
    );
    let audit = tmp.path().join("audit.jsonl");
    let state = tmp.path().join("state");
    let took = pod_rounds(
        &mut s,
        (&pod, &app),
        agent_pid,
        &audit,
        rounds,
        Some(&state),
    );
    let status = Command::new(oomwake_bin())
        .args(["status", "--state-dir"])
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "status did not answer: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    stops_on_sigterm(&mut s, agent_pid, &tmp);
    eprintln!(
        "sidecar kill inside its pod, {rounds} rounds: {}",
        spread(took)
    );
}

/// The same pod with the agent outside it (in the test's cgroup): the kill goes through
/// `/proc` and a fresh pidfd. Its latency is what the inside case is compared with
/// (README: "Running the agent inside a cgroup it manages").
#[test]
fn the_same_pod_with_the_agent_outside_kills_the_grower_every_time() {
    let Some(()) = require_v1("the_same_pod_with_the_agent_outside_kills_the_grower_every_time")
    else {
        return;
    };
    let rounds = inside_rounds();
    let mut s = Scratch::new("outsidepod");
    let pod = s.cgroup("", Some(128 * MIB), true);
    let app = s.cgroup("app", None, false);
    let agent = Agent::start(
        &[("p.toml", &policy("pod", &pod.rel, "", KILL_SETTLE))],
        &[],
    );
    agent.expect("watch", &pod.rel, Duration::from_secs(20));
    let audit = agent.tmp.path().join("audit.jsonl");
    let pid = agent.child.id() as i32;
    let took = pod_rounds(&mut s, (&pod, &app), pid, &audit, rounds, None);
    eprintln!(
        "kill with the agent outside the pod, {rounds} rounds: {}",
        spread(took)
    );
}

/// A kill-only policy; the settle leaves time for the victim's memory to go.
const KILL_SETTLE: &str =
    "[[step]]\naction = \"kill\"\nvictim = \"largest_rss\"\nsettle = \"2s\"\n";

/// How many stalls a pod test drives (`OOMWAKE_INSIDE_ROUNDS`, default 20).
fn inside_rounds() -> usize {
    std::env::var("OOMWAKE_INSIDE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// min / median / max of latencies in ms.
fn spread(mut took: Vec<i64>) -> String {
    took.sort_unstable();
    format!(
        "stall to kill min {} ms, median {} ms, max {} ms",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    )
}

/// Waits until the agent's `status.json` in `state` shows `pid` in its kill kit.
fn wait_armed(state: &std::path::Path, pid: i32) {
    let armed = || {
        serde_json::from_str::<serde_json::Value>(&read(&state.join("status.json")))
            .ok()
            .and_then(|v| v["kill_kit"]["pids"].as_array().cloned())
            .is_some_and(|p| p.iter().any(|x| x == pid))
    };
    assert!(
        wait_until(Duration::from_secs(20), armed),
        "the kill kit never showed pid {pid}: {}",
        read(&state.join("status.json"))
    );
}

/// `rounds` stalls of `pod`, each by a new grower in `app` beside a small task: each
/// grower is killed (named in the audit) within 1 s of the stall and the stall
/// resolved; the small task and the agent live and no agent thread sleeps in the OOM
/// wait. With the agent's `state` directory (the agent shares the pod), each grower
/// waits after its first MiB until `status` shows it in the kill kit, and the kill
/// must go through the kit; without, through `/proc`. (A grower that fills the pod
/// before the agent has seen it at all is not armed: the kill refuses then, see
/// `action::kill::tests::inside_a_shared_cgroup_an_unknown_task_makes_the_kill_refuse`;
/// the kit refreshes at every sweep and each quarter of the limit, so only a task that
/// grows to the wall faster than the agent's loop runs is missed.) Returns the
/// stall-to-kill times in ms (from the agent's `oom` line to its kill line).
fn pod_rounds(
    s: &mut Scratch,
    (pod, app): (&Cg, &Cg),
    agent_pid: i32,
    audit: &std::path::Path,
    rounds: usize,
    state: Option<&std::path::Path>,
) -> Vec<i64> {
    let via = if state.is_some() { "armed" } else { "proc" };
    let barriers = tempfile::tempdir().unwrap();
    let lines = || audit_of(audit, &pod.rel);
    let small = s.hog(app, &["--touch", "8M", "--hold", "600s"]);
    assert!(
        small.report(Duration::from_secs(10)).is_some(),
        "the small task never ran"
    );
    let mut took = Vec::new();
    let mut parked = false;
    let mut last_kill = std::time::Instant::now();
    for round in 0..rounds {
        let go = barriers.path().join(format!("go-{round}"));
        let barrier = format!("{}:1M", go.display());
        let grower = s.hog(
            app,
            &["--touch", "200M", "--hold", "60s", "--barrier", &barrier],
        );
        if let Some(state) = state {
            wait_armed(state, grower.pid);
            // Stalls more than LIST_CACHE apart (as stalls are, outside a test): the
            // kit's `tasks` lists, read at the last wall, are the kernel's cached ones
            // for that long, and the kill would wait them out.
            let since = last_kill.elapsed();
            if since < Duration::from_millis(1400) {
                std::thread::sleep(Duration::from_millis(1400) - since);
            }
        }
        write(&go, "");
        let mut kill = None;
        let ok = wait_until(Duration::from_secs(15), || {
            parked |= any_thread_in_oom_wait(agent_pid);
            kill = lines().into_iter().find(|v| {
                v["event"] == "action" && v["action"] == "kill" && v["pid"] == grower.pid
            });
            kill.is_some()
        });
        assert!(
            ok,
            "round {round}: the grower {} was not killed (under_oom {}); threads: {}; audit:\n{:#?}",
            grower.pid,
            pod.under_oom(),
            threads(agent_pid),
            lines().iter().rev().take(8).collect::<Vec<_>>()
        );
        let kill = kill.unwrap();
        assert_eq!(kill["outcome"], "done", "round {round}: {kill}");
        assert_eq!(kill["via"], via, "round {round}: {kill}");
        assert_eq!(kill["comm"], "oomwake-hog", "round {round}: {kill}");
        assert_eq!(
            s.exit_signal(grower.pid),
            Some(libc::SIGKILL),
            "round {round}"
        );
        let oom = lines()
            .into_iter()
            .find(|v| v["event"] == "oom" && v["episode"] == kill["episode"])
            .expect("no oom line for the kill's episode");
        let ms = ts_ms(&kill) - ts_ms(&oom);
        // Through the kit on v1 the pod's `tasks` lists tell that no task is unknown,
        // so the kill does not wait out the kernel's cached `cgroup.procs` of the
        // refresh just before the wall (oomwake::armed::LIST_CACHE).
        assert!(
            ms <= 1000,
            "round {round}: the kill came {ms} ms after the stall"
        );
        took.push(ms);
        last_kill = std::time::Instant::now();
        assert!(s.alive(small.pid), "round {round}: the small task died");
        assert!(
            wait_until(Duration::from_secs(10), || lines().iter().any(|v| {
                v["event"] == "resolved" && v["episode"] == kill["episode"]
            })),
            "round {round}: the stall was not resolved after the kill"
        );
    }
    assert!(!parked, "an agent thread slept in the OOM wait");
    let state = proc_state(agent_pid);
    assert!(!state.is_empty() && state != "Z", "the agent died");
    took
}

/// The audit lines of `cgroup` so far.
fn audit_of(audit: &std::path::Path, cgroup: &str) -> Vec<serde_json::Value> {
    read(audit)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["cgroup"] == cgroup)
        .collect()
}

/// An audit line's time stamp in milliseconds since the epoch.
fn ts_ms(v: &serde_json::Value) -> i64 {
    let t = humantime::parse_rfc3339(v["ts"].as_str().expect("ts")).expect("rfc3339");
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Other cgroups' episodes keep the whole pool busy (3 workers at most, each with a
/// hook sleeping 3 s) when the cgroup the agent shares reaches its wall. Its stall does
/// not wait for them (before the fix it did, about 3 s: until a hook ended), nor for a
/// thread the pool might start (its stack is charged to the stuck cgroup): the reserved
/// worker resolves it by its raise at once. No agent thread sleeps in the OOM wait; the
/// other stalls are resolved too.
#[test]
fn agent_inside_starts_no_worker_in_its_stuck_cgroup_while_others_stall() {
    let name = "agent_inside_starts_no_worker_in_its_stuck_cgroup_while_others_stall";
    let Some(()) = require_v1(name) else { return };
    let mut s = Scratch::new("inside-pool");
    let pod = s.cgroup("pod", Some(128 * MIB), true);
    let xs: Vec<Cg> = (0..3)
        .map(|i| s.cgroup(&format!("x{i}"), Some(32 * MIB), true))
        .collect();
    // A hook that sleeps keeps the worker busy (the hook itself started before the
    // agent's cgroup hit its wall: it is the agent's child, charged there too).
    let busy = r#"
[[step]]
action = "exec"
command = ["/bin/sleep", "3"]
timeout = "10s"
settle = "10ms"

[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
"#;
    let mut files: Vec<(String, String)> =
        vec![("pod.toml".into(), policy("pod", &pod.rel, "", LOAN))];
    for (i, x) in xs.iter().enumerate() {
        files.push((
            format!("x{i}.toml"),
            policy(&format!("x{i}"), &x.rel, "", busy),
        ));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let (agent_pid, tmp, _out) = start_inside_with(
        &mut s,
        &pod,
        &pod,
        &refs,
        Some("workers = 1\nmax_workers = 3\n"),
    );
    let audit = tmp.path().join("audit.jsonl");
    let lines = || -> Vec<serde_json::Value> {
        read(&audit)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let has = |ev: &str, cg: &str| {
        lines()
            .iter()
            .any(|v| v["event"] == ev && v["cgroup"] == cg)
    };
    for x in &xs {
        assert!(wait_until(Duration::from_secs(10), || has("watch", &x.rel)));
    }
    let before = threads(agent_pid);
    let mut hogs = Vec::new();
    for x in &xs {
        hogs.push(s.hog(x, &["--touch", "40M", "--hold", "30s"]));
    }
    // Their episodes run (raised, settling 3 s) when the agent's cgroup hits its wall.
    assert!(
        wait_until(Duration::from_secs(10), || xs
            .iter()
            .all(|x| has("oom", &x.rel))),
        "not every other cgroup stalled; audit:\n{}",
        read(&audit)
    );
    let _pod_hog = s.hog(&pod, &["--touch", "160M", "--hold", "30s"]);
    let mut parked = false;
    let mut pod_resolved = None;
    let resolved = wait_until(Duration::from_secs(30), || {
        parked |= any_thread_in_oom_wait(agent_pid);
        pod_resolved = lines().into_iter().find(|v| {
            v["event"] == "resolved"
                && v["cgroup"] == pod.rel.as_str()
                && v["by_action"] == "raise_limit"
        });
        pod_resolved.is_some()
    });
    let agent_log = || read(&tmp.path().join("agent.log"));
    assert!(
        resolved,
        "the agent did not resolve its own cgroup's stall (limit {}, under_oom {}); threads: {}; audit:\n{}\nlog:\n{}",
        pod.limit(),
        pod.under_oom(),
        threads(agent_pid),
        read(&audit),
        agent_log()
    );
    // Not behind the busy pool: the hooks sleep 3 s.
    let stalled = pod_resolved.as_ref().unwrap()["stalled_ms"]
        .as_f64()
        .unwrap_or(f64::MAX);
    assert!(
        stalled < 1000.0,
        "the agent's own stall waited {stalled} ms; audit:\n{}",
        read(&audit)
    );
    for x in &xs {
        assert!(
            wait_until(Duration::from_secs(20), || {
                parked |= any_thread_in_oom_wait(agent_pid);
                has("resolved", &x.rel)
            }),
            "{} not resolved; audit:\n{}",
            x.rel,
            read(&audit)
        );
    }
    assert!(
        !parked,
        "an agent thread slept in mem_cgroup_oom_synchronize; threads: {}; log:\n{}",
        threads(agent_pid),
        agent_log()
    );
    for v in lines() {
        if ["oom", "resolved", "action"].contains(&v["event"].as_str().unwrap_or("")) {
            eprintln!(
                "{name}: {} {} {} {}",
                v["ts"], v["event"], v["cgroup"], v["action"]
            );
        }
    }
    let log = stops_on_sigterm(&mut s, agent_pid, &tmp);
    eprintln!(
        "{name}: the agent's own stall: {stalled} ms; threads before the stalls: {before}; growth refused: {}",
        log.lines()
            .filter(|l| l.contains("no new episode worker is started"))
            .count()
    );
}

/// Starts the agent inside `cg` (a shell joins the cgroup, then becomes the agent: every
/// page the agent ever faults in is charged to the cgroup it watches) with `policy_toml`
/// as its only policy, and waits until it watches `cg` and has warned that it shares a
/// managed cgroup. Its files are on tmpfs (no swap here): nothing of them can be
/// reclaimed at the wall, so a write needing a new page fails for sure, as for a state
/// directory in /run. (On a disk the kernel may reclaim a clean page of the agent's own
/// log to let one journal append through, and the outcome depended on timing.)
fn start_inside(
    s: &mut Scratch,
    cg: &Cg,
    policy_toml: &str,
) -> (i32, tempfile::TempDir, std::sync::mpsc::Receiver<String>) {
    start_inside_with(s, cg, cg, &[("p.toml", policy_toml)], None)
}

/// [`start_inside`] with the agent in `join`, watching `cg` (`join` or below it).
fn start_inside_at(
    s: &mut Scratch,
    join: &Cg,
    cg: &Cg,
    policy_toml: &str,
) -> (i32, tempfile::TempDir, std::sync::mpsc::Receiver<String>) {
    start_inside_with(s, join, cg, &[("p.toml", policy_toml)], None)
}

/// [`start_inside_at`] with several policy files and a config file.
fn start_inside_with(
    s: &mut Scratch,
    join: &Cg,
    cg: &Cg,
    policies: &[(&str, &str)],
    config: Option<&str>,
) -> (i32, tempfile::TempDir, std::sync::mpsc::Receiver<String>) {
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    for (name, text) in policies {
        std::fs::write(tmp.path().join("policies").join(name), text).unwrap();
    }
    if let Some(c) = config {
        std::fs::write(tmp.path().join("oomwake.toml"), c).unwrap();
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$1/cgroup.procs\" && exec \"$2\" run --config \"$3/oomwake.toml\" --cgroup-root \"$4\" --policies \"$3/policies\" --state-dir \"$3/state\" --audit-log \"$3/audit.jsonl\" 2>\"$3/agent.log\"")
        .arg("sh")
        .arg(&join.dir)
        .arg(oomwake_bin())
        .arg(tmp.path())
        .arg(MEMROOT)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let (agent_pid, out) = s.spawn(cmd);
    let audit = tmp.path().join("audit.jsonl");
    assert!(
        wait_until(Duration::from_secs(20), || read(&audit)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["event"] == "watch" && v["cgroup"] == cg.rel.as_str())),
        "agent never watched; log:\n{}",
        read(&tmp.path().join("agent.log"))
    );
    assert!(
        join.procs().contains(&agent_pid),
        "the agent is not in the cgroup"
    );
    assert!(
        wait_until(Duration::from_secs(5), || read(
            &tmp.path().join("agent.log")
        )
        .contains("the agent runs inside")),
        "no warning that the agent shares a managed cgroup"
    );
    (agent_pid, tmp, out)
}

/// Sends SIGTERM to the agent and asserts it is gone within 20 s; returns its log.
fn stops_on_sigterm(s: &mut Scratch, agent_pid: i32, tmp: &tempfile::TempDir) -> String {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let end = Instant::now() + Duration::from_secs(20);
    let mut gone = false;
    while Instant::now() < end && !gone {
        gone = !s.alive(agent_pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent_log = read(&tmp.path().join("agent.log"));
    assert!(
        gone,
        "the agent did not stop on SIGTERM; threads: {}; signals: {}; log:\n{agent_log}",
        threads(agent_pid),
        read(std::path::Path::new(&format!("/proc/{agent_pid}/status")))
            .lines()
            .filter(|l| l.starts_with("Sig") || l.starts_with("ShdPnd"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    agent_log
}

/// Each thread of `pid` with its wait channel, for failure messages.
fn threads(pid: i32) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .map(|t| {
                    format!(
                        "{}:{}",
                        read(&t.path().join("comm")).trim(),
                        read(&t.path().join("wchan"))
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The control files kept open for a watched cgroup are closed when it goes: no
/// descriptor leaks as cgroups come and go.
#[test]
fn prepared_control_files_are_closed_when_the_cgroup_goes() {
    let Some(()) = require_v1("prepared_control_files_are_closed_when_the_cgroup_goes") else {
        return;
    };
    let s = Scratch::new("prepared");
    let cg = s.cgroup("w", Some(64 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("prep", &cg.rel, "", LOAN))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let pid = agent.child.id();
    let open_in = |dir: &std::path::Path| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter(|t| t.parent() == Some(dir))
                    .map(|t| {
                        t.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned()
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let held = open_in(&cg.dir);
    assert!(
        held.iter().any(|f| f == "memory.limit_in_bytes"),
        "limit file not kept open: {held:?}"
    );
    std::fs::remove_dir(&cg.dir).unwrap();
    agent.expect("unwatch", &cg.rel, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || open_in(&cg.dir).is_empty()),
        "descriptors left open: {:?}",
        open_in(&cg.dir)
    );
}

/// The agent's minor page faults (field 10 of /proc/PID/stat, all its threads).
fn minor_faults(pid: u32) -> u64 {
    let stat = read(std::path::Path::new(&format!("/proc/{pid}/stat")));
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    rest.split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no minflt in {stat:?}"))
}

/// A rescue through an exec hook faults in no page of the agent: the hook is started
/// without copying the agent's memory, so no page of it is left write-protected. With
/// fork, the agent's next writes took 49 to 120 faults each rescue (measured), and
/// inside a stuck cgroup each could need a page it could not get: a thread parked in the
/// OOM wait, or a SIGSEGV when the kernel did the write. Measured with the fix: 0.
#[test]
fn a_rescue_through_an_exec_hook_faults_in_no_page_of_the_agent() {
    let Some(()) = require_v1("a_rescue_through_an_exec_hook_faults_in_no_page_of_the_agent")
    else {
        return;
    };
    let mut s = Scratch::new("nofault");
    let cg = s.cgroup("", Some(64 * MIB), true);
    let agent = Agent::start(
        &[(
            "p.toml",
            &policy("nofault", &cg.rel, "", &format!("{HOOK}{LOAN}")),
        )],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let pid = agent.child.id();
    // Start-up is over once a second goes by without a fault (the sweep, the metrics
    // and the audit writer have all run by then).
    let mut before = minor_faults(pid);
    let settled = wait_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_secs(1));
        let now = minor_faults(pid);
        std::mem::replace(&mut before, now) == now
    });
    assert!(settled, "the agent kept faulting while idle");
    let _hog = s.hog(&cg, &["--touch", "96M", "--hold", "30s"]);
    let resolved = agent.expect("resolved", &cg.rel, Duration::from_secs(20));
    assert_eq!(resolved["by_action"], "raise_limit", "{resolved}");
    let hook_ran = agent
        .events("action", &cg.rel)
        .into_iter()
        .find(|v| v["action"] == "exec")
        .expect("no exec action");
    assert_eq!(hook_ran["outcome"], "done", "{hook_ran}");
    assert_eq!(hook_ran["stdout"], "hook\n", "{hook_ran}");
    // The episode's last lines are written by now; let the writer finish.
    std::thread::sleep(Duration::from_millis(300));
    let faults = minor_faults(pid) - before;
    eprintln!("agent minor faults over a rescue through an exec hook: {faults}");
    assert!(
        faults <= 5,
        "the agent took {faults} page faults over the rescue (49-120 when hooks were forked)"
    );
}

/// An agent moved into the pod after it started (its PID written into
/// `POD/agent/cgroup.procs`) follows its own cgroup at the next sweep: the kill kit arms
/// the pod (status shows it) and a grower is killed through it. Before, the agent
/// judged its own cgroup once at start and went on treating the pod as not its own
/// (no kit; a v2 `kill_all` would have written `cgroup.kill` and killed the agent).
#[test]
fn an_agent_moved_into_the_pod_after_start_arms_its_kill_kit() {
    let Some(()) = require_v1("an_agent_moved_into_the_pod_after_start_arms_its_kill_kit") else {
        return;
    };
    let mut s = Scratch::new("movedin");
    let pod = s.cgroup("", Some(128 * MIB), true);
    let agent_cg = s.cgroup("agent", None, false);
    let app = s.cgroup("app", None, false);
    let agent = Agent::start(
        &[("p.toml", &policy("pod", &pod.rel, "", KILL_SETTLE))],
        &[],
    );
    agent.expect("watch", &pod.rel, Duration::from_secs(20));
    let pid = agent.child.id() as i32;
    let state = agent.tmp.path().join("state");
    let kit = || {
        serde_json::from_str::<serde_json::Value>(&read(&state.join("status.json")))
            .ok()
            .map(|v| v["kill_kit"]["cgroup"].clone())
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        kit(),
        Some(serde_json::Value::Null),
        "a kit before the move"
    );
    write(&agent_cg.dir.join("cgroup.procs"), &pid.to_string());
    assert!(
        wait_until(Duration::from_secs(10), || kit()
            == Some(serde_json::Value::String(pod.rel.clone()))),
        "no kill kit for the pod after the move: {}\nlog:\n{}",
        read(&state.join("status.json")),
        agent.log()
    );
    assert!(agent.log().contains("the agent's memory cgroup is now"));
    let audit = agent.tmp.path().join("audit.jsonl");
    pod_rounds(&mut s, (&pod, &app), pid, &audit, 1, Some(&state));
}
