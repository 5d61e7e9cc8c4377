//! Matching by container metadata against a real Docker engine, beyond `docker_meta.rs`
//! (one `container_name` policy, the audit fields, `status` and `explain`): `label` and
//! `image` policies rescue stuck containers (priority decides between them, a container
//! neither names stays stuck); containers started before and after the agent are both
//! rescued by name; a `docker rename` while the agent runs moves the container to the
//! policy of its new name for the next stall; a private dockerd stopped and started
//! again while the agent runs (never the shared engine): a known container's stall
//! during the outage is rescued under its cached name, the agent logs the outage once,
//! and a container created after the restart is named; a `docker-compose up` project is
//! rescued by a policy on its compose labels.
//!
//! Every container runs `-m 32m --oom-kill-disable --network none` below a scratch
//! cgroup parent of ours, from the FROM scratch toucher image (common/docker.rs), and is
//! stuck by a second toucher of 48 MiB (`docker exec`, or a host process joining its
//! cgroup while the engine is down); the kill of the largest process ends the stall and
//! the container goes on. Containers, images, the compose project and the private
//! dockerd are removed by Drop guards, even when a test fails. Skipped without an
//! engine, unless OOMWAKE_REQUIRE_DOCKER=1. Measured times go to
//! target/tmp/docker-measure.log.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::common::docker::*;
use crate::common::*;

/// Bound of every wait for the agent (the machine is small and shared).
const WAIT: Duration = Duration::from_secs(30);

/// A policy: top-level `head`, the `[match]` keys, one kill step.
fn policy_text(name: &str, head: &str, matcher: &str) -> String {
    format!("name = \"{name}\"\n{head}\n[match]\n{matcher}\n{KILL}")
}

/// Milliseconds from `earlier` to the audit timestamp `ts`.
fn ms_since(earlier: SystemTime, ts: &Value) -> Option<i64> {
    let t = humantime::parse_rfc3339(ts.as_str()?).ok()?;
    Some(match t.duration_since(earlier) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    })
}

/// Docker's own clock of the container's creation and start against the watch line:
/// how long after the engine made it the agent knew its name.
fn engine_times(c: &Container, watch: &Value) -> String {
    let at = |f: &str| {
        let t = c.inspect(f);
        humantime::parse_rfc3339_weak(t.get(..23).unwrap_or(&t)).ok()
    };
    let since = |t: Option<SystemTime>| t.and_then(|t| ms_since(t, &watch["ts"]));
    format!(
        "created to watched {:?} ms, started to watched {:?} ms (Docker's Created, State.StartedAt)",
        since(at("{{.Created}}")),
        since(at("{{.State.StartedAt}}"))
    )
}

/// Waits for the agent's `event` line about `cg` under `policy`.
fn expect_under(agent: &Agent, event: &str, cg: &str, policy: &str) -> Value {
    agent
        .wait_for(WAIT, |v| {
            v["event"] == event && v["cgroup"] == cg && v["policy"] == policy
        })
        .unwrap_or_else(|| {
            panic!(
                "no {event} line for {cg} under policy {policy} within {WAIT:?}\naudit:\n{}\nlog:\n{}",
                read(&agent.tmp.path().join("audit.jsonl")),
                agent.log()
            )
        })
}

/// The episode's lines (oom, action, resolved) about `cg` under episode `id`.
fn episode_lines(agent: &Agent, cg: &str, id: &Value) -> Vec<Value> {
    agent
        .audit()
        .into_iter()
        .filter(|v| v["cgroup"] == cg && v["episode"] == *id)
        .collect()
}

/// Every line in `lines` names the container `name`; there is an oom, an action and a
/// resolved line among them.
fn assert_all_named(lines: &[Value], name: &str) {
    for event in ["oom", "action", "resolved"] {
        assert!(
            lines.iter().any(|v| v["event"] == event),
            "no {event} line in {lines:#?}"
        );
    }
    for v in lines {
        assert_eq!(v["container_name"], name, "{v}");
    }
}

/// A kill-resolved stall: stall_ms printed for CI's log.
fn report(test: &str, what: &str, resolved: &Value) {
    assert_eq!(resolved["by_action"], "kill", "{resolved}");
    measure(
        test,
        &format!(
            "{what}: stall to resolved {} ms (audit stalled_ms)",
            resolved["stalled_ms"]
        ),
    );
}

