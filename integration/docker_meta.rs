//! Container metadata against the real Docker engine: a policy that names a container
//! by `container_name` rescues it from a real OOM stall (a static C page toucher in a
//! FROM scratch image, `-m 64m --oom-kill-disable`), for containers started before
//! and after the agent (one stalling within milliseconds of its start); audit lines,
//! `status` and `explain` name the container; a container no policy names is left
//! alone. Containers live below a scratch cgroup of ours (`--cgroup-parent`); they and
//! the image are removed by Drop guards, even when a test fails.
//!
//! Skipped (with a message) when no engine answers on /var/run/docker.sock, unless
//! OOMWAKE_REQUIRE_DOCKER=1.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::common::*;

const SOCKET: &str = "/var/run/docker.sock";

/// Touches argv[1] MiB after waiting argv[2] ms, prints "done", and with a third
/// argument sleeps until killed.
const TOUCHER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 80;
    long wait_ms = argc > 2 ? atol(argv[2]) : 0;
    if (wait_ms > 0) usleep(wait_ms * 1000);
    size_t n = (size_t)mib << 20;
    char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 2; }
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    printf("done %ld MiB\n", mib);
    fflush(stdout);
    if (argc > 3) for (;;) pause();
    return 0;
}
"#;

/// Root, v1, and an engine that answers; `None`: skip (already said why).
fn require_docker(test: &str) -> Option<()> {
    require_v1(test)?;
    let ping = oomwake::container::http::get_body(
        Path::new(SOCKET),
        None,
        "/_ping",
        Duration::from_secs(5),
    );
    match ping {
        Ok(_) => Some(()),
        Err(e) if std::env::var("OOMWAKE_REQUIRE_DOCKER").as_deref() == Ok("1") => {
            panic!("{test}: no Docker engine and OOMWAKE_REQUIRE_DOCKER=1: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped: no Docker engine answers on {SOCKET}: {e}");
            None
        }
    }
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        eprintln!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    (out.status.success(), text)
}

/// The toucher image (FROM scratch: one static binary) and the containers made from
/// it; all removed on drop.
struct Docker {
    image: String,
    containers: Vec<String>,
    _build: tempfile::TempDir,
}

