//! oomwake against a real Docker engine (root, cgroup v1, cgroupfs driver; CI starts
//! dockerd and sets OOMWAKE_REQUIRE_DOCKER=1): containers run `-m 64m --oom-kill-disable`
//! from FROM scratch images (integration/common/docker.rs), park in a real memcg OOM
//! stall, and an agent with exact policies rescues the ones it is told about.
//!
//! Measured times go to target/tmp/docker-measure.log (CI prints it).

use std::time::{Duration, Instant};

use crate::common::docker::*;
use crate::common::*;

/// Lend 25% at a time, up to 100% extra, then kill: the Go service's policy.
const LEND_THEN_KILL: &str = r#"
[[step]]
action = "raise_limit"
by = "25%"
max_extra = "100%"
hold = "60s"

[[step]]
action = "kill"
"#;

/// The seed's Go service in miniature, in a FROM scratch image with `-m 64m
/// --oom-kill-disable`: 80 MiB of live heap (GOGC=50) do not fit, so it parks.
fn stuck_go_service(img: &Image, parent: &CgroupParent) -> (Container, Cg) {
    let c = run_container(
        img,
        Some(parent),
        "go",
        &["-m", "64m", "--oom-kill-disable", "-e", "GOGC=50"],
        &["-", "80"],
    );
    let cg = wait_stuck(&c, Duration::from_secs(30));
    (c, cg)
}

/// `stalled_ms` of a resolved line (which every resolved line has), printed for CI's log.
fn report_stall(test: &str, resolved: &serde_json::Value) -> f64 {
    let ms = resolved["stalled_ms"].as_f64();
    assert!(ms.is_some(), "no stalled_ms in {resolved}");
    let ms = ms.unwrap_or_default();
    measure(
        test,
        &format!(
            "stall to resolved {ms} ms, first action {} ms (audit stalled_ms, first_action_ms)",
            resolved["first_action_ms"]
        ),
    );
    ms
}

