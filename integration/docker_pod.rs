//! Issue 17.3: the Docker sidecar in a shared parent, on the real engine (root, cgroup
//! v1, cgroupfs driver). A scratch parent cgroup carries the limit and
//! `oom_kill_disable`, and is the `--cgroup-parent` of the sidecar (started by the
//! README's quick start line), of a workload container that grows past the parent's
//! limit, and of a small container that must survive. The sidecar's only policy targets
//! the parent with a kill step (no raise_limit): the agent must end the stall it shares,
//! within 1 s, by killing the grower.
//!
//! The second test first warms the sidecar's heap: hundreds of watched cgroups and
//! several stalls resolved (and `oomwake status` run) before the stall that matters.
//! The third starts the grower with `docker exec` in the small task's container, a few
//! seconds after that container started: the victim is a new process in a cgroup the
//! agent has known for a while, and the small task beside it must survive.
//!
//! Latencies go to target/tmp/docker-measure.log (see [`measure`]).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::common::docker::*;
use crate::common::*;
use crate::docker::{effective_caps, readme_run_line, substitute, CAP_IPC_LOCK, CAP_KILL};

/// The parent's limit: the sidecar (about 15-25 MiB locked), the small container and the
/// grower share it.
const LIMIT: u64 = 192 * MIB;
/// MiB the grower touches: far past the limit.
const GROWER_MIB: &str = "400";
/// MiB the small task touches (then it sleeps): it must survive.
const SMALL_MIB: &str = "4";
/// From the stall to the kill, at most.
const KILL_WITHIN_MS: f64 = 1000.0;
/// The bound for `mode`. A grower in a container of its own reaches the wall within a
/// second of its cgroup being armed, and on v1 the kernel keeps that cgroup's task
/// lists cached for a second after the kit's first read of them: the kill waits them
/// out ([`oomwake::armed::LIST_CACHE`], README "Running the agent inside a cgroup it
/// manages") rather than choose from a list that may miss a task. A grower started in
/// a container the kit has known for longer is killed without that wait.
fn kill_within_ms(mode: Mode) -> f64 {
    match mode {
        Mode::Exec => KILL_WITHIN_MS,
        Mode::Cold | Mode::Warm => {
            KILL_WITHIN_MS + oomwake::armed::LIST_CACHE.as_secs_f64() * 1000.0
        }
    }
}

/// Warm-up: idle cgroups watched, then stalls resolved, before the stall that matters.
const WARM_IDLE: usize = 300;
const WARM_STALLS: usize = 5;

/// One pod test at a time: both drive the machine (2 cores here) to a wall, and each
/// measures a latency the other would disturb.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The scratch parent: Docker's `--cgroup-parent` for every container of the test, made
/// in the memory hierarchy first so that it carries the limit and `oom_kill_disable`
/// before any container starts. Dropping it removes it from every hierarchy.
struct Pod {
    parent: CgroupParent,
    cg: Cg,
}

fn pod(what: &str) -> Pod {
    let parent = CgroupParent::new(what);
    let dir = Path::new(MEMROOT).join(parent.rel.trim_start_matches('/'));
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    write(&dir.join("memory.limit_in_bytes"), &LIMIT.to_string());
    write(&dir.join("memory.oom_control"), "1");
    let cg = Cg {
        rel: parent.rel.clone(),
        dir,
    };
    Pod { parent, cg }
}

/// Host processes (hogs of the warm-up) started by the test; killed when dropped.
struct Hogs(Vec<Child>);

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The sidecar, started by the README's quick start line with this test's policies and
/// state, below `parent` (`--cgroup-parent`, and our label so that a killed test run's
/// sidecar is swept). The line's other words are run as written.
fn start_pod_sidecar(
    engine: &Engine,
    image: &SidecarImage,
    dir: &Path,
    parent: &CgroupParent,
    what: &str,
) -> Container {
    let mut words = readme_run_line();
    assert_eq!(words[..2], ["docker", "run"], "{words:?}");
    let name = format!("oomwake-it-{}-pod-{what}", std::process::id());
    substitute(&mut words, "oomwake", &name);
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
    let label = format!("{LABEL}={}", std::process::id());
    let extra = ["--cgroup-parent", &parent.rel, "--label", &label];
    let mut args: Vec<&str> = vec!["run"];
    args.extend_from_slice(&extra);
    args.extend(words[2..].iter().map(String::as_str));
    let id = match engine.try_run(&args, Duration::from_secs(60)) {
        Ok(id) => id,
        Err(e) => {
            let _ = engine.try_run(&["rm", "-f", &name], Duration::from_secs(30));
            panic!("the README's run line with --cgroup-parent failed: {e}");
        }
    };
    Container::adopt(engine, id, name)
}

