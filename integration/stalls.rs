//! One real stall per action: the hog hangs without the agent, and each action resolves
//! it the way its policy says (root, cgroup v1).

use std::time::Duration;

use crate::common::*;

#[test]
fn hog_hangs_without_agent() {
    let Some(()) = require_v1("hog_hangs_without_agent") else {
        return;
    };
    let mut s = Scratch::new("noagent");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let hog = s.hog(&cg, &["--touch", "48M"]);
    cg.wait_stuck(hog.pid);
    assert_eq!(proc_state(hog.pid), "D");
    // Nothing in the kernel wakes it: still no report after two seconds.
    assert!(hog.report(Duration::from_secs(2)).is_none());
    assert!(cg.under_oom());
    assert_eq!(wchan(hog.pid), "mem_cgroup_oom_synchronize");
    assert_eq!(cg.limit(), 32 * MIB);
}

#[test]
fn raise_limit_unsticks_and_the_limit_is_restored() {
    let Some(()) = require_v1("raise_limit_unsticks_and_the_limit_is_restored") else {
        return;
    };
    let mut s = Scratch::new("raise");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("raise", &cg.rel, "", RAISE))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(
        &cg,
        &["--touch", "40M", "--hold", "300ms", "--free-after", "30s"],
    );
    let report = hog
        .report(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("hog never finished; log:\n{}", agent.log()));
    assert_eq!(report["touched_bytes"], 40 * MIB);
    let resolved = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(resolved["by_action"], "raise_limit");
    let act = &agent.events("action", &cg.rel)[0];
    assert_eq!(act["outcome"], "done");
    assert_eq!(act["old_limit"], 32 * MIB);
    assert_eq!(act["new_limit"], 48 * MIB);
    // The hog frees its memory: the loan goes back, to the original limit.
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(10));
    assert_eq!(restore["reason"], "usage_below");
    assert_eq!(restore["new_limit"], 32 * MIB);
    assert_eq!(cg.limit(), 32 * MIB);
    assert!(s.alive(hog.pid), "raise_limit must not kill anybody");
}

#[test]
fn agent_started_while_already_stuck_resolves() {
    let Some(()) = require_v1("agent_started_while_already_stuck_resolves") else {
        return;
    };
    let mut s = Scratch::new("prestuck");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "30s"]);
    cg.wait_stuck(hog.pid);
    let agent = Agent::start(&[("p.toml", &policy("raise", &cg.rel, "", RAISE))], &[]);
    assert!(
        hog.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert!(!cg.under_oom());
}

#[test]
fn reclaim_runs_first_and_the_episode_goes_on_to_raise() {
    let Some(()) = require_v1("reclaim_runs_first_and_the_episode_goes_on_to_raise") else {
        return;
    };
    let mut s = Scratch::new("reclaim");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let steps = format!("[[step]]\naction = \"reclaim\"\nsettle = \"200ms\"\n{RAISE}");
    let agent = Agent::start(&[("p.toml", &policy("reclaim", &cg.rel, "", &steps))], &[]);
    let (_hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "30s"]);
    let acts = agent.events("action", &cg.rel);
    assert_eq!(acts[0]["action"], "reclaim");
    assert_eq!(acts[0]["outcome"], "done");
    assert!(acts[0]["freed_bytes"].is_u64(), "{}", acts[0]);
    assert!(acts
        .iter()
        .any(|a| a["action"] == "raise_limit" && a["outcome"] == "done"));
}

