//! One stall at a time per subtree, on real cgroups: a deep tree under one limit gets
//! one kill per stall, and nested limits do not get two episodes killing at once.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn deep_tree_one_victim_per_stall() {
    let Some(()) = require_v1("deep_tree_one_victim_per_stall") else {
        return;
    };
    let mut s = Scratch::new("deep");
    let top = s.cgroup("", Some(48 * MIB), true);
    // Thirty levels below the limit, every one with oom_kill_disable (watched, so the
    // eventfd of each fires with the top's).
    let mut sub = String::new();
    for i in 0..30 {
        if !sub.is_empty() {
            sub.push('/');
        }
        sub.push_str(&format!("l{i}"));
        s.cgroup(&sub, None, true);
    }
    let leaf = s.cgroup(&sub, None, true);
    let text = format!(
        "name = \"deep\"\n[match]\ncgroup = [\"{}\", \"{}/**\"]\n{KILL}",
        top.rel, top.rel
    );
    let agent = Agent::start(&[("p.toml", &text)], &[]);
    agent.expect("watch", &leaf.rel, Duration::from_secs(20));
    let small = s.hog(
        &leaf,
        &["--touch", "16M", "--hold", "120s", "--tag", "small"],
    );
    assert!(small.report(Duration::from_secs(10)).is_some());
    let rounds = 3;
    for round in 0..rounds {
        let big = s.hog(&leaf, &["--touch", "40M", "--hold", "120s", "--tag", "big"]);
        // The stall ends with the big one killed.
        assert!(
            wait_until(Duration::from_secs(20), || !s.alive(big.pid)),
            "round {round}: big hog never killed; log:\n{}",
            agent.log()
        );
        assert_eq!(s.exit_signal(big.pid), Some(libc::SIGKILL));
        // Let any second episode (the bug) have its go.
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            s.alive(small.pid),
            "round {round}: a second kill took the small hog; audit:\n{:#?}",
            agent.audit()
        );
    }
    let kills: Vec<_> = agent
        .audit()
        .into_iter()
        .filter(|v| v["event"] == "action" && v["outcome"] == "done")
        .collect();
    assert_eq!(kills.len(), rounds, "one victim per stall: {kills:#?}");
}

