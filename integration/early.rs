//! Early action on real cgroups (root, cgroup v1): a usage threshold below the wall
//! starts the policy's `[early]` steps before the workload reaches its limit. OOM
//! notifications are counted with an eventfd of the test's own, registered on the
//! cgroup before the workload starts, not with the agent's audit log.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::common::*;

/// The test's own OOM notification on a cgroup: counts every OOM the kernel reports
/// there, whatever the agent does.
struct OomCounter {
    efd: EventFd,
}

impl OomCounter {
    fn register(cg: &Cg) -> OomCounter {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .unwrap();
        let ctl = std::fs::File::open(cg.dir.join("memory.oom_control")).unwrap();
        let line = format!("{} {}", efd.as_fd().as_raw_fd(), ctl.as_raw_fd());
        write(&cg.dir.join("cgroup.event_control"), &line);
        OomCounter { efd }
    }

    /// OOM notifications since the last call.
    fn count(&self) -> u64 {
        self.efd.read().unwrap_or(0)
    }
}

/// Lend early at 75% of the limit, 50% at a time up to 200% extra; the OOM steps lend
/// too (a stall would be resolved, and counted).
const EARLY_LOAN: &str = r#"
[early]
at = "75%"
[[early.step]]
action = "raise_limit"
by = "50%"
max_extra = "200%"
hold = "60s"
restore_below = "70%"
restore_after = "300ms"
settle = "100ms"

[[step]]
action = "raise_limit"
by = "50%"
max_extra = "200%"
hold = "60s"
restore_after = "300ms"
"#;

