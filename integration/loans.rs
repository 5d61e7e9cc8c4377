//! Lent limits are never lost: hold expiry resumes the episode, a crash leaves a journal
//! the next start acts on, SIGTERM gives loans back (root, cgroup v1).

use std::time::Duration;

use crate::common::*;

#[test]
fn hold_expiry_with_usage_too_high_resumes_at_the_next_step() {
    let Some(()) = require_v1("hold_expiry_with_usage_too_high_resumes_at_the_next_step") else {
        return;
    };
    let mut s = Scratch::new("hold");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let steps = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "50%"
hold = "1s"

[[step]]
action = "kill"
victim = "largest_rss"
"#;
    let agent = Agent::start(&[("p.toml", &policy("hold", &cg.rel, "", steps))], &[]);
    let (hog, first) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "60s"]);
    assert_eq!(first["by_action"], "raise_limit");
    // 40 MiB do not fit the original 32 MiB: at hold expiry the episode resumes at kill.
    let resumed = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["event"] == "oom" && v["resumed"] == true
        })
        .unwrap_or_else(|| panic!("no resumed episode; log:\n{}", agent.log()));
    assert_eq!(resumed["start_step"], 1);
    assert_eq!(resumed["episode"], first["episode"]);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(10));
    assert_eq!(restore["reason"], "hold_expired");
    assert_eq!(restore["new_limit"], 32 * MIB);
    assert_eq!(cg.limit(), 32 * MIB);
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    let kill = agent
        .events("action", &cg.rel)
        .into_iter()
        .find(|a| a["action"] == "kill")
        .expect("kill action");
    assert_eq!(kill["pid"], hog.pid);
}

const LONG_LOAN: &str = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "5m"
restore_after = "300ms"
"#;

#[test]
fn crash_then_restart_readopts_and_restores_the_loan() {
    let Some(()) = require_v1("crash_then_restart_readopts_and_restores_the_loan") else {
        return;
    };
    let mut s = Scratch::new("crash");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("long", &cg.rel, "", LONG_LOAN))], &[]);
    let (hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "60s"]);
    let dir = agent.crash();
    assert_eq!(
        cg.limit(),
        48 * MIB,
        "the lent limit stays while nobody holds it"
    );
    let journal = journal_text(dir.path());
    assert!(
        journal.contains(&cg.rel) && journal.contains(&(32 * MIB).to_string()),
        "{journal}"
    );
    // Restart on the same state; the workload then shrinks: the loan is given back.
    let agent = Agent::start_in(dir, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .log()
            .contains("re-adopted the loan")),
        "log:\n{}",
        agent.log()
    );
    s.kill_hog(hog.pid);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(10));
    assert_eq!(restore["reason"], "usage_below");
    assert_eq!(cg.limit(), 32 * MIB);
}

#[test]
fn sigterm_gives_loans_back_where_usage_allows() {
    let Some(()) = require_v1("sigterm_gives_loans_back_where_usage_allows") else {
        return;
    };
    let mut s = Scratch::new("term");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let steps = LONG_LOAN.replace("300ms", "5m");
    let mut agent = Agent::start(&[("p.toml", &policy("term", &cg.rel, "", &steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(
        &cg,
        &["--touch", "40M", "--hold", "500ms", "--free-after", "60s"],
    );
    assert!(
        hog.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    assert!(wait_until(Duration::from_secs(5), || cg.usage() < 16 * MIB));
    let status = agent.stop().expect("agent stops on SIGTERM");
    assert!(status.success(), "{status:?}; log:\n{}", agent.log());
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(1));
    assert_eq!(restore["reason"], "shutdown");
    assert_eq!(cg.limit(), 32 * MIB);
    let status = read(&agent.tmp.path().join("state/status.json"));
    assert!(
        status.contains("\"loans\": []") && status.contains("\"running\": false"),
        "{status}"
    );
}

#[test]
fn sigterm_with_usage_too_high_keeps_the_loan_journaled() {
    let Some(()) = require_v1("sigterm_with_usage_too_high_keeps_the_loan_journaled") else {
        return;
    };
    let mut s = Scratch::new("termbusy");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let mut agent = Agent::start(&[("p.toml", &policy("busy", &cg.rel, "", LONG_LOAN))], &[]);
    let (hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "60s"]);
    agent.stop().expect("agent stops on SIGTERM");
    assert!(
        agent.log().contains("stays in the journal"),
        "log:\n{}",
        agent.log()
    );
    assert_eq!(cg.limit(), 48 * MIB);
    assert!(agent.journal().contains(&cg.rel));
    assert!(s.alive(hog.pid), "shutdown never kills");
}