/// A toucher container (`-m 32m --oom-kill-disable`, `args` added) that has touched
/// 1 MiB and sleeps: [`stall`] makes it stuck.
fn idle_container(img: &Image, parent: &CgroupParent, what: &str, args: &[&str]) -> Container {
    let mut all = vec!["-m", "32m", "--oom-kill-disable"];
    all.extend_from_slice(args);
    let c = run_container(img, Some(parent), what, &all, &["1"]);
    assert!(
        c.wait_log(WAIT, |l| l == "done 1").is_some(),
        "{}",
        c.logs()
    );
    c
}

/// A second toucher of 48 MiB in `c` (`docker exec`): a stall that an agent already
/// watching resolves within milliseconds, so nothing waits for it to be seen stuck.
fn stall(c: &Container) {
    c.engine.run(&["exec", "-d", &c.id, "/toucher", "48"]);
}

/// Asserts that `c` is still stuck and that the agent wrote nothing about it.
fn assert_left_alone(agent: &Agent, c: &Container, cg: &Cg) {
    std::thread::sleep(Duration::from_secs(2));
    assert!(cg.under_oom(), "{} is still stuck", c.name);
    let about: Vec<Value> = agent
        .audit()
        .into_iter()
        .filter(|v| v["cgroup"] == cg.rel.as_str())
        .collect();
    assert!(about.is_empty(), "nothing about {}: {about:#?}", c.name);
}

#[test]
fn label_and_image_policies_rescue_stuck_containers() {
    let test = "label_and_image_policies_rescue_stuck_containers";
    let Some(engine) = require_docker(test) else {
        return;
    };
    let pid = std::process::id();
    let parent = CgroupParent::new("labels");
    let img = image(&engine, Workload::Toucher);
    let team_label = format!("com.example.team=payments-{pid}");
    let (team, team_cg) = stuck_by_exec(&img, Some(&parent), "li-team", &["-l", &team_label]);
    let (by_image, image_cg) = stuck_by_exec(&img, Some(&parent), "li-image", &[]);
    // Neither: another team, and run by the image's id, so its `Config.Image` is
    // `sha256:...`, not the tag the image policy names.
    let other_label = format!("com.example.team=search-{pid}");
    let neither = run_container_ref(
        &img,
        &img.id(),
        Some(&parent),
        "li-neither",
        &["-m", "32m", "--oom-kill-disable", "-l", &other_label],
        &["1"],
    );
    assert!(
        neither.wait_log(WAIT, |l| l == "done 1").is_some(),
        "{}",
        neither.logs()
    );
    engine.run(&["exec", "-d", &neither.id, "/toucher", "48"]);
    let neither_cg = wait_stuck(&neither, WAIT);
    assert!(neither.inspect("{{.Config.Image}}").starts_with("sha256:"));

    // The team policy wins over the image policy (which the team's container matches
    // too) by its priority; the image policy is kept to our scratch parent, since other
    // tests' containers run the same image.
    let team_pol = policy_text(
        "team",
        "priority = 10",
        &format!("label = {{ \"com.example.team\" = \"pay*-{pid}\" }}"),
    );
    let image_pol = policy_text(
        "image",
        "",
        &format!(
            "cgroup = [\"{}/*\"]\nimage = [\"oomwake-it-toucher*\"]",
            parent.rel
        ),
    );
    let agent = Agent::start(&[("team.toml", &team_pol), ("image.toml", &image_pol)], &[]);

    let r = expect_under(&agent, "resolved", &team_cg.rel, "team");
    report(test, "label", &r);
    let lines = episode_lines(&agent, &team_cg.rel, &r["episode"]);
    assert_all_named(&lines, &team.name);
    assert!(!team_cg.under_oom() && team.running(), "the team's goes on");

    let r = expect_under(&agent, "resolved", &image_cg.rel, "image");
    report(test, "image", &r);
    let lines = episode_lines(&agent, &image_cg.rel, &r["episode"]);
    assert_all_named(&lines, &by_image.name);
    for v in &lines {
        assert_eq!(v["image"], img.tag.as_str(), "{v}");
    }
    assert!(!image_cg.under_oom() && by_image.running());

    assert_left_alone(&agent, &neither, &neither_cg);
    // The team's container was never watched under the image policy, not even before
    // its labels were known.
    for v in agent.audit() {
        if v["event"] == "watch" && v["cgroup"] == team_cg.rel.as_str() {
            assert_eq!(v["policy"], "team", "{v}");
        }
    }
}