impl Docker {
    fn new() -> Docker {
        let build = tempfile::tempdir().unwrap();
        let src = build.path().join("toucher.c");
        std::fs::write(&src, TOUCHER_C).unwrap();
        let root = build.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let cc = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(root.join("toucher"))
            .arg(&src)
            .status()
            .expect("gcc (static) for the test image");
        assert!(cc.success(), "gcc -static failed");
        let tar = build.path().join("img.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let image = format!("oomwake-dm-toucher:{}", std::process::id());
        let (ok, _) = docker(&["import", tar.to_str().unwrap(), &image]);
        assert!(ok, "docker import");
        Docker {
            image,
            containers: Vec::new(),
            _build: build,
        }
    }

    /// `docker run -d` below `parent`; returns the full id.
    fn run(&mut self, name: &str, parent: &str, args: &[&str]) -> String {
        let mut a = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "--cgroup-parent",
            parent,
            "-m",
            "64m",
            "--oom-kill-disable",
            "-l",
            "com.docker.compose.project=oomwake-dm",
            "-l",
            "com.docker.compose.service=api",
            &self.image,
            "/toucher",
        ];
        a.extend_from_slice(args);
        // Registered before the run: a half-created container goes too.
        self.containers.push(name.to_string());
        let (ok, id) = docker(&a);
        assert!(ok, "docker run {name}");
        assert_eq!(id.len(), 64, "{id}");
        id
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn ms_between(earlier: SystemTime, ts: &Value) -> Option<i64> {
    let t = humantime::parse_rfc3339(ts.as_str()?).ok()?;
    let d = match t.duration_since(earlier) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    Some(d)
}

#[test]
fn containers_named_by_policy_are_rescued_and_named_everywhere() {
    let test = "containers_named_by_policy_are_rescued_and_named_everywhere";
    if require_docker(test).is_none() {
        return;
    }
    // Declared first, dropped last: the containers below it go before it does.
    let scratch = Scratch::new("docker");
    let mut dk = Docker::new();
    let tag = format!("oomwake-dm-{}", std::process::id());
    let before = format!("{tag}-before");
    let after = format!("{tag}-after");
    let other = format!("{tag}-other");
    // Started before the agent: known from the listing at start. It sleeps after
    // touching 1 MiB, so it is watched, never stuck.
    let before_id = dk.run(&before, &scratch.rel, &["1", "0", "sleep"]);
    let pol = format!(
        "name = \"by-name\"\n[match]\ncontainer_name = [\"{before}\", \"{after}\"]\n{RAISE}"
    );
    let agent = Agent::start(&[("by-name.toml", &pol)], &["--docker-socket", SOCKET]);
    let before_cg = format!("{}/{before_id}", scratch.rel);
    let w = agent.expect("watch", &before_cg, Duration::from_secs(20));
    assert_eq!(w["container_id"], before_id.as_str(), "{w}");
    assert_eq!(w["container_name"], before.as_str(), "{w}");
    assert_eq!(w["image"], dk.image.as_str(), "{w}");
    assert_eq!(w["compose_project"], "oomwake-dm", "{w}");
    assert_eq!(w["compose_service"], "api", "{w}");

    // Started after the agent, stalling within milliseconds of its start: 80 MiB at
    // full speed against 64 MiB.
    let t0 = SystemTime::now();
    let after_id = dk.run(&after, &scratch.rel, &["80"]);
    let after_cg = format!("{}/{after_id}", scratch.rel);
    let w = agent.expect("watch", &after_cg, Duration::from_secs(20));
    assert_eq!(w["container_name"], after.as_str(), "{w}");
    let resolved = agent.expect("resolved", &after_cg, Duration::from_secs(30));
    let oom = agent.events("oom", &after_cg);
    assert!(!oom.is_empty(), "a real OOM stall was seen");
    for line in agent
        .audit()
        .iter()
        .filter(|v| v["cgroup"] == after_cg.as_str())
    {
        assert_eq!(line["container_id"], after_id.as_str(), "{line}");
        assert_eq!(line["container_name"], after.as_str(), "{line}");
        assert_eq!(line["image"], dk.image.as_str(), "{line}");
    }
    let (_, code) = docker(&["wait", &after]);
    assert_eq!(code, "0", "the rescued container finished its work");
    let (_, logs) = docker(&["logs", &after]);
    assert!(logs.contains("done 80 MiB"), "{logs}");
    // Docker's own clock of the container's creation and start, against the agent's.
    let (_, created) = docker(&["inspect", "-f", "{{.Created}}", &after]);
    let (_, started) = docker(&["inspect", "-f", "{{.State.StartedAt}}", &after]);
    let at = |t: &str| humantime::parse_rfc3339_weak(t.get(..23).unwrap_or(t)).ok();
    let since = |t: Option<SystemTime>| t.and_then(|t| ms_between(t, &w["ts"]));
    eprintln!(
        "{test}: docker run -> watched by name {:?} ms (created -> watched {:?} ms, started -> watched {:?} ms); docker run -> oom {:?} ms; stalled_ms {}",
        ms_between(t0, &w["ts"]),
        since(at(&created)),
        since(at(&started)),
        ms_between(t0, &oom[0]["ts"]),
        resolved["stalled_ms"]
    );

    // status names the containers it watches.
    let st = Command::new(oomwake_bin())
        .args(["status", "--state-dir"])
        .arg(agent.tmp.path().join("state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains(&format!("container {before} ({}", &before_id[..12])),
        "{text}"
    );

    // explain takes the container's name.
    let ex = Command::new(oomwake_bin())
        .args(["explain", "--insecure-policies", "--policies"])
        .arg(agent.tmp.path().join("policies"))
        .arg(&before)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ex.stdout);
    assert!(
        ex.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ex.stderr)
    );
    assert!(text.contains(&format!("cgroup: {before_cg}")), "{text}");
    assert!(
        text.contains(&format!("container: {before} (id {}", &before_id[..12])),
        "{text}"
    );
    assert!(text.contains("policy: by-name"), "{text}");

    // No policy names this one: it stays stuck, and the agent writes nothing about it.
    let other_id = dk.run(&other, &scratch.rel, &["80"]);
    let other_cg = format!("{}/{other_id}", scratch.rel);
    let oc = Path::new(MEMROOT)
        .join(other_cg.trim_start_matches('/'))
        .join("memory.oom_control");
    assert!(
        wait_until(Duration::from_secs(20), || read(&oc)
            .contains("under_oom 1")),
        "the unnamed container stalls"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(read(&oc).contains("under_oom 1"), "left alone: still stuck");
    let about: Vec<Value> = agent
        .audit()
        .into_iter()
        .filter(|v| v["cgroup"] == other_cg.as_str())
        .collect();
    assert!(about.is_empty(), "{about:?}");
    drop(agent);
    drop(dk);
    drop(scratch);
}

/// `check` takes the container keys as they are (no "matches nothing" warning): the
/// agent reads them from the engine now. Needs no engine, nor root.
#[test]
fn check_accepts_container_keys_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.toml");
    std::fs::write(
        &file,
        "[match]\ncontainer_name = [\"api-*\"]\nlabel = { \"com.docker.compose.service\" = \"api\" }\nimage = [\"registry.local/api:*\"]\n[[step]]\naction = \"reclaim\"\n",
    )
    .unwrap();
    let out = Command::new(oomwake_bin())
        .args(["check", "--insecure-policies"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
}