#[test]
fn early_loans_keep_a_growing_workload_out_of_the_oom_wait() {
    let Some(()) = require_v1("early_loans_keep_a_growing_workload_out_of_the_oom_wait") else {
        return;
    };
    let mut s = Scratch::new("early-grow");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let ooms = OomCounter::register(&cg);
    let agent = Agent::start(
        &[("p.toml", &policy("early", &cg.rel, "", EARLY_LOAN))],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    // 56 MiB at 100 MiB/s through thresholds at 24, 36 and 54 MiB (limits 32, 48, 72).
    // In the VM (integration/vm/run.sh sets OOMWAKE_VM) the kernel runs under software
    // emulation, some 10-50 times slower than here: 100 MiB/s crossed the 8 MiB from
    // threshold to limit before the agent's first write there (seen: early at 32.3 MiB
    // of 32), so the second kernel is asked the same question at 20 MiB/s.
    let rate = if std::env::var_os("OOMWAKE_VM").is_some() {
        "20M"
    } else {
        "100M"
    };
    let hog = s.hog(&cg, &["--touch", "56M", "--rate", rate, "--hold", "60s"]);
    let report = hog.report(Duration::from_secs(20));
    assert!(
        report.is_some(),
        "the hog never finished; log:\n{}",
        agent.log()
    );
    assert_eq!(
        ooms.count(),
        0,
        "the kernel reported an OOM; audit:\n{:#?}",
        agent.audit()
    );
    assert!(
        agent.events("oom", &cg.rel).is_empty(),
        "{:#?}",
        agent.audit()
    );
    // The last early episode may still be settling when the hog is done.
    let settled = wait_until(Duration::from_secs(5), || {
        agent.events("early", &cg.rel).len() == agent.events("early_resolved", &cg.rel).len()
    });
    assert!(settled, "{:#?}", agent.audit());
    let early = agent.events("early", &cg.rel);
    let resolved = agent.events("early_resolved", &cg.rel);
    assert!(early.len() >= 2, "{:#?}", agent.audit());
    assert_eq!(early[0]["threshold"], 24 * MIB);
    assert_eq!(early[0]["limit"], 32 * MIB);
    assert!(early[0]["headroom_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        early[1]["threshold"],
        36 * MIB,
        "the threshold followed the loan"
    );
    for r in &resolved {
        assert_eq!(r["by_action"], "raise_limit");
        assert!(r["took_ms"].as_f64().is_some(), "{r}");
    }
    let actions = agent.events("action", &cg.rel);
    assert!(actions.iter().all(|a| a["early"] == true), "{actions:#?}");
    assert!(cg.limit() >= 72 * MIB, "limit {}", cg.limit());
}

#[test]
fn early_threshold_follows_a_loan_and_its_restore() {
    let Some(()) = require_v1("early_threshold_follows_a_loan_and_its_restore") else {
        return;
    };
    let mut s = Scratch::new("early-follow");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(
        &[("p.toml", &policy("follow", &cg.rel, "", EARLY_LOAN))],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let ooms = OomCounter::register(&cg);
    // Past 24 MiB (75% of 32): the first early loan, to 48 MiB.
    let a = s.hog(&cg, &["--touch", "27M", "--hold", "600s"]);
    assert!(a.report(Duration::from_secs(10)).is_some());
    agent.expect("early_resolved", &cg.rel, Duration::from_secs(10));
    assert_eq!(cg.limit(), 48 * MIB);
    // Past 36 MiB (75% of the lent 48): fires only if the threshold was moved there
    // (the old one at 24 MiB is behind the workload and would never fire again).
    let b = s.hog(&cg, &["--touch", "12M", "--hold", "600s"]);
    assert!(b.report(Duration::from_secs(10)).is_some());
    let second = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["event"] == "early" && v["threshold"] == 36 * MIB
        })
        .unwrap_or_else(|| panic!("no early episode at 36 MiB: {:#?}", agent.audit()));
    assert_eq!(second["limit"], 48 * MIB);
    assert!(wait_until(Duration::from_secs(10), || cg.limit() == 72 * MIB));
    // Both gone: the loan goes back to 32 MiB, and the threshold with it to 24 MiB.
    s.kill_hog(a.pid);
    s.kill_hog(b.pid);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(15));
    assert_eq!(restore["new_limit"], 32 * MIB);
    assert_eq!(cg.limit(), 32 * MIB);
    let before = agent.events("early", &cg.rel).len();
    let c = s.hog(&cg, &["--touch", "27M", "--hold", "600s"]);
    assert!(c.report(Duration::from_secs(10)).is_some());
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .events("early", &cg.rel)
            .len()
            > before),
        "no early episode after the restore: {:#?}",
        agent.audit()
    );
    let third = agent.events("early", &cg.rel)[before].clone();
    assert_eq!(third["limit"], 32 * MIB, "{third}");
    assert_eq!(third["threshold"], 24 * MIB, "{third}");
    assert_eq!(ooms.count(), 0, "{:#?}", agent.audit());
    assert!(agent.events("oom", &cg.rel).is_empty());
}