/// The sidecar's audit lines (its `docker logs`, one JSON object a line).
fn audit(sidecar: &Container) -> Vec<Value> {
    sidecar
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (bounded) for a sidecar audit line matching `pred`.
fn wait_audit(
    sidecar: &Container,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = audit(sidecar).into_iter().find(|v| pred(v)) {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sidecar's audit lines about `cgroup` and its subtree (the warm-up's episodes,
/// whose victims the kill kit may still list), and its log lines, for failure messages.
fn about(sidecar: &Container, cgroup: &str) -> String {
    let below = format!("{cgroup}/");
    audit(sidecar)
        .into_iter()
        .filter(|v| {
            let c = v["cgroup"].as_str().unwrap_or("");
            v["event"] == "log" || c == cgroup || (c.starts_with(&below) && v["event"] != "watch")
        })
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn time_of(ts: &str) -> SystemTime {
    humantime::parse_rfc3339_weak(ts.trim_end_matches('Z'))
        .unwrap_or_else(|e| panic!("timestamp {ts:?}: {e}"))
}

/// Milliseconds from `a` to `b` (RFC 3339 timestamps; negative if `b` is earlier).
fn ms_between(a: &str, b: &str) -> f64 {
    let (a, b) = (time_of(a), time_of(b));
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// `VmRSS` and `VmLck` of a process, in KiB.
fn rss_lck_kib(pid: i32) -> (u64, u64) {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmLck:"))
}

/// `oomwake status` inside the sidecar (`docker exec`); its output.
fn status_in(sidecar: &Container) -> String {
    sidecar
        .engine
        .try_run(
            &["exec", &sidecar.id, "/usr/bin/oomwake", "status"],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("oomwake status in the sidecar: {e}"))
}

/// The warm-up: `WARM_IDLE` idle cgroups watched (in `idle`, beside the parent: the
/// kill kit of the shared parent arms at most `armed::MAX_CGROUPS` cgroups below it, and
/// a pod with more is a test of that bound, not of a warm heap), then `WARM_STALLS`
/// stalls of host hogs in cgroups of their own below the parent (16 MiB each: the agent
/// does not share them), each resolved by the sidecar's kill, with `oomwake status`
/// after each.
fn warm_up(name: &str, pod: &Pod, idle: &Scratch, sidecar: &Container, hogs: &mut Hogs) {
    let started = Instant::now();
    let prefix = format!("{}/warm-", pod.cg.rel);
    let idle_prefix = format!("{}/idle-", idle.rel);
    for i in 0..WARM_IDLE {
        let dir = idle.dir.join(format!("idle-{i}"));
        std::fs::create_dir(&dir).unwrap();
        write(&dir.join("memory.oom_control"), "1");
    }
    let all_watched = wait_until(Duration::from_secs(60), || {
        audit(sidecar)
            .iter()
            .filter(|v| {
                v["event"] == "watch"
                    && v["cgroup"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(&idle_prefix))
            })
            .count()
            >= WARM_IDLE
    });
    assert!(
        all_watched,
        "the sidecar did not watch the {WARM_IDLE} idle cgroups:\n{}",
        sidecar.logs()
    );
    for round in 0..WARM_STALLS {
        let rel = format!("{prefix}stall-{round}");
        let dir = pod.cg.dir.join(format!("warm-stall-{round}"));
        std::fs::create_dir(&dir).unwrap();
        write(&dir.join("memory.limit_in_bytes"), &(16 * MIB).to_string());
        write(&dir.join("memory.oom_control"), "1");
        assert!(
            wait_audit(sidecar, Duration::from_secs(20), |v| v["event"] == "watch"
                && v["cgroup"] == rel.as_str())
            .is_some(),
            "not watched: {rel}\n{}",
            sidecar.logs()
        );
        let hog = Command::new(hog_bin())
            .arg("--join")
            .arg(&dir)
            .args(["--touch", "48M", "--hold", "60s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn oomwake-hog");
        hogs.0.push(hog);
        let r = wait_audit(sidecar, Duration::from_secs(30), |v| {
            v["event"] == "resolved" && v["cgroup"] == rel.as_str()
        });
        let Some(r) = r else {
            panic!(
                "warm-up stall {round} not resolved:\n{}",
                about(sidecar, &rel)
            );
        };
        assert_eq!(r["by_action"], "kill", "{r}");
        let hog = hogs.0.last_mut().unwrap();
        let exited = wait_until(Duration::from_secs(10), || {
            matches!(hog.try_wait(), Ok(Some(_)))
        });
        assert!(exited, "the warm-up hog {round} still runs");
        let out = status_in(sidecar);
        assert!(out.contains("oomwake running"), "{out}");
    }
    measure(
        name,
        &format!(
            "warm-up: {WARM_IDLE} idle cgroups watched, {WARM_STALLS} stalls resolved by kill, status run {WARM_STALLS} times, in {} ms",
            started.elapsed().as_millis()
        ),
    );
}

/// Where the grower comes from, and what comes before it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A container of its own, started once the sidecar watches the parent.
    Cold,
    /// The same after [`warm_up`].
    Warm,
    /// `docker exec` into the small task's container, a few seconds after that
    /// container started: a new process in a cgroup the agent already knows.
    Exec,
}

/// The whole scenario.
fn pod_stall(name: &str, mode: Mode) {
    let warm = mode == Mode::Warm;
    let Some(engine) = require_docker(name) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sidecar_img = sidecar_image(&engine);
    let toucher = image(&engine, Workload::Toucher);
    // Dropped in reverse: containers first, then the hogs, then the cgroups.
    let what = match mode {
        Mode::Cold => "cold",
        Mode::Warm => "warm",
        Mode::Exec => "exec",
    };
    let pod = pod(what);
    let idle = Scratch::new("pod-idle");
    let mut hogs = Hogs(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("policies/pod.toml"),
        policy("pod", &pod.cg.rel, "", KILL),
    )
    .unwrap();
    if warm {
        std::fs::write(
            dir.path().join("policies/warm.toml"),
            format!(
                "name = \"warm\"\n[match]\ncgroup = [\"{}/warm-*\", \"{}/idle-*\"]\n{KILL}",
                pod.cg.rel, idle.rel
            ),
        )
        .unwrap();
    }
    let rel = pod.cg.rel.as_str();

    let sidecar = start_pod_sidecar(&engine, &sidecar_img, dir.path(), &pod.parent, what);
    assert!(
        wait_audit(&sidecar, Duration::from_secs(60), |v| v["event"] == "watch"
            && v["cgroup"] == rel)
        .is_some(),
        "the sidecar never watched the parent {rel}:\n{}",
        sidecar.logs()
    );
    let sidecar_pid = sidecar.pid();
    let sidecar_cg = sidecar.cgroup();
    assert!(
        sidecar_cg.starts_with(&format!("{rel}/")),
        "the sidecar runs in {sidecar_cg}, not below the parent {rel}"
    );
    assert_eq!(
        effective_caps(sidecar_pid),
        CAP_KILL | CAP_IPC_LOCK,
        "the sidecar's effective capabilities"
    );
    // Written once the hierarchy is watched, just after the watch lines.
    let locked = sidecar.wait_log(Duration::from_secs(10), |l| l.contains("memory locked"));
    let logs = sidecar.logs();
    assert!(locked.is_some(), "mlockall worked:\n{logs}");
    assert!(
        logs.contains("the agent runs inside"),
        "the sidecar says it shares a managed cgroup:\n{logs}"
    );
    if warm {
        warm_up(name, &pod, &idle, &sidecar, &mut hogs);
    }
    let (rss, lck) = rss_lck_kib(sidecar_pid);
    measure(
        name,
        &format!(
            "sidecar before the stall: VmRSS {rss} KiB, VmLck {lck} KiB, parent usage {} KiB of {} KiB",
            pod.cg.usage() >> 10,
            LIMIT >> 10
        ),
    );

    // The small task, then the grower: both below the parent, no limit of their own.
    let small = run_container(&toucher, Some(&pod.parent), "small", &[], &[SMALL_MIB]);
    assert!(
        small
            .wait_log(Duration::from_secs(30), |l| l
                == format!("done {SMALL_MIB}"))
            .is_some(),
        "{}",
        small.logs()
    );
    let small_pid = small.pid();
    let episodes_before = audit(&sidecar)
        .iter()
        .filter(|v| v["event"] == "oom" && v["cgroup"] == rel)
        .count();
    assert_eq!(episodes_before, 0, "{}", about(&sidecar, rel));
    // Exec: the grower joins the small task's container, whose cgroup the agent has
    // known (and listed) for a while. Nothing here reads that cgroup's task list (a
    // fresh read refreshes what every reader of the list sees on cgroup v1).
    let (grower, grower_cg, grower_pid) = if mode == Mode::Exec {
        let small_cg = small.cgroup();
        std::thread::sleep(Duration::from_millis(2500));
        small
            .engine
            .run(&["exec", "-d", &small.id, "/toucher", GROWER_MIB]);
        (None, small_cg, 0)
    } else {
        let g = run_container(&toucher, Some(&pod.parent), "grower", &[], &[GROWER_MIB]);
        let cg = format!("{rel}/{}", g.id);
        // 0 when it is already gone (the kill can come before `docker inspect` answers).
        let pid = g.pid();
        (Some(g), cg, pid)
    };
    let grower_running = || match &grower {
        Some(g) => g.running(),
        None => false,
    };

    let oom = wait_audit(&sidecar, Duration::from_secs(60), |v| {
        v["event"] == "oom" && v["cgroup"] == rel
    });
    let Some(oom) = oom else {
        panic!(
            "no oom line for the parent; under_oom {}, grower logs tail: {:?}\n{}",
            pod.cg.under_oom(),
            grower
                .as_ref()
                .map(|g| g.logs())
                .unwrap_or_default()
                .lines()
                .last(),
            sidecar.logs()
        );
    };
    // The kill: any episode's (a retry may be the one), but within the bound.
    let kill = wait_audit(&sidecar, Duration::from_secs(10), |v| {
        v["event"] == "action"
            && v["cgroup"] == rel
            && v["action"] == "kill"
            && v["outcome"] == "done"
    });
    let Some(kill) = kill else {
        panic!(
            "the sidecar did not kill in the parent it shares within 10 s of its oom line; under_oom {}, grower running {}; audit about {rel}:\n{}",
            pod.cg.under_oom(),
            grower_running(),
            about(&sidecar, rel)
        );
    };
    let oom_ts = oom["ts"].as_str().unwrap_or_default();
    let kill_ts = kill["ts"].as_str().unwrap_or_default();
    let audit_ms = ms_between(oom_ts, kill_ts);
    // From here on every check is made and the failures reported together, so that
    // one failed run still measures everything.
    let mut problems: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    // The audit line names the victim: the grower, in its container's cgroup.
    check(
        kill["victim_cgroup"] == grower_cg.as_str(),
        format!("victim_cgroup is not the grower's {grower_cg}"),
    );
    check(
        grower_pid == 0 || kill["pid"] == grower_pid,
        format!("pid is not the grower's {grower_pid}"),
    );
    check(
        kill["comm"] == "toucher",
        format!("comm {} is not the grower's (toucher)", kill["comm"]),
    );
    check(kill["signal"] == "SIGKILL", "signal is not SIGKILL".into());
    check(
        kill["rss_bytes"].as_u64().unwrap_or(0) > 64 * MIB,
        "rss_bytes is not the grower's (over 64 MiB)".into(),
    );
    check(
        kill["pid"] != small_pid && kill["pid"] != sidecar_pid,
        format!("the victim is the small task ({small_pid}) or the sidecar ({sidecar_pid})"),
    );

    // The workload's side: its last progress line to its end, on the engine's clock.
    let victim_proc = format!("/proc/{}", kill["pid"]);
    let stopped = wait_until(Duration::from_secs(10), || {
        !grower_running() && !Path::new(&victim_proc).exists()
    });
    check(
        stopped,
        "the grower still runs 10 s after the kill line".into(),
    );
    let workload_ms = if let (true, Some(grower)) = (stopped, &grower) {
        let code = grower.inspect("{{.State.ExitCode}}");
        check(
            code == "137",
            format!("the grower's exit code is {code}, not 137"),
        );
        let finished = grower.inspect("{{.State.FinishedAt}}");
        let last_touch = grower
            .engine
            .run(&["logs", "-t", &grower.id])
            .lines()
            .rev()
            .find(|l| l.contains(" touched "))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no touched line from the grower"));
        let ms = ms_between(&last_touch, &finished);
        check(
            ms <= kill_within_ms(mode),
            format!("the grower ended {ms:.0} ms after its last progress line (last touched {last_touch}, finished {finished})"),
        );
        Some(ms)
    } else {
        None
    };
    check(
        audit_ms <= kill_within_ms(mode),
        format!("the kill line is {audit_ms:.0} ms after the oom line"),
    );

    // The killing episode's end (an earlier episode may have ended unaided, when the
    // grower got a few pages for a moment).
    let resolved = wait_audit(&sidecar, Duration::from_secs(10), |v| {
        v["event"] == "resolved" && v["cgroup"] == rel && v["episode"] == kill["episode"]
    })
    .unwrap_or_default();
    check(
        resolved["by_action"] == "kill",
        format!("the killing episode's resolved line is {resolved}"),
    );
    measure(
        name,
        &format!(
            "oom line to kill line {audit_ms:.0} ms (audit ts); grower's last touched line to its exit {} ms (docker logs -t, State.FinishedAt); stalled_ms {}, first_action_ms {}, victim rss {} MiB, via {}, episode {}",
            workload_ms.map_or("?".to_string(), |m| format!("{m:.0}")),
            resolved["stalled_ms"],
            resolved["first_action_ms"],
            kill["rss_bytes"].as_u64().unwrap_or(0) >> 20,
            kill["via"],
            kill["episode"]
        ),
    );
    check(
        wait_until(Duration::from_secs(5), || !pod.cg.under_oom()),
        "the parent is still under OOM 5 s after the kill".into(),
    );

    // The small task and the sidecar live; the sidecar answers.
    check(small.running(), "the small container was stopped".into());
    check(
        small.pid() == small_pid,
        "the small task was replaced".into(),
    );
    check(sidecar.running(), "the sidecar died".into());
    check(
        sidecar.pid() == sidecar_pid,
        "the sidecar was restarted".into(),
    );
    match sidecar.engine.try_run(
        &["exec", &sidecar.id, "/usr/bin/oomwake", "status"],
        Duration::from_secs(30),
    ) {
        Ok(out) => check(
            out.contains("oomwake running") && out.contains(rel),
            format!("oomwake status does not say running with the parent watched: {out}"),
        ),
        Err(e) => check(false, format!("oomwake status in the sidecar: {e}")),
    }

    // SIGTERM (docker stop) stops it cleanly, well before docker's SIGKILL.
    let t = Instant::now();
    let stop = sidecar
        .engine
        .try_run(&["stop", "-t", "20", &sidecar.id], Duration::from_secs(60));
    let stop_ms = t.elapsed().as_millis();
    let code = sidecar.inspect("{{.State.ExitCode}}");
    measure(
        name,
        &format!("docker stop of the sidecar {stop_ms} ms, exit code {code}"),
    );
    check(stop.is_ok(), format!("docker stop: {stop:?}"));
    check(code == "0", format!("the sidecar exited with {code}"));
    check(stop_ms < 15_000, format!("docker stop took {stop_ms} ms"));
    check(small.running(), "the small container did not go on".into());
    assert!(
        problems.is_empty(),
        "{}\nkill line: {kill}\naudit about {rel}:\n{}",
        problems.join("\n"),
        about(&sidecar, rel)
    );
}

#[test]
fn docker_pod_sidecar_kills_the_grower_in_the_parent_it_shares() {
    pod_stall(
        "docker_pod_sidecar_kills_the_grower_in_the_parent_it_shares",
        Mode::Cold,
    );
}

#[test]
fn docker_pod_sidecar_with_a_warm_heap_kills_the_grower_in_the_parent_it_shares() {
    pod_stall(
        "docker_pod_sidecar_with_a_warm_heap_kills_the_grower_in_the_parent_it_shares",
        Mode::Warm,
    );
}

#[test]
fn docker_pod_sidecar_kills_a_grower_execd_beside_the_small_task() {
    pod_stall(
        "docker_pod_sidecar_kills_a_grower_execd_beside_the_small_task",
        Mode::Exec,
    );
}
