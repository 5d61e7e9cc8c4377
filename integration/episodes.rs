//! Episode-level behaviour on real stalls: audit and dry-run change nothing and log
//! once, a cgroup removed mid-episode, two stalls at once, a pod-shaped tree, reload.

use std::time::Duration;

use crate::common::*;

const RAISE_THEN_KILL: &str = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"

[[step]]
action = "kill"
victim = "largest_rss"
"#;

fn audit_run(test: &str, head: &str, extra: &[&str]) {
    let mut s = Scratch::new(test);
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(
        &[("p.toml", &policy("audited", &cg.rel, head, RAISE_THEN_KILL))],
        extra,
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "60s"]);
    cg.wait_stuck(hog.pid);
    let un = agent.expect("unresolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(un["reason"], "audit mode");
    let acts = agent.events("action", &cg.rel);
    assert_eq!(acts.len(), 2, "{acts:?}");
    assert!(acts
        .iter()
        .all(|a| a["outcome"] == "would" && a["mode"] == "audit"));
    assert_eq!(acts[0]["old_limit"], 32 * MIB);
    assert_eq!(acts[0]["new_limit"], 48 * MIB);
    assert_eq!(acts[1]["pid"], hog.pid);
    // Nothing was changed or signalled, and the still-stuck cgroup is not logged again
    // on every sweep.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(cg.limit(), 32 * MIB);
    assert!(s.alive(hog.pid));
    assert_eq!(wchan(hog.pid), "mem_cgroup_oom_synchronize");
    assert_eq!(agent.events("oom", &cg.rel).len(), 1);
    assert_eq!(agent.events("action", &cg.rel).len(), 2);
    assert!(
        !std::path::Path::new(&agent.tmp.path().join("state/loans.json")).exists()
            || read(&agent.tmp.path().join("state/loans.json")).contains("\"loans\": []")
    );
}

#[test]
fn audit_mode_decides_everything_and_changes_nothing() {
    let Some(()) = require_v1("audit_mode_decides_everything_and_changes_nothing") else {
        return;
    };
    audit_run("audit", "mode = \"audit\"", &[]);
}

#[test]
fn dry_run_turns_enforce_into_audit() {
    let Some(()) = require_v1("dry_run_turns_enforce_into_audit") else {
        return;
    };
    audit_run("dryrun", "mode = \"enforce\"", &["--dry-run"]);
}