#[test]
fn containers_started_before_and_after_the_agent_are_rescued_by_name() {
    let test = "containers_started_before_and_after_the_agent_are_rescued_by_name";
    let Some(engine) = require_docker(test) else {
        return;
    };
    let pid = std::process::id();
    let parent = CgroupParent::new("names");
    let img = image(&engine, Workload::Toucher);
    // Stuck before the agent starts: known from the listing at start.
    let (before, before_cg) = stuck_by_exec(&img, Some(&parent), "nb-before", &[]);
    // Named by a glob before it exists (its sequence number is not known yet).
    let pol = policy_text(
        "by-name",
        "",
        &format!(
            "container_name = [\"{}\", \"oomwake-it-{pid}-*-nb-after\"]",
            before.name
        ),
    );
    let started = Instant::now();
    let agent = Agent::start(&[("by-name.toml", &pol)], &[]);
    let r = agent.expect("resolved", &before_cg.rel, WAIT);
    measure(
        test,
        &format!(
            "agent start to resolved (container stuck before it) {} ms",
            started.elapsed().as_millis()
        ),
    );
    report(test, "started before", &r);
    assert_all_named(
        &episode_lines(&agent, &before_cg.rel, &r["episode"]),
        &before.name,
    );
    assert!(!before_cg.under_oom() && before.running());

    // Started after the agent: named from its create event (or an inspect).
    let t0 = SystemTime::now();
    let after = idle_container(&img, &parent, "nb-after", &[]);
    let after_cg = after.cg();
    let w = agent.expect("watch", &after_cg.rel, WAIT);
    assert_eq!(w["container_name"], after.name.as_str(), "{w}");
    assert_eq!(w["policy"], "by-name", "{w}");
    stall(&after);
    let r = agent.expect("resolved", &after_cg.rel, WAIT);
    let lines = episode_lines(&agent, &after_cg.rel, &r["episode"]);
    assert_all_named(&lines, &after.name);
    measure(
        test,
        &format!(
            "docker run to watched by name {:?} ms (wall, incl. the CLI); {}",
            ms_since(t0, &w["ts"]),
            engine_times(&after, &w)
        ),
    );
    report(test, "started after", &r);
    assert!(!after_cg.under_oom() && after.running());
}

#[test]
fn a_renamed_container_falls_under_the_policy_of_its_new_name() {
    let test = "a_renamed_container_falls_under_the_policy_of_its_new_name";
    let Some(engine) = require_docker(test) else {
        return;
    };
    let parent = CgroupParent::new("rename");
    let img = image(&engine, Workload::Toucher);
    let c = idle_container(&img, &parent, "rn", &[]);
    let cg = c.cg();
    let new_name = format!("{}-renamed", c.name);
    let old_pol = policy_text(
        "old-name",
        "",
        &format!("container_name = [\"{}\"]", c.name),
    );
    let new_pol = policy_text(
        "new-name",
        "",
        &format!("container_name = [\"{new_name}\"]"),
    );
    let agent = Agent::start(&[("old.toml", &old_pol), ("new.toml", &new_pol)], &[]);
    expect_under(&agent, "watch", &cg.rel, "old-name");

    // A stall under the old name.
    stall(&c);
    let r = expect_under(&agent, "resolved", &cg.rel, "old-name");
    assert_all_named(&episode_lines(&agent, &cg.rel, &r["episode"]), &c.name);
    report(test, "old name", &r);

    let t0 = SystemTime::now();
    engine.run(&["rename", &c.id, &new_name]);
    let w = expect_under(&agent, "watch", &cg.rel, "new-name");
    assert_eq!(w["container_name"], new_name.as_str(), "{w}");
    measure(
        test,
        &format!(
            "docker rename to re-watched {:?} ms",
            ms_since(t0, &w["ts"])
        ),
    );
    let u = agent.expect("unwatch", &cg.rel, WAIT);
    assert_eq!(u["policy"], "old-name", "{u}");
    assert_eq!(u["reason"], "container changed", "{u}");

    // The next stall: the new name's policy, and the new name on every line.
    stall(&c);
    let r = expect_under(&agent, "resolved", &cg.rel, "new-name");
    let lines = episode_lines(&agent, &cg.rel, &r["episode"]);
    assert_all_named(&lines, &new_name);
    for v in &lines {
        assert_eq!(v["policy"], "new-name", "{v}");
    }
    report(test, "new name", &r);
    assert!(!cg.under_oom() && c.running());
}