#[test]
fn nested_limits_one_episode_at_a_time() {
    let Some(()) = require_v1("nested_limits_one_episode_at_a_time") else {
        return;
    };
    let mut s = Scratch::new("nested");
    let p = s.cgroup("", Some(64 * MIB), true);
    let c = s.cgroup("c", Some(32 * MIB), true);
    let o = s.cgroup("o", None, true);
    // C's episode is slow before it kills: P's stall arrives meanwhile.
    let c_steps = r#"
[[step]]
action = "exec"
command = ["/bin/sleep", "4"]
timeout = "10s"
settle = "100ms"

[[step]]
action = "kill"
victim = "largest_rss"
"#;
    let agent = Agent::start(
        &[
            ("c.toml", &policy("child", &c.rel, "", c_steps)),
            ("p.toml", &policy("parent", &p.rel, "", KILL)),
        ],
        &[],
    );
    agent.expect("watch", &c.rel, Duration::from_secs(10));
    agent.expect("watch", &p.rel, Duration::from_secs(10));
    let h1 = s.hog(&c, &["--touch", "40M", "--hold", "120s", "--tag", "in-c"]);
    agent.expect("oom", &c.rel, Duration::from_secs(10));
    // Now P: 32 MiB in C plus this one's 40 MiB is above P's 64 MiB.
    let h2 = s.hog(&o, &["--touch", "40M", "--hold", "120s", "--tag", "in-o"]);
    assert!(
        wait_until(Duration::from_secs(10), || p.under_oom()
            || !s.alive(h2.pid)),
        "P never stalled"
    );
    // C's episode kills inside C; that ends P's stall too: nobody else dies.
    assert!(
        h2.report(Duration::from_secs(20)).is_some(),
        "the hog outside C never finished; audit:\n{:#?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
    assert_eq!(s.exit_signal(h1.pid), Some(libc::SIGKILL));
    std::thread::sleep(Duration::from_secs(2));
    assert!(s.alive(h2.pid), "audit:\n{:#?}", agent.audit());
    let kills: Vec<_> = agent
        .audit()
        .into_iter()
        .filter(|v| v["event"] == "action" && v["action"] == "kill" && v["outcome"] == "done")
        .collect();
    assert_eq!(kills.len(), 1, "{kills:#?}");
    assert_eq!(kills[0]["cgroup"], c.rel.as_str());
}

/// A child's own stall right after its parent's episode resolved is a new stall (issue
/// 16.8): it starts at once, not after the tail window of the parent's stall, and its
/// `stalled_ms` counts from when it began.
#[test]
fn a_childs_own_stall_right_after_its_parents_episode_starts_at_once() {
    let Some(()) = require_v1("a_childs_own_stall_right_after_its_parents_episode_starts_at_once")
    else {
        return;
    };
    let mut s = Scratch::new("childwall");
    let p = s.cgroup("", Some(64 * MIB), true);
    let c = s.cgroup("c", Some(32 * MIB), true);
    let o = s.cgroup("o", None, true);
    let agent = Agent::start(
        &[
            ("c.toml", &policy("child", &c.rel, "", KILL)),
            ("p.toml", &policy("parent", &p.rel, "", KILL)),
        ],
        &[],
    );
    agent.expect("watch", &c.rel, Duration::from_secs(10));
    agent.expect("watch", &p.rel, Duration::from_secs(10));
    // 24 MiB in C, under its own 32 MiB; then 48 MiB in O: P is at its 64 MiB.
    let resident = s.hog(&c, &["--touch", "24M", "--hold", "120s", "--tag", "c-1"]);
    assert!(resident.report(Duration::from_secs(10)).is_some());
    let big = s.hog(&o, &["--touch", "48M", "--hold", "120s", "--tag", "o"]);
    // P's episode kills the largest (the one in O) and resolves.
    agent.expect("resolved", &p.rel, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || !s.alive(big.pid)));
    assert!(!c.under_oom(), "C still marked after P's stall");
    // At once (well within the second after P's episode), C reaches its own limit.
    let extra = s.hog(&c, &["--touch", "16M", "--hold", "120s", "--tag", "c-2"]);
    let joined = std::time::SystemTime::now();
    // Watched closely: the agent may end the stall within a millisecond.
    let (mut oom_at, mut out_at) = (None, None);
    let end = Instant::now() + Duration::from_secs(10);
    while out_at.is_none() && Instant::now() < end {
        let marked = c.under_oom();
        if marked && oom_at.is_none() {
            oom_at = Some(Instant::now());
        }
        if !marked && oom_at.is_some() {
            out_at = Some(Instant::now());
        }
        if oom_at.is_none() && !s.alive(extra.pid) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let oom = agent.expect("oom", &c.rel, Duration::from_secs(10));
    let r = agent.expect("resolved", &c.rel, Duration::from_secs(10));
    let ts = |v: &serde_json::Value| {
        humantime::parse_rfc3339(v["ts"].as_str().unwrap_or_default()).expect("ts")
    };
    let took = ts(&r).duration_since(joined).unwrap_or_default();
    assert!(
        took < Duration::from_millis(500),
        "C's own stall was resolved {took:?} after its hog joined (taken for the tail of P's stall?); oom {oom}\nresolved {r}\naudit:\n{:#?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
    // The stall as reported is not shorter than the one the test saw (with a margin
    // for the test's own polling).
    if let (Some(a), Some(b)) = (oom_at, out_at) {
        let seen = b - a;
        let stalled = r["stalled_ms"].as_f64().unwrap_or(0.0);
        assert!(
            stalled + 50.0 >= seen.as_secs_f64() * 1e3,
            "stalled_ms {stalled} but the test saw a stall of {seen:?}: {r}"
        );
    }
    assert_eq!(r["by_action"], "kill", "{r}");
    assert!(
        !s.alive(resident.pid) || !s.alive(extra.pid),
        "nobody in C was killed"
    );
}