#[test]
fn cgroup_removed_mid_episode_is_unresolved_not_a_crash() {
    let Some(()) = require_v1("cgroup_removed_mid_episode_is_unresolved_not_a_crash") else {
        return;
    };
    let mut s = Scratch::new("rmdir");
    let cg = s.cgroup("gone", Some(32 * MIB), true);
    let steps = r#"
[[step]]
action = "exec"
command = ["/bin/sleep", "2"]
timeout = "10s"
settle = "100ms"

[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
"#;
    let mut agent = Agent::start(&[("p.toml", &policy("rm", &cg.rel, "", steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "40M"]);
    agent.expect("oom", &cg.rel, Duration::from_secs(10));
    // Mid-episode: once the first step (the hook) runs. Killed before that, the hog's
    // stall is over when a slow worker (the VM, under emulation) takes the job, and the
    // episode ends `resolved` before any step, rightly, but then nothing was removed
    // mid-episode.
    let agent_pid = agent.child.id().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || hook_running(
            &agent_pid, "sleep"
        )),
        "the hook never started; audit:\n{:#?}",
        agent.audit()
    );
    s.kill_hog(hog.pid);
    assert!(wait_until(Duration::from_secs(5), || std::fs::remove_dir(
        &cg.dir
    )
    .is_ok()));
    let un = agent.expect("unresolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(un["reason"], "cgroup gone");
    let unwatch = agent.expect("unwatch", &cg.rel, Duration::from_secs(5));
    assert_eq!(unwatch["reason"], "removed");
    assert!(agent.running(), "agent died; log:\n{}", agent.log());
    // And it still works: a new stall elsewhere is resolved.
    let cg2 = s.cgroup("next", Some(32 * MIB), true);
    let p2 = policy("next", &cg2.rel, "", RAISE_THEN_KILL);
    std::fs::write(agent.tmp.path().join("policies/q.toml"), p2).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.expect("watch", &cg2.rel, Duration::from_secs(10));
    let hog2 = s.hog(&cg2, &["--touch", "40M", "--hold", "30s"]);
    assert!(
        hog2.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
}

/// A container engine removes a container's cgroup as soon as its last task is gone. A
/// kill that empties the cgroup ends the stall: the episode is `resolved` by that step,
/// with `cgroup_gone`, not `unresolved` (seen with Docker, whose kill of a container's
/// only process was reported as a stall left behind). The agent pauses after the step
/// (test-only fault point) so the removal always comes before its check.
#[test]
fn a_kill_that_empties_a_cgroup_its_engine_then_removes_is_resolved() {
    let Some(()) = require_v1("a_kill_that_empties_a_cgroup_its_engine_then_removes_is_resolved")
    else {
        return;
    };
    let mut s = Scratch::new("killgone");
    let cg = s.cgroup("c", Some(32 * MIB), true);
    let steps = r#"
[[step]]
action = "kill"
victim = "largest_rss"
"#;
    let agent = Agent::start_in_env(
        Agent::dir(&[("p.toml", &policy("gone", &cg.rel, "", steps))]),
        &[],
        &[("OOMWAKE_FAULT", "after_step:pause-1500")],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "60s"]);
    agent.expect("oom", &cg.rel, Duration::from_secs(10));
    // The engine's part: remove the cgroup once it is empty.
    assert!(
        wait_until(Duration::from_secs(10), || !s.alive(hog.pid)
            && std::fs::remove_dir(&cg.dir).is_ok()),
        "the cgroup did not empty; log:\n{}",
        agent.log()
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(r["by_action"], "kill", "{r}");
    assert_eq!(r["by_step"], 0, "{r}");
    assert_eq!(r["cgroup_gone"], true, "{r}");
    assert!(
        agent.events("unresolved", &cg.rel).is_empty(),
        "{:#?}",
        agent.audit()
    );
}

#[test]
fn two_cgroups_stuck_at_once_are_both_resolved() {
    let Some(()) = require_v1("two_cgroups_stuck_at_once_are_both_resolved") else {
        return;
    };
    let mut s = Scratch::new("two");
    let a = s.cgroup("a", Some(32 * MIB), true);
    let b = s.cgroup("b", Some(32 * MIB), true);
    let ha = s.hog(&a, &["--touch", "40M", "--hold", "30s"]);
    let hb = s.hog(&b, &["--touch", "40M", "--hold", "30s"]);
    a.wait_stuck(ha.pid);
    b.wait_stuck(hb.pid);
    let glob = format!("{}/*", s.rel);
    let agent = Agent::start(
        &[("p.toml", &policy("two", &glob, "", RAISE_THEN_KILL))],
        &[],
    );
    assert!(
        ha.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    assert!(
        hb.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    agent.expect("resolved", &a.rel, Duration::from_secs(5));
    agent.expect("resolved", &b.rel, Duration::from_secs(5));
    assert!(s.alive(ha.pid) && s.alive(hb.pid));
}

#[test]
fn pod_shaped_tree_is_one_episode_at_the_parent() {
    let Some(()) = require_v1("pod_shaped_tree_is_one_episode_at_the_parent") else {
        return;
    };
    let mut s = Scratch::new("pod");
    let pod = s.cgroup("", Some(48 * MIB), true);
    // Containers: no limit of their own; one of them has oom_kill_disable too, so the
    // kernel fires its eventfd as well as the pod's.
    let c1 = s.cgroup("c1", None, false);
    let c2 = s.cgroup("c2", None, true);
    let glob_children = format!("{}/*", s.rel);
    let text = format!(
        "name = \"pod\"\n[match]\ncgroup = [\"{}\", \"{glob_children}\"]\n\n[[step]]\naction = \"kill\"\nvictim = \"largest_rss\"\n",
        pod.rel
    );
    let agent = Agent::start(&[("p.toml", &text)], &[]);
    agent.expect("watch", &pod.rel, Duration::from_secs(10));
    agent.expect("watch", &c2.rel, Duration::from_secs(10));
    let big = s.hog(&c1, &["--touch", "30M", "--hold", "60s", "--tag", "big"]);
    assert!(big.report(Duration::from_secs(10)).is_some());
    let small = s.hog(&c2, &["--touch", "30M", "--hold", "60s", "--tag", "small"]);
    assert!(
        small.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    agent.expect("resolved", &pod.rel, Duration::from_secs(5));
    let ooms: Vec<_> = agent
        .audit()
        .into_iter()
        .filter(|v| v["event"] == "oom")
        .collect();
    assert_eq!(ooms.len(), 1, "{ooms:?}");
    assert_eq!(ooms[0]["cgroup"], pod.rel.as_str());
    let act = &agent.events("action", &pod.rel)[0];
    assert_eq!(act["pid"], big.pid, "victim chosen across the subtree");
    assert_eq!(act["victim_cgroup"], c1.rel.as_str());
    assert_eq!(s.exit_signal(big.pid), Some(libc::SIGKILL));
    assert!(s.alive(small.pid));
}

#[test]
fn invalid_reload_keeps_the_old_policies() {
    let Some(()) = require_v1("invalid_reload_keeps_the_old_policies") else {
        return;
    };
    let mut s = Scratch::new("reload");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(
        &[("p.toml", &policy("first", &cg.rel, "", RAISE_THEN_KILL))],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let pdir = agent.tmp.path().join("policies");
    std::fs::write(
        pdir.join("broken.toml"),
        "[match]\ncgroup = [\"/x\"]\n[[step]]\naction = \"boom\"\n",
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .log()
            .contains("reload refused")),
        "log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("broken.toml:4:10: "),
        "log:\n{}",
        agent.log()
    );
    // The old policy still acts.
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "30s"]);
    assert!(
        hog.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(r["policy"], "first");
    // A valid change is taken: the cgroup moves to the new policy.
    std::fs::remove_file(pdir.join("broken.toml")).unwrap();
    std::fs::write(
        pdir.join("p.toml"),
        policy("second", &cg.rel, "mode = \"audit\"", RAISE_THEN_KILL),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let w = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["event"] == "watch" && v["policy"] == "second"
        })
        .unwrap_or_else(|| panic!("no re-watch; log:\n{}", agent.log()));
    assert_eq!(w["cgroup"], cg.rel.as_str());
    let u = agent.expect("unwatch", &cg.rel, Duration::from_secs(1));
    assert_eq!(u["reason"], "reload");
}

/// True when a child of `parent` (a pid) named `comm` runs (an exec hook of the agent).
fn hook_running(parent: &str, comm: &str) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        field("PPid:") == parent && field("Name:") == comm
    })
}
