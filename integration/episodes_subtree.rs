//! One stall at a time per subtree, on real cgroups: a deep tree under one limit gets
//! one kill per stall, and nested limits do not get two episodes killing at once.

use std::time::Duration;

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
