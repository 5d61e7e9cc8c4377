//! Issue 16.2 on a real stall: a container's identity the agent cannot learn must not
//! fall through to a catch-all that kills. The Docker engine is a fake one, a unix
//! socket in a TempDir served by a thread that accepts every connection and never
//! answers (a hung engine); the "container" is a real cgroup shaped like Docker's
//! (`<scratch>/docker/<64 hex>`, 32 MiB, `oom_kill_disable 1`) below the test's own
//! scratch cgroup, with a real hog stalled in it. Root and cgroup v1. The same fake
//! engine, answering, serves the hold-expiry resume of issue 16.4.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// An engine that accepts and never says a word (the connections are held open until
/// it is dropped); with `wakes_after`, connections accepted from then on are answered
/// like Docker would, knowing one container `(id, name)`.
struct MuteEngine {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl MuteEngine {
    fn start(path: &Path) -> MuteEngine {
        MuteEngine::start_waking(path, None)
    }

    fn start_waking(path: &Path, wakes: Option<(Duration, String, String)>) -> MuteEngine {
        let l = UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (st, n) = (stop.clone(), accepted.clone());
        let t0 = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        n.fetch_add(1, Ordering::SeqCst);
                        if let Some((after, id, name)) = &wakes {
                            if t0.elapsed() >= *after {
                                answer(&mut s, id, name);
                            }
                        }
                        held.push(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        MuteEngine {
            stop,
            thread: Some(thread),
            accepted,
        }
    }
}

/// One request, answered as the Engine API would: the events stream's head (then
/// nothing), the listing, an inspect.
fn answer(s: &mut UnixStream, id: &str, name: &str) {
    use std::io::{Read, Write};
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut req = [0u8; 4096];
    let n = s.read(&mut req).unwrap_or(0);
    let line = String::from_utf8_lossy(&req[..n]).to_string();
    let target = line.split(' ').nth(1).unwrap_or("").to_string();
    let meta = serde_json::json!({"Id": id, "Name": format!("/{name}"),
        "Names": [format!("/{name}")], "Image": "img:1", "Labels": {},
        "Config": {"Image": "img:1", "Labels": {}}});
    let reply = if target.starts_with("/events") {
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
    } else {
        let body = if target == "/containers/json" {
            serde_json::Value::Array(vec![meta])
        } else {
            meta
        }
        .to_string();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = s.write_all(reply.as_bytes());
}

impl Drop for MuteEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_container_of_unknown_name_is_not_killed_by_the_catch_all() {
    let test = "a_container_of_unknown_name_is_not_killed_by_the_catch_all";
    let Some(()) = require_v1(test) else {
        return;
    };
    let mut s = Scratch::new("unknown-name");
    s.cgroup("docker", None, false);
    let id = "e".repeat(64);
    let cg = s.cgroup(&format!("docker/{id}"), Some(32 * MIB), true);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    let engine = MuteEngine::start(&sock);

    // Issue 16.2's pair, both kept to this test's scratch tree: `db` names the
    // container and only audits; the catch-all below it kills.
    let glob = format!("{}/docker/*", s.rel);
    let db = format!(
        "name = \"db\"\nmode = \"audit\"\npriority = 50\n[match]\ncgroup = [\"{glob}\"]\ncontainer_name = [\"db-*\"]\n{KILL}"
    );
    let all = format!("name = \"all\"\npriority = 0\n[match]\ncgroup = [\"{glob}\"]\n{KILL}");
    let tmp = Agent::dir(&[("db.toml", &db), ("all.toml", &all)]);
    std::fs::write(
        tmp.path().join("oomwake.toml"),
        "container_metadata_wait = \"1500ms\"\n",
    )
    .unwrap();
    let agent = Agent::start_in(tmp, &["--docker-socket", sock.to_str().unwrap()]);
    let w = agent.expect("watch", &cg.rel, Duration::from_secs(10));
    assert_eq!(w["policy"], "all", "{w}");

    let hog = s.hog(&cg, &["--touch", "48M", "--hold", "60s"]);
    let t0 = Instant::now();
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(15));
    assert_eq!(oom["metadata"], "unknown", "{oom}");
    assert_eq!(oom["outranked_by"], "db", "{oom}");
    assert_eq!(oom["fallback_policy"], "all", "{oom}");
    let reason = oom["metadata_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(sock.to_str().unwrap()), "{oom}");
    let waited = oom["metadata_wait_ms"].as_f64().unwrap_or_default();
    assert!((1500.0..5000.0).contains(&waited), "{oom}");
    let un = agent.expect("unresolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(
        un["reason"], "container metadata unknown: audit only",
        "{un}"
    );

    // Give a wrong kill time to happen (a retry of the stall included), then look.
    std::thread::sleep(Duration::from_secs(3));
    let actions = agent.events("action", &cg.rel);
    assert!(!actions.is_empty(), "no action line:\n{}", agent.log());
    for a in &actions {
        assert_eq!(a["outcome"], "would", "{a}");
        assert_eq!(a["mode"], "audit", "{a}");
    }
    assert!(
        s.alive(hog.pid),
        "the catch-all killed a container whose name was unknown; audit:\n{:?}",
        agent.audit()
    );
    assert!(cg.under_oom(), "still stalled: nothing acted");
    assert!(
        engine.accepted.load(Ordering::SeqCst) > 0,
        "the agent never reached the engine"
    );
    eprintln!(
        "{test}: oom line {waited} ms after the stall began (metadata wait), {:?} since the hog started",
        t0.elapsed()
    );
    drop(agent);
    drop(s);
    drop(engine);
}

/// The engine is hung for the first seconds, then answers: the stall is held
/// audit-only meanwhile, and once the name is known it is handled under the policy
/// that names the container (here `db`, audit), never under the catch-all.
#[test]
fn a_stall_held_for_an_unknown_name_goes_to_the_named_policy_once_the_engine_answers() {
    let test = "a_stall_held_for_an_unknown_name_goes_to_the_named_policy_once_the_engine_answers";
    let Some(()) = require_v1(test) else {
        return;
    };
    let mut s = Scratch::new("late-name");
    s.cgroup("docker", None, false);
    let id = "f".repeat(64);
    let cg = s.cgroup(&format!("docker/{id}"), Some(32 * MIB), true);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    let engine = MuteEngine::start_waking(
        &sock,
        Some((Duration::from_secs(3), id.clone(), "db-1".to_string())),
    );
    let glob = format!("{}/docker/*", s.rel);
    let db = format!(
        "name = \"db\"\nmode = \"audit\"\npriority = 50\n[match]\ncgroup = [\"{glob}\"]\ncontainer_name = [\"db-*\"]\n{KILL}"
    );
    let all = format!("name = \"all\"\npriority = 0\n[match]\ncgroup = [\"{glob}\"]\n{KILL}");
    let agent = Agent::start(
        &[("db.toml", &db), ("all.toml", &all)],
        &["--docker-socket", sock.to_str().unwrap()],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "48M", "--hold", "60s"]);
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(15));
    assert_eq!(oom["metadata"], "unknown", "{oom}");
    // The engine answers: the cgroup goes to `db`, and the held stall is taken up
    // again under it.
    let by_db = agent
        .wait_for(Duration::from_secs(30), |v| {
            v["cgroup"] == cg.rel.as_str() && v["event"] == "unresolved" && v["policy"] == "db"
        })
        .unwrap_or_else(|| {
            panic!(
                "the stall was not taken up under db; audit:\n{:?}\nlog:\n{}",
                agent.audit(),
                agent.log()
            )
        });
    assert_eq!(by_db["container_name"], "db-1", "{by_db}");
    for a in agent.events("action", &cg.rel) {
        assert_eq!(a["outcome"], "would", "{a}");
    }
    assert!(s.alive(hog.pid), "killed; audit:\n{:?}", agent.audit());
    assert!(cg.under_oom());
    for l in agent
        .audit()
        .iter()
        .filter(|v| v["cgroup"] == cg.rel.as_str())
    {
        eprintln!("{test}: {l}");
    }
    drop(agent);
    drop(s);
    drop(engine);
}

/// Issue 16.4: at hold expiry, a loan made by a policy that matches by container name
/// resumes under that policy (the keeper chooses with the container's metadata), not
/// "no policy matches the cgroup any more". The engine is the fake one, answering.
#[test]
fn hold_expiry_resumes_the_episode_of_a_policy_that_matches_by_container_name() {
    let test = "hold_expiry_resumes_the_episode_of_a_policy_that_matches_by_container_name";
    let Some(()) = require_v1(test) else {
        return;
    };
    let mut s = Scratch::new("resume-name");
    s.cgroup("docker", None, false);
    let id = "a1".repeat(32);
    let cg = s.cgroup(&format!("docker/{id}"), Some(32 * MIB), true);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    let engine = MuteEngine::start_waking(
        &sock,
        Some((Duration::ZERO, id.clone(), "db-1".to_string())),
    );
    let glob = format!("{}/docker/*", s.rel);
    let db = format!(
        "name = \"db\"\npriority = 50\n[match]\ncgroup = [\"{glob}\"]\ncontainer_name = [\"db-*\"]\n\n[[step]]\naction = \"raise_limit\"\nby = \"50%\"\nmax_extra = \"100%\"\nhold = \"1s\"\n\n[[step]]\naction = \"reclaim\"\n"
    );
    let agent = Agent::start(
        &[("db.toml", &db)],
        &["--docker-socket", sock.to_str().unwrap()],
    );
    let w = agent.expect("watch", &cg.rel, Duration::from_secs(15));
    assert_eq!(w["policy"], "db", "{w}");
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "60s"]);
    assert!(
        hog.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(r["by_action"], "raise_limit", "{r}");
    // The hold (1 s) expires with 40 MiB still used against 32: the episode resumes.
    let resumed = agent
        .wait_for(Duration::from_secs(15), |v| {
            v["cgroup"] == cg.rel.as_str() && v["event"] == "oom" && v["resumed"] == true
        })
        .unwrap_or_else(|| {
            panic!(
                "the episode was not resumed at hold expiry; audit:\n{:?}\nlog:\n{}",
                agent.audit(),
                agent.log()
            )
        });
    assert_eq!(resumed["policy"], "db", "{resumed}");
    assert_eq!(resumed["start_step"], 1, "{resumed}");
    assert!(
        !agent
            .log()
            .contains("no policy matches the cgroup any more"),
        "{}",
        agent.log()
    );
    drop(agent);
    drop(s);
    drop(engine);
}
