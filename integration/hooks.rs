//! What an exec hook inherits from the agent, and the agent as PID 1 of a container
//! (root, cgroup v1).

use std::time::Duration;

use crate::common::*;

/// Prints what the hook inherited: its open-file limits, oom_score_adj, and its
/// shell's blocked and ignored signals.
const REPORT_HOOK: &str = r#"
[[step]]
action = "exec"
command = ["/bin/sh", "-c", "echo $(ulimit -Sn) $(ulimit -Hn) $(cat /proc/self/oom_score_adj); grep -E '^Sig(Blk|Ign)' /proc/$$/status"]
timeout = "5s"
settle = "10ms"
"#;

/// The soft open-file limit the agent is started with here (below the hard limit, which
/// the agent raises its own soft limit to).
const START_SOFT: u64 = 777;

/// The agent raises its soft RLIMIT_NOFILE to the hard limit at start (a descriptor per
/// watched cgroup); a hook gets the soft limit the agent started with, not the raised
/// one, oom_score_adj 0 (not the agent's shield), and no blocked or ignored signal.
/// Before the fix the hook printed the raised limit (the hard one).
#[test]
fn a_hook_gets_the_open_file_limit_the_agent_started_with() {
    let Some(()) = require_v1("a_hook_gets_the_open_file_limit_the_agent_started_with") else {
        return;
    };
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    assert!(hard > START_SOFT, "hard open-file limit {hard} too low");
    let mut s = Scratch::new("nofile");
    let cg = s.cgroup("w", Some(32 * MIB), true);
    // The agent's root is the scratch tree: its paths start there.
    let tmp = Agent::dir(&[(
        "p.toml",
        &policy("nofile", "/w", "", &format!("{REPORT_HOOK}{LOAN}")),
    )]);
    let soft = format!("--nofile={START_SOFT}:");
    let agent = Agent::start_wrapped(tmp, &s.dir, &["prlimit", &soft, "--"], &[], &[]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    // prlimit execs the agent: same process. It raised its own soft limit.
    let limits = read(std::path::Path::new(&format!(
        "/proc/{}/limits",
        agent.child.id()
    )));
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(open_files, format!("{hard} {hard}"), "{limits}");
    let _hog = s.hog(&cg, &["--touch", "40M", "--hold", "30s"]);
    let exec = agent
        .wait_for(Duration::from_secs(30), |v| {
            v["event"] == "action" && v["action"] == "exec" && v["cgroup"] == "/w"
        })
        .unwrap_or_else(|| panic!("no exec action; log:\n{}", agent.log()));
    let out = exec["stdout"].as_str().unwrap_or_default().to_string();
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("{START_SOFT} {hard} 0").as_str()),
        "the hook's soft and hard open-file limits and oom_score_adj: {exec}"
    );
    for l in lines {
        let (name, mask) = l.split_once(':').unwrap();
        assert_eq!(
            mask.trim(),
            "0000000000000000",
            "{name} of the hook: {exec}; the agent's: {}",
            read(std::path::Path::new(&format!(
                "/proc/{}/status",
                agent.child.id()
            )))
            .lines()
            .filter(|l| l.starts_with("Sig"))
            .collect::<Vec<_>>()
            .join(" ")
        );
    }
    agent.expect("resolved", "/w", Duration::from_secs(30));
}