#[test]
fn go_service_container_stuck_at_its_limit_is_rescued_by_its_cgroup_path() {
    let name = "go_service_container_stuck_at_its_limit_is_rescued_by_its_cgroup_path";
    let Some(engine) = require_docker(name) else {
        return;
    };
    let parent = CgroupParent::new("go");
    let img = image(&engine, Workload::GoService);
    let (c, cg) = stuck_go_service(&img, &parent);
    // Stuck for real: no `done`, and it stays that way for 2 s without an agent. The
    // engine still answers about it (never needed on the OOM path, but a user's
    // `docker inspect` of a stuck container must work).
    std::thread::sleep(Duration::from_secs(2));
    assert!(cg.under_oom());
    assert!(!c.logs().contains("done"), "finished without help");
    assert_eq!(c.inspect("{{.State.Running}}"), "true");
    assert_eq!(cg.limit(), 64 * MIB);

    let agent = Agent::start(
        &[(
            "go.toml",
            &policy("go-service", &cg.rel, "", LEND_THEN_KILL),
        )],
        &[],
    );
    let done = c.wait_log(Duration::from_secs(30), |l| l == "done 80");
    assert!(
        done.is_some(),
        "the Go service did not finish; logs:\n{}\nagent:\n{}",
        c.logs(),
        agent.log()
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(r["by_action"], "raise_limit");
    report_stall(name, &r);
    assert!(c.running(), "lending headroom must not stop the container");
    assert_eq!(c.inspect("{{.State.OOMKilled}}"), "false");
    assert!(
        cg.limit() > 64 * MIB && cg.limit() <= 128 * MIB,
        "limit {}",
        cg.limit()
    );
}

#[test]
fn a_container_no_policy_names_is_left_alone() {
    let name = "a_container_no_policy_names_is_left_alone";
    let Some(engine) = require_docker(name) else {
        return;
    };
    let parent = CgroupParent::new("alone");
    let img = image(&engine, Workload::Toucher);
    // Both started before the agent, both stuck.
    let (named, named_cg) = stuck_by_exec(&img, Some(&parent), "named", &[]);
    let (other, other_cg) = stuck_by_exec(&img, Some(&parent), "other", &[]);

    let agent = Agent::start(
        &[("named.toml", &policy("named", &named_cg.rel, "", KILL))],
        &[],
    );
    let r = agent.expect("resolved", &named_cg.rel, Duration::from_secs(20));
    assert_eq!(r["by_action"], "kill");
    report_stall(name, &r);
    assert!(
        !named_cg.under_oom() && named.running(),
        "the named one goes on"
    );
    // Give the agent time to act wrongly on the other one, then check it did not.
    std::thread::sleep(Duration::from_secs(2));
    assert!(other_cg.under_oom(), "the other container is still stuck");
    assert!(other.running());
    assert_eq!(other_cg.limit(), 32 * MIB, "its limit was not touched");
    let about_other: Vec<_> = agent
        .audit()
        .into_iter()
        .filter(|v| v["cgroup"] == other_cg.rel.as_str())
        .collect();
    assert!(
        about_other.is_empty(),
        "no audit line about a container no policy names: {about_other:?}"
    );
}

#[test]
fn a_container_started_after_the_agent_is_watched_and_rescued() {
    let name = "a_container_started_after_the_agent_is_watched_and_rescued";
    let Some(engine) = require_docker(name) else {
        return;
    };
    let parent = CgroupParent::new("after");
    let img = image(&engine, Workload::Toucher);
    // The id is not known before `docker run`: the policy names the scratch parent's
    // children (only ours), with a lend large enough for the whole toucher.
    let glob = format!("{}/*", parent.rel);
    let agent = Agent::start(&[("after.toml", &policy("after", &glob, "", RAISE))], &[]);
    let started = Instant::now();
    let c = run_container(
        &img,
        Some(&parent),
        "after",
        &["-m", "32m", "--oom-kill-disable"],
        &["40"],
    );
    let cg = c.cg();
    let w = agent.expect("watch", &cg.rel, Duration::from_secs(20));
    measure(
        name,
        &format!(
            "docker run to watch {} ms (wall, incl. the CLI)",
            started.elapsed().as_millis()
        ),
    );
    assert_eq!(w["policy"], "after");
    let done = c.wait_log(Duration::from_secs(30), |l| l == "done 40");
    assert!(
        done.is_some(),
        "the toucher did not finish; logs:\n{}\nagent:\n{}",
        c.logs(),
        agent.log()
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(r["by_action"], "raise_limit");
    report_stall(name, &r);
    assert!(c.running());
}

/// The README's `docker run` line of the Docker quick start (the block after its
/// `docker-quick-start` marker), split into words (it has no quotes).
pub(crate) fn readme_run_line() -> Vec<String> {
    let readme = read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let marker = "<!-- docker-quick-start:";
    let at = readme
        .find(marker)
        .expect("the quick start marker in README.md");
    let block = readme[at..]
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a ```sh block after the marker");
    block
        .replace("\\\n", " ")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Replaces the word `from` by `to` in `words`, exactly once (so that a changed README
/// line fails here instead of being run half substituted).
pub(crate) fn substitute(words: &mut [String], from: &str, to: &str) {
    let hits: Vec<usize> = (0..words.len()).filter(|&i| words[i] == from).collect();
    assert_eq!(
        hits.len(),
        1,
        "{from:?} once in the README's run line {words:?}"
    );
    words[hits[0]] = to.to_string();
}

/// CapEff of a process as a bit set.
pub(crate) fn effective_caps(pid: i32) -> u64 {
    let status = read(std::path::Path::new(&format!("/proc/{pid}/status")));
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}

pub(crate) const CAP_KILL: u64 = 1 << 5;
pub(crate) const CAP_IPC_LOCK: u64 = 1 << 14;

/// The sidecar started by the README's line, with this run's policies and state; the
/// words of the line other than the four substituted ones are run as written.
/// `without` names a capability to leave out of the line (its `--cap-add CAP` pair).
fn start_readme_sidecar(
    engine: &Engine,
    image: &SidecarImage,
    dir: &std::path::Path,
    without: Option<&str>,
) -> Container {
    let mut words = readme_run_line();
    assert_eq!(words[0], "docker");
    let name = format!(
        "oomwake-it-{}-sidecar-{}",
        std::process::id(),
        without.unwrap_or("all").to_lowercase()
    );
    substitute(&mut words, "oomwake", &name);
    if let Some(cap) = without {
        let at = words
            .windows(2)
            .position(|w| w[0] == "--cap-add" && w[1] == cap)
            .unwrap_or_else(|| panic!("--cap-add {cap} in the README's run line {words:?}"));
        words.drain(at..at + 2);
    }
    substitute(
        &mut words,
        "/etc/oomwake/policies:/etc/oomwake/policies:ro",
        &format!("{}/policies:/etc/oomwake/policies:ro", dir.display()),
    );
    substitute(
        &mut words,
        "/var/lib/oomwake:/var/lib/oomwake",
        &format!("{}/state:/var/lib/oomwake", dir.display()),
    );
    substitute(&mut words, "oomwake:latest", &image.tag);
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    let res = engine.try_run(&args, Duration::from_secs(60));
    let id = match res {
        Ok(id) => id,
        Err(e) => {
            let _ = engine.try_run(&["rm", "-f", &name], Duration::from_secs(30));
            panic!("the README's run line failed: {e}");
        }
    };
    Container::adopt(engine, id, name)
}

#[test]
fn readme_quick_start_sidecar_rescues_a_stuck_container_with_two_capabilities() {
    let name = "readme_quick_start_sidecar_rescues_a_stuck_container_with_two_capabilities";
    let Some(engine) = require_docker(name) else {
        return;
    };
    let sidecar_img = sidecar_image(&engine);
    let parent = CgroupParent::new("sidecar");
    let img = image(&engine, Workload::Toucher);
    // Another user's process: signalling it needs CAP_KILL.
    let (victim, cg) = stuck_by_exec(&img, Some(&parent), "victim", &["--user", "65534"]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("policies/victim.toml"),
        policy("victim", &cg.rel, "", KILL),
    )
    .unwrap();
    let sidecar = start_readme_sidecar(&engine, &sidecar_img, dir.path(), None);
    let resolved = sidecar.wait_log(Duration::from_secs(60), |l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["event"] == "resolved" && v["cgroup"] == cg.rel.as_str())
    });
    let logs = sidecar.logs();
    let Some(resolved) = resolved else {
        panic!("no resolved line in the sidecar's logs:\n{logs}");
    };
    let r: serde_json::Value = serde_json::from_str(&resolved).unwrap();
    assert_eq!(r["by_action"], "kill", "{logs}");
    report_stall(name, &r);
    assert!(
        !cg.under_oom() && victim.running(),
        "the victim container goes on without its largest process"
    );
    // Exactly the two capabilities the README names, and both in use: memory locked,
    // no failed action.
    assert_eq!(
        effective_caps(sidecar.pid()),
        CAP_KILL | CAP_IPC_LOCK,
        "the sidecar's effective capabilities"
    );
    assert!(logs.contains("memory locked"), "mlockall worked:\n{logs}");
    assert!(!logs.contains("\"outcome\":\"failed\""), "{logs}");
    assert!(sidecar.running(), "the sidecar goes on after the rescue");
}

/// A directory with `policies/victim.toml` (a kill step for exactly `cgroup`) and `state/`.
fn sidecar_dir(cgroup: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("policies/victim.toml"),
        policy("victim", cgroup, "", KILL),
    )
    .unwrap();
    dir
}

/// The sidecar's first audit line of `event` about `cgroup` within 60 s.
fn sidecar_event(sidecar: &Container, event: &str, cgroup: &str) -> serde_json::Value {
    let line = sidecar.wait_log(Duration::from_secs(60), |l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["event"] == event && v["cgroup"] == cgroup)
    });
    let Some(line) = line else {
        panic!("no {event} line in the sidecar's logs:\n{}", sidecar.logs());
    };
    serde_json::from_str(&line).unwrap()
}

#[test]
fn each_capability_of_the_readme_line_is_needed() {
    let name = "each_capability_of_the_readme_line_is_needed";
    let Some(engine) = require_docker(name) else {
        return;
    };
    let sidecar_img = sidecar_image(&engine);
    let parent = CgroupParent::new("caps");
    let img = image(&engine, Workload::Toucher);
    let (victim, cg) = stuck_by_exec(&img, Some(&parent), "victim", &["--user", "65534"]);
    let dir = sidecar_dir(&cg.rel);

    // Without KILL: another user's process cannot be signalled; the stall goes on.
    {
        let sidecar = start_readme_sidecar(&engine, &sidecar_img, dir.path(), Some("KILL"));
        let a = sidecar_event(&sidecar, "action", &cg.rel);
        assert_eq!(a["outcome"], "failed", "{a}");
        assert!(
            a["error"]
                .as_str()
                .unwrap_or("")
                .contains("Operation not permitted"),
            "{a}"
        );
        assert_eq!(effective_caps(sidecar.pid()), CAP_IPC_LOCK);
        assert!(cg.under_oom() && victim.running(), "still stuck");
    }
    // Without IPC_LOCK: the rescue works, but the agent's memory is not locked.
    let sidecar = start_readme_sidecar(&engine, &sidecar_img, dir.path(), Some("IPC_LOCK"));
    let r = sidecar_event(&sidecar, "resolved", &cg.rel);
    assert_eq!(r["by_action"], "kill", "{r}");
    let logs = sidecar.logs();
    assert!(logs.contains("mlockall failed"), "{logs}");
    assert!(!logs.contains("memory locked"), "{logs}");
    assert_eq!(effective_caps(sidecar.pid()), CAP_KILL);
}