/// A process of ours killed (and reaped) when dropped.
struct HostProc(Child);

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The private dockerd stopped; started again when dropped (a test that fails during
/// the outage leaves its containers and cgroups to be removed through a live engine).
struct Outage<'a>(&'a mut PrivateDaemon);

impl Outage<'_> {
    fn end(self) {}
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        if self.0.pid().is_none() {
            self.0.start_again();
        }
    }
}

/// The agent's log lines that contain `what`.
fn log_lines(agent: &Agent, what: &str) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_restarted_engine_leaves_matching_by_name_working() {
    let test = "a_restarted_engine_leaves_matching_by_name_working";
    if require_docker(test).is_none() {
        return;
    }
    // Declared first, dropped last: after the containers and the cgroup parent.
    let mut daemon = PrivateDaemon::start();
    let engine = daemon.engine.clone();
    let sock = daemon.socket();
    let sock_s = sock.display().to_string();
    let parent = CgroupParent::new("restart");
    let img = image(&engine, Workload::Toucher);
    let pid = std::process::id();
    let known = idle_container(&img, &parent, "rs-known", &[]);
    let known_cg = known.cg();
    let pol = policy_text(
        "by-name",
        "",
        &format!(
            "container_name = [\"{}\", \"oomwake-it-{pid}-*-rs-late\"]",
            known.name
        ),
    );
    let agent = Agent::start(&[("by-name.toml", &pol)], &["--docker-socket", &sock_s]);
    let w = agent.expect("watch", &known_cg.rel, WAIT);
    assert_eq!(w["container_name"], known.name.as_str(), "{w}");

    // The engine goes away (by its pid; --live-restore: the container runs on).
    let outage = Outage(&mut daemon);
    let dockerd_pid = outage.0.pid();
    outage.0.stop();
    let t_down = Instant::now();
    assert!(
        wait_until(WAIT, || !log_lines(&agent, "events stream of").is_empty()),
        "the agent did not notice dockerd {dockerd_pid:?} stopping:\n{}",
        agent.log()
    );
    // A stall of the known container meanwhile (no engine to `docker exec`: a process
    // of ours joins its cgroup) is rescued under the cached name.
    let hog = Command::new(hog_bin())
        .arg("--join")
        .arg(&known_cg.dir)
        .args(["--touch", "48M", "--hold", "60s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn oomwake-hog");
    let mut hog = HostProc(hog);
    let r = agent.expect("resolved", &known_cg.rel, WAIT);
    let lines = episode_lines(&agent, &known_cg.rel, &r["episode"]);
    assert_all_named(&lines, &known.name);
    report(test, "during the outage", &r);
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            hog.0.try_wait(),
            Ok(Some(_))
        )),
        "the joined process was the victim"
    );
    // Let the client retry a few times (250 ms, 500 ms, 1 s, 2 s ...): no flood.
    let rest = Duration::from_secs(5).saturating_sub(t_down.elapsed());
    std::thread::sleep(rest);
    let outage_ms = t_down.elapsed().as_millis();
    outage.0.start_again();
    let t_up = Instant::now();
    outage.end();
    assert!(
        wait_until(Duration::from_secs(40), || !log_lines(
            &agent,
            "answers again"
        )
        .is_empty()),
        "the agent did not reconnect:\n{}",
        agent.log()
    );
    measure(
        test,
        &format!(
            "dockerd down {outage_ms} ms; dockerd answering to agent reconnected {} ms",
            t_up.elapsed().as_millis()
        ),
    );
    let log = agent.log();
    assert_eq!(
        log_lines(&agent, "events stream of").len(),
        1,
        "one line for the outage:\n{log}"
    );
    assert_eq!(
        log_lines(&agent, "answers again").len(),
        1,
        "one line for the return:\n{log}"
    );
    // Nothing else about the engine but the first connection and the two listings.
    let about_engine = log_lines(&agent, "docker:");
    println!(
        "{test}: the agent's lines about the engine:\n{}",
        about_engine.join("\n")
    );
    assert!(about_engine.len() <= 5, "{about_engine:#?}");
    assert!(known.running(), "live-restored");

    // A container created after the restart is named.
    let t0 = SystemTime::now();
    let late = idle_container(&img, &parent, "rs-late", &[]);
    let late_cg = late.cg();
    let w = agent.expect("watch", &late_cg.rel, WAIT);
    assert_eq!(w["container_name"], late.name.as_str(), "{w}");
    stall(&late);
    measure(
        test,
        &format!(
            "after the restart: docker run to watched by name {:?} ms; {}",
            ms_since(t0, &w["ts"]),
            engine_times(&late, &w)
        ),
    );
    let r = agent.expect("resolved", &late_cg.rel, WAIT);
    assert_all_named(
        &episode_lines(&agent, &late_cg.rel, &r["episode"]),
        &late.name,
    );
    report(test, "after the restart", &r);
    drop(hog);
    drop(agent);
    drop(late);
    drop(known);
    drop(img);
    drop(parent);
    drop(daemon);
}