#[test]
fn reclaim_frees_page_cache_of_a_live_cgroup() {
    let Some(()) = require_v1("reclaim_frees_page_cache_of_a_live_cgroup") else {
        return;
    };
    use oomwake::cgroup::{CgroupPath, Controller, Hierarchy};
    let mut s = Scratch::new("cache");
    let cg = s.cgroup("", Some(64 * MIB), false);
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cache-{}", std::process::id()));
    let spec = format!("{}:24M", file.display());
    let hog = s.hog(
        &cg,
        &["--write-file", &spec, "--touch", "1M", "--hold", "30s"],
    );
    assert!(hog.report(Duration::from_secs(15)).is_some());
    let h =
        Hierarchy::detect(std::path::Path::new(MEMROOT), std::path::Path::new("/proc")).unwrap();
    let ctl = oomwake::cgroup::v1::V1::new(h);
    let r = ctl
        .reclaim(&CgroupPath::new(&cg.rel), Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let (before, after) = (r.before, r.after);
    let _ = std::fs::remove_file(&file);
    assert!(before >= 20 * MIB, "page cache not charged: usage {before}");
    assert!(
        before - after >= 16 * MIB,
        "reclaim freed only {} bytes",
        before - after
    );
    assert!(s.alive(hog.pid), "reclaim keeps the tasks");
}

/// keep-me holds the most memory but is avoided; victim-one is stuck mid-way; other
/// arrives while the cgroup is full and is stuck too. Set up before the agent starts,
/// so that all three are in place when it acts.
fn three_hogs(s: &mut Scratch, cg: &Cg) -> (Hog, Hog, Hog) {
    let keep = s.hog(cg, &["--touch", "28M", "--hold", "60s", "--tag", "keep-me"]);
    assert!(keep.report(Duration::from_secs(10)).is_some());
    let victim = s.hog(
        cg,
        &["--touch", "40M", "--hold", "60s", "--tag", "victim-one"],
    );
    cg.wait_stuck(victim.pid);
    let other = s.hog(cg, &["--touch", "8M", "--hold", "60s", "--tag", "other"]);
    cg.wait_stuck(other.pid);
    (keep, victim, other)
}

#[test]
fn signal_picks_the_victim_and_spares_the_avoided() {
    let Some(()) = require_v1("signal_picks_the_victim_and_spares_the_avoided") else {
        return;
    };
    let mut s = Scratch::new("signal");
    let cg = s.cgroup("", Some(48 * MIB), true);
    let steps = r#"
[[step]]
action = "signal"
signal = "SIGTERM"
victim = "largest_rss"
avoid = ["keep-me"]
grace = "5s"
"#;
    let (keep, victim, other) = three_hogs(&mut s, &cg);
    let agent = Agent::start(&[("p.toml", &policy("sig", &cg.rel, "", steps))], &[]);
    assert!(
        other.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    let act = &agent.events("action", &cg.rel)[0];
    assert_eq!(act["action"], "signal");
    assert_eq!(act["outcome"], "done");
    assert_eq!(act["pid"], victim.pid);
    assert_eq!(act["signal"], "SIGTERM");
    assert_eq!(act["comm"], "oomwake-hog");
    assert!(act["rss_bytes"].as_u64().unwrap() > 8 * MIB, "{act}");
    assert_eq!(s.exit_signal(victim.pid), Some(libc::SIGTERM));
    assert!(s.alive(keep.pid), "the avoided process must survive");
    assert!(s.alive(other.pid), "the others resume");
}

#[test]
fn kill_uses_pidfd_and_frees_the_victim() {
    let Some(()) = require_v1("kill_uses_pidfd_and_frees_the_victim") else {
        return;
    };
    let mut s = Scratch::new("kill");
    let cg = s.cgroup("", Some(48 * MIB), true);
    let steps = "[[step]]\naction = \"kill\"\nvictim = \"largest_rss\"\nprefer = [\"victim-\"]\n";
    let (keep, victim, other) = three_hogs(&mut s, &cg);
    let agent = Agent::start(&[("p.toml", &policy("kill", &cg.rel, "", steps))], &[]);
    assert!(
        other.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    let resolved = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(resolved["by_action"], "kill");
    let act = &agent.events("action", &cg.rel)[0];
    assert_eq!(act["pid"], victim.pid);
    assert_eq!(act["signal"], "SIGKILL");
    // Written when the signal was sent; whether the victim exited comes after.
    assert_eq!(act["pending"], true);
    assert!(act["mreleased"].is_boolean());
    let res = agent.expect("action_result", &cg.rel, Duration::from_secs(1));
    // The wait ends at exit or at recovery, whichever is seen first (mrelease frees
    // the memory before the victim is reaped).
    assert!(res["exited"].is_boolean(), "{res}");
    assert!(res["waited_ms"].is_u64(), "{res}");
    assert_eq!(res["episode"], act["episode"]);
    assert_eq!(s.exit_signal(victim.pid), Some(libc::SIGKILL));
    assert!(s.alive(keep.pid));
    assert!(s.alive(other.pid));
}

#[test]
fn kill_all_empties_the_cgroup() {
    let Some(()) = require_v1("kill_all_empties_the_cgroup") else {
        return;
    };
    let mut s = Scratch::new("killall");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(
        &[(
            "p.toml",
            &policy("ka", &cg.rel, "", "[[step]]\naction = \"kill_all\"\n"),
        )],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let a = s.hog(&cg, &["--touch", "24M", "--hold", "60s"]);
    assert!(a.report(Duration::from_secs(10)).is_some());
    let b = s.hog(&cg, &["--touch", "24M", "--hold", "60s"]);
    let resolved = agent.expect("resolved", &cg.rel, Duration::from_secs(15));
    assert_eq!(resolved["by_action"], "kill_all");
    let act = &agent.events("action", &cg.rel)[0];
    let mut pids: Vec<i64> = act["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect();
    pids.sort();
    let mut want = vec![a.pid as i64, b.pid as i64];
    want.sort();
    assert_eq!(pids, want);
    assert_eq!(s.exit_signal(a.pid), Some(libc::SIGKILL));
    assert_eq!(s.exit_signal(b.pid), Some(libc::SIGKILL));
    assert!(wait_until(Duration::from_secs(5), || cg.procs().is_empty()));
}

#[test]
fn exec_hook_runs_with_the_episode_in_its_environment() {
    let Some(()) = require_v1("exec_hook_runs_with_the_episode_in_its_environment") else {
        return;
    };
    let mut s = Scratch::new("exec");
    let cg = s.cgroup("", Some(32 * MIB), true);
    // The hook itself makes room: what an operator's script might do.
    let out = tempfile::tempdir().unwrap();
    let seen = out.path().join("seen");
    let steps = format!(
        r#"
[[step]]
action = "exec"
command = ["/bin/sh", "-c", "echo \"$OOMWAKE_POLICY $OOMWAKE_CGROUP $OOMWAKE_EPISODE\" > {}; echo 67108864 > \"$OOMWAKE_CGROUP_DIR/memory.limit_in_bytes\""]
timeout = "5s"
"#,
        seen.display()
    );
    let agent = Agent::start(&[("p.toml", &policy("hook", &cg.rel, "", &steps))], &[]);
    let (_hog, resolved) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "30s"]);
    assert_eq!(resolved["by_action"], "exec");
    let act = &agent.events("action", &cg.rel)[0];
    assert_eq!(act["exit_code"], 0);
    assert_eq!(act["command"][0], "/bin/sh");
    assert_eq!(cg.limit(), 64 * MIB);
    let env_seen = read(&seen);
    assert_eq!(
        env_seen.trim(),
        format!("hook {} {}", cg.rel, act["episode"])
    );
}