#[test]
fn early_steps_that_cannot_keep_up_hand_over_to_the_oom_episode() {
    let Some(()) = require_v1("early_steps_that_cannot_keep_up_hand_over_to_the_oom_episode")
    else {
        return;
    };
    let mut s = Scratch::new("early-handover");
    let cg = s.cgroup("", Some(32 * MIB), true);
    // The early hook never gives memory back (a runtime that ignores the request);
    // the OOM steps lend.
    let steps = r#"
[early]
at = "75%"
[[early.step]]
action = "exec"
command = ["/bin/sleep", "30"]
timeout = "60s"

[[step]]
action = "raise_limit"
by = "50%"
max_extra = "100%"
hold = "60s"
"#;
    let agent = Agent::start(&[("p.toml", &policy("handover", &cg.rel, "", steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let ooms = OomCounter::register(&cg);
    // 20 MiB/s: 400 ms from the threshold to the wall, so the hook is surely running
    // when the wall is reached, even on a loaded machine.
    let hog = s.hog(&cg, &["--touch", "40M", "--rate", "20M", "--hold", "60s"]);
    // The hook would run 30 s: the hand-over must not wait for it.
    assert!(
        hog.report(Duration::from_secs(20)).is_some(),
        "the hog stayed stuck; log:\n{}",
        agent.log()
    );
    assert!(ooms.count() >= 1, "the workload did reach its wall");
    let handed = agent.expect("early_unresolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(handed["oom_follows"], true, "{handed}");
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(5));
    let resolved = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(resolved["by_action"], "raise_limit");
    assert_eq!(resolved["episode"], oom["episode"]);
    assert_ne!(oom["episode"], handed["episode"]);
    let hook = agent
        .events("action", &cg.rel)
        .into_iter()
        .find(|a| a["action"] == "exec")
        .unwrap_or_else(|| panic!("no exec line: {:#?}", agent.audit()));
    assert_eq!(hook["early"], true);
    assert_eq!(hook["outcome"], "failed");
    let why = hook["error"].as_str().unwrap_or("");
    assert!(why.contains("the limit was reached"), "{hook}");
    assert_eq!(cg.limit(), 48 * MIB);
}

#[test]
fn explain_shows_the_early_threshold_and_steps_of_a_live_cgroup() {
    let Some(()) = require_v1("explain_shows_the_early_threshold_and_steps_of_a_live_cgroup")
    else {
        return;
    };
    let s = Scratch::new("early-explain");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let t = Agent::dir(&[("p.toml", &policy("explained", &cg.rel, "", EARLY_LOAN))]);
    let out = std::process::Command::new(oomwake_bin())
        .arg("explain")
        .arg("--policies")
        .arg(t.path().join("policies"))
        .args(["--cgroup-root", MEMROOT, &cg.rel])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let want = format!(
        "early (75% of the limit): at usage {} bytes, it would:\nearly step 0: raise_limit -> would old_limit={} new_limit={}",
        24 * MIB,
        32 * MIB,
        48 * MIB
    );
    assert!(text.contains(&want), "{want:?} not in:\n{text}");
    assert_eq!(cg.limit(), 32 * MIB, "explain changes nothing");
}

#[test]
fn a_workload_hovering_at_the_threshold_starts_one_early_episode_a_second() {
    let Some(()) =
        require_v1("a_workload_hovering_at_the_threshold_starts_one_early_episode_a_second")
    else {
        return;
    };
    let mut s = Scratch::new("early-hover");
    let cg = s.cgroup("", Some(32 * MIB), true);
    // Audit mode: nothing moves the limit, so nothing moves the threshold either.
    let agent = Agent::start(
        &[(
            "p.toml",
            &policy("hover", &cg.rel, "mode = \"audit\"", EARLY_LOAN),
        )],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let base = s.hog(&cg, &["--touch", "22M", "--hold", "600s"]);
    assert!(base.report(Duration::from_secs(10)).is_some());
    // A file on tmpfs, written and removed again and again from inside the cgroup,
    // takes usage over 24 MiB and back many times a second.
    let shm = format!("/dev/shm/oomwake-it-hover-{}", std::process::id());
    let script = format!(
        "echo $$ > {}/cgroup.procs && i=0 && while [ $i -lt 40 ]; do \
         dd if=/dev/zero of={shm} bs=1M count=4 2>/dev/null; rm -f {shm}; i=$((i+1)); done; \
         echo done",
        cg.dir.display()
    );
    let start = std::time::Instant::now();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(&script);
    let (_, lines) = s.spawn(cmd);
    let finished = lines.recv_timeout(Duration::from_secs(30));
    let _ = std::fs::remove_file(&shm);
    assert_eq!(finished.as_deref(), Ok("done"));
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let early = agent.events("early", &cg.rel);
    assert!(!early.is_empty(), "{:#?}", agent.audit());
    // At most one per started second of crossings.
    let allowed = took.as_secs() as usize + 1;
    assert!(
        early.len() <= allowed,
        "{} early episodes in {took:?}: {:#?}",
        early.len(),
        early
    );
    assert!(agent
        .events("action", &cg.rel)
        .iter()
        .all(|a| a["outcome"] == "would"));
}
