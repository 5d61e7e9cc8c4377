//! A scrape of a running agent after real stalls: the families a fleet alerts on carry
//! non-zero values, and `promtool check metrics` accepts the text; the stuck gauge
//! follows an unresolved stall (root, cgroup v1).
//! promtool is the one `.ci/run` unpacks; OOMWAKE_PROMTOOL points at it, and CI sets it
//! so the check cannot skip there.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const KILL: &str = r#"
[[step]]
action = "kill"
"#;

/// The address the agent says it serves metrics on (it was given port 0).
fn metrics_addr(agent: &Agent) -> Option<SocketAddr> {
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        found = agent.log().lines().find_map(|l| {
            let rest = l.split("serving metrics on http://").nth(1)?;
            rest.split('/').next()?.parse().ok()
        });
        found.is_some()
    });
    found
}

/// One `GET /metrics`: the status line and the body.
fn scrape(addr: SocketAddr) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: oomwake\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_scrape_after_real_stalls_passes_promtool() {
    let Some(()) = require_v1("a_scrape_after_real_stalls_passes_promtool") else {
        return;
    };
    let mut s = Scratch::new("scrape");
    let raise = s.cgroup("raise", Some(32 * MIB), true);
    let kill = s.cgroup("kill", Some(32 * MIB), true);
    let mut agent = Agent::start(
        &[
            ("raise.toml", &policy("scrape-raise", &raise.rel, "", LOAN)),
            ("kill.toml", &policy("scrape-kill", &kill.rel, "", KILL)),
        ],
        &["--metrics", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&agent).unwrap_or_else(|| panic!("no address; log:\n{}", agent.log()));

    // A stall resolved by a loan (stall histogram, loans outstanding) and one by a kill.
    let (_hog, _) = s.stall_resolved(&agent, &raise, &["--touch", "40M", "--hold", "60s"]);
    agent.expect("watch", &kill.rel, Duration::from_secs(10));
    let victim = s.hog(&kill, &["--touch", "40M", "--hold", "60s"]);
    agent.expect("resolved", &kill.rel, Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || !s.alive(victim.pid)),
        "the kill policy's victim lives"
    );

    let (status, body) = scrape(addr);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let r = "policy=\"scrape-raise\"";
    let k = "policy=\"scrape-kill\"";
    for (series, at_least) in [
        (format!("oomwake_oom_events_total{{{r}}}"), 1.0),
        (format!("oomwake_oom_events_total{{{k}}}"), 1.0),
        (format!("oomwake_stall_seconds_count{{{r}}}"), 1.0),
        (format!("oomwake_stall_seconds_count{{{k}}}"), 1.0),
        (format!("oomwake_kills_total{{{k}}}"), 1.0),
        (format!("oomwake_loans_outstanding{{{r}}}"), 1.0),
        (format!("oomwake_lent_bytes{{{r}}}"), 1.0),
        ("oomwake_raised_bytes".to_string(), 1.0),
        ("oomwake_watched_cgroups".to_string(), 2.0),
        (
            "oomwake_actions_total{action=\"raise_limit\",outcome=\"done\"}".to_string(),
            1.0,
        ),
        (
            "oomwake_actions_total{action=\"kill\",outcome=\"done\"}".to_string(),
            1.0,
        ),
        (
            format!(
                "oomwake_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ] {
        let v = sample(&body, &series);
        assert!(
            v.is_some_and(|v| v >= at_least),
            "{series} is {v:?}, expected >= {at_least}; scrape:\n{body}"
        );
    }
    assert!(
        body.contains("# TYPE oomwake_stall_seconds histogram"),
        "{body}"
    );

    match std::env::var_os("OOMWAKE_PROMTOOL") {
        Some(promtool) => {
            let mut child = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", promtool.to_string_lossy()));
            child
                .stdin
                .take()
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {:?}\n{}{}\nscrape:\n{body}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!(
                "promtool check metrics: ok ({} lines)",
                body.lines().count()
            );
        }
        None => eprintln!("promtool check skipped: OOMWAKE_PROMTOOL is not set"),
    }
    agent.stop();
}

/// Issue 9: `oomwake_stuck_cgroups{policy}` counts a stall the policy cannot resolve
/// while it lasts, and goes back to 0 when it ends (here by itself).
#[test]
fn the_stuck_gauge_counts_an_unresolved_stall_while_it_lasts() {
    let Some(()) = require_v1("the_stuck_gauge_counts_an_unresolved_stall_while_it_lasts") else {
        return;
    };
    let capped = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_limit = "32M"
hold = "60s"
"#;
    let mut s = Scratch::new("gauge");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(
        &[("p.toml", &policy("capped", &cg.rel, "", capped))],
        &["--metrics", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&agent).unwrap_or_else(|| panic!("no address; log:\n{}", agent.log()));
    let gauge = || sample(&scrape(addr).1, "oomwake_stuck_cgroups{policy=\"capped\"}");
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "120s"]);
    cg.wait_stuck(hog.pid);
    agent.expect("unresolved", &cg.rel, Duration::from_secs(10));
    // Set by the sweep (1 s).
    assert!(
        wait_until(Duration::from_secs(5), || gauge() == Some(1.0)),
        "gauge {:?}",
        gauge()
    );
    s.kill_hog(hog.pid);
    agent.expect("resolved", &cg.rel, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || gauge() == Some(0.0)),
        "gauge {:?}",
        gauge()
    );
}