/// `docker-compose -p PROJECT -f FILE` (bounded).
fn compose(dir: &Path, project: &str, args: &[&str]) -> CmdResult {
    let mut c = Command::new("docker-compose");
    c.current_dir(dir)
        .env_remove("DOCKER_HOST")
        .args(["-p", project, "-f", "compose.yaml"])
        .args(args);
    run_bounded(c, Duration::from_secs(120))
}

/// A compose project of ours: `down` when dropped.
struct Project {
    dir: tempfile::TempDir,
    name: String,
}

impl Drop for Project {
    fn drop(&mut self) {
        if let Err(e) = compose(self.dir.path(), &self.name, &["down", "-v", "-t", "1"]) {
            eprintln!("could not take down compose project {}: {e}", self.name);
        }
    }
}

#[test]
fn a_compose_service_is_rescued_by_its_compose_labels() {
    let test = "a_compose_service_is_rescued_by_its_compose_labels";
    let Some(engine) = require_docker(test) else {
        return;
    };
    if let Err(e) = run_bounded(
        {
            let mut c = Command::new("docker-compose");
            c.arg("version");
            c
        },
        Duration::from_secs(60),
    ) {
        if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
            panic!("{test}: {REQUIRE_ENV}=1 but docker-compose does not run: {e}");
        }
        eprintln!("{test}: skipped: docker-compose does not run: {e}");
        return;
    }
    let pid = std::process::id();
    let parent = CgroupParent::new("compose");
    let img = image(&engine, Workload::Toucher);
    let project = Project {
        dir: tempfile::tempdir().unwrap(),
        name: format!("oomwake-it-{pid}-compose"),
    };
    std::fs::write(
        project.dir.path().join("compose.yaml"),
        format!(
            "services:\n  api:\n    image: {}\n    command: [\"1\"]\n    network_mode: none\n    mem_limit: 32m\n    oom_kill_disable: true\n    cgroup_parent: {}\n    labels:\n      {LABEL}: \"{pid}\"\n",
            img.tag, parent.rel
        ),
    )
    .unwrap();
    let pol = policy_text(
        "compose-api",
        "",
        &format!(
            "label = {{ \"com.docker.compose.project\" = \"{}\", \"com.docker.compose.service\" = \"api\" }}",
            project.name
        ),
    );
    // Started first: the service is known from its create event.
    let agent = Agent::start(&[("api.toml", &pol)], &[]);
    if let Err(e) = compose(project.dir.path(), &project.name, &["up", "-d"]) {
        panic!("docker-compose up: {e}");
    }
    let id = engine.run(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=com.docker.compose.project={}", project.name),
    ]);
    assert_eq!(id.lines().count(), 1, "one container: {id}");
    let name = engine.run(&["inspect", "-f", "{{.Name}}", &id]);
    let c = Container::adopt(&engine, id, name.trim_start_matches('/').to_string());
    assert!(
        c.wait_log(WAIT, |l| l == "done 1").is_some(),
        "{}",
        c.logs()
    );
    let cg = c.cg();
    let w = expect_under(&agent, "watch", &cg.rel, "compose-api");
    assert_eq!(w["compose_project"], project.name.as_str(), "{w}");
    stall(&c);
    let r = expect_under(&agent, "resolved", &cg.rel, "compose-api");
    let lines = episode_lines(&agent, &cg.rel, &r["episode"]);
    assert_all_named(&lines, &c.name);
    for v in &lines {
        assert_eq!(v["compose_project"], project.name.as_str(), "{v}");
        assert_eq!(v["compose_service"], "api", "{v}");
    }
    report(test, "compose service", &r);
    assert!(!cg.under_oom() && c.running());
    drop(agent);
    drop(c);
    drop(project);
}
