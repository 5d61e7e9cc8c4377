//! Loans under failure, on real cgroups (root, cgroup v1): a crash between the journal
//! and the limit write, a crash between the memsw and the memory write, a damaged
//! journal, a dry run that finds loans, a workload that does not fit at hold expiry,
//! a reload that renames or removes the policy that lent, a limit someone else changed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn no_given_up(agent: &Agent, cg: &str) {
    let g = agent.events("loan_given_up", cg);
    assert!(g.is_empty(), "loan given up: {g:?}\nlog:\n{}", agent.log());
}

/// Starts an agent with the EXTENDING policy (named "up") on `cg` and `rec` as the only
/// line of its journal, as a crashed agent would have left it.
fn start_with_journaled_loan(cg: &Cg, rec: &serde_json::Value) -> Agent {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policies")).unwrap();
    std::fs::create_dir_all(tmp.path().join("state")).unwrap();
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("up", &cg.rel, "", EXTENDING),
    )
    .unwrap();
    std::fs::write(tmp.path().join("state/loans.log"), format!("{rec}\n")).unwrap();
    Agent::start_in(tmp, &[])
}

const EXTENDING: &str = r#"
[[step]]
action = "raise_limit"
by = "25%"
max_extra = "100%"
hold = "5m"
restore_after = "300ms"
"#;

/// 6.5: the agent lends, extends, and is aborted between the journal append of the
/// extension and its limit write. After a restart the loan is re-adopted with the
/// first original and the cgroup gets its real limit back.
#[test]
fn extension_aborted_between_journal_and_write_gives_back_the_first_limit() {
    let Some(()) =
        require_v1("extension_aborted_between_journal_and_write_gives_back_the_first_limit")
    else {
        return;
    };
    let mut s = Scratch::new("abortext");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("ext", &cg.rel, "", EXTENDING),
    )
    .unwrap();
    // The second pass (the extension) aborts right after its journal append.
    let mut agent =
        Agent::start_in_env(tmp, &[], &[("OOMWAKE_FAULT", "after_journal_put:abort:2")]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let hog = s.hog(&cg, &["--touch", "44M", "--hold", "60s"]);
    assert!(
        wait_until(Duration::from_secs(20), || !agent.running()),
        "the agent did not abort; log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("aborting at after_journal_put"));
    assert_eq!(cg.limit(), 40 * MIB, "the first loan stands");
    let journal = agent.journal();
    assert!(
        journal.contains(&(50 * MIB).to_string()),
        "the extension is journaled: {journal}"
    );
    assert!(cg.under_oom(), "the workload waits for the extension");
    let agent = Agent::start_in(agent.crash(), &[]);
    assert!(
        hog.report(Duration::from_secs(20)).is_some(),
        "the restarted agent did not rescue the workload; log:\n{}",
        agent.log()
    );
    s.kill_hog(hog.pid);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(15));
    assert_eq!(restore["new_limit"], 32 * MIB);
    assert_eq!(cg.limit(), 32 * MIB);
    no_given_up(&agent, &cg.rel);
}

/// 7.1 (on the way up) and 7.2: the agent crashed after raising memsw and before
/// raising memory. The next start takes the half-raised memsw as its own and gives it
/// back, instead of dropping the loan as changed by someone else.
#[test]
fn memsw_left_raised_by_a_crash_is_given_back_at_start() {
    let Some(()) = require_v1("memsw_left_raised_by_a_crash_is_given_back_at_start") else {
        return;
    };
    let s = Scratch::new("halfup");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let sw = cg.dir.join("memory.memsw.limit_in_bytes");
    if !sw.exists() {
        eprintln!(
            "memsw_left_raised_by_a_crash_is_given_back_at_start: skipped: no swap accounting"
        );
        return;
    }
    write(&sw, &(48 * MIB).to_string());
    // The raise as journaled before its writes; the hold is long over.
    let rec = serde_json::json!({"op": "put", "loan": {
        "cgroup": cg.rel, "policy": "up", "episode": 1,
        "original": {"memory": 32 * MIB, "memsw": 32 * MIB},
        "lent": {"memory": 48 * MIB, "memsw": 48 * MIB},
        "started_unix_ms": 1, "hold_until_unix_ms": 2,
        "restore_below_bytes": 29 * MIB, "restore_after_ms": 300, "resume_step": 1}});
    let agent = start_with_journaled_loan(&cg, &rec);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(10));
    assert_eq!(restore["reason"], "startup");
    assert_eq!(cg.limit(), 32 * MIB);
    assert_eq!(read(&sw).trim(), (32 * MIB).to_string());
    no_given_up(&agent, &cg.rel);
}

/// Issue 16.14: a loan belongs to the cgroup lent to, not to its path. A cgroup removed
/// while the agent was down and made again at the same path, whose limit happens to
/// equal the lent one, is another cgroup: the next start gives the loan up ("cgroup
/// replaced") and leaves the new cgroup's limit alone. (Before, the path and the limit
/// matched, so the new cgroup was "given back" the old one's original.)
#[test]
fn a_cgroup_made_again_at_a_loans_path_is_not_restored_onto() {
    use std::os::unix::fs::MetadataExt;
    let Some(()) = require_v1("a_cgroup_made_again_at_a_loans_path_is_not_restored_onto") else {
        return;
    };
    let s = Scratch::new("remade");
    let cg = s.cgroup("c", Some(32 * MIB), true);
    let lent_to = std::fs::metadata(&cg.dir).unwrap().ino();
    // The agent lent 8 MiB to that cgroup, then went down; meanwhile the cgroup was
    // removed and made again with the lent value as its limit.
    std::fs::remove_dir(&cg.dir).unwrap();
    let cg = s.cgroup("c", Some(40 * MIB), true);
    assert_ne!(std::fs::metadata(&cg.dir).unwrap().ino(), lent_to);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let rec = serde_json::json!({"op": "put", "loan": {
        "cgroup": cg.rel, "policy": "up", "episode": 1,
        "original": {"memory": 32 * MIB, "memsw": null},
        "lent": {"memory": 40 * MIB, "memsw": null},
        "started_unix_ms": 1, "hold_until_unix_ms": 2,
        "restore_below_bytes": 29 * MIB, "restore_after_ms": 300, "resume_step": 1,
        "identity": {"ino": lent_to, "boot": boot.trim()}}});
    let agent = start_with_journaled_loan(&cg, &rec);
    let g = agent.expect("loan_given_up", &cg.rel, Duration::from_secs(10));
    assert_eq!(g["reason"], "cgroup replaced", "{g}");
    assert_eq!(g["current_limit"], 40 * MIB, "{g}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        agent.events("restore", &cg.rel).is_empty(),
        "{}",
        agent.log()
    );
    assert_eq!(cg.limit(), 40 * MIB, "the new cgroup's limit was changed");
    assert_forgotten(&agent, &cg);
}

/// The loan of a real stall records the cgroup it was lent to.
#[test]
fn a_loan_records_the_cgroup_it_was_lent_to() {
    use std::os::unix::fs::MetadataExt;
    let Some(()) = require_v1("a_loan_records_the_cgroup_it_was_lent_to") else {
        return;
    };
    let mut s = Scratch::new("lentto");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("g", &cg.rel, "", EXTENDING))], &[]);
    let _ = s.stall_resolved(&agent, &cg, &["--touch", "36M", "--hold", "60s"]);
    let ino = std::fs::metadata(&cg.dir).unwrap().ino();
    let journal = agent.journal();
    assert!(
        journal.contains(&format!("\"identity\":{{\"ino\":{ino},")),
        "the loan does not name the cgroup's inode {ino}:\n{journal}"
    );
}

/// 7.6: a journal that cannot be read does not keep the agent from starting: it is
/// moved aside, the audit log and `oomwake status` say so, and stalls are rescued.
#[test]
fn a_garbage_journal_is_moved_aside_and_the_agent_still_rescues() {
    let Some(()) = require_v1("a_garbage_journal_is_moved_aside_and_the_agent_still_rescues")
    else {
        return;
    };
    let mut s = Scratch::new("garbage");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policies")).unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("loans.json"), "{not json at all").unwrap();
    std::fs::write(state.join("loans.log"), b"\x00\x01garbage\n{\"op\":\n").unwrap();
    std::fs::write(
        tmp.path().join("policies/p.toml"),
        policy("g", &cg.rel, "", EXTENDING),
    )
    .unwrap();
    let agent = Agent::start_in(tmp, &[]);
    let corrupt = agent
        .wait_for(Duration::from_secs(10), |v| v["event"] == "journal_corrupt")
        .unwrap_or_else(|| panic!("no journal_corrupt line; log:\n{}", agent.log()));
    assert!(corrupt["moved_to"].as_str().unwrap().contains(".corrupt-"));
    let (_hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "30s"]);
    let names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for f in ["loans.json.corrupt-", "loans.log.corrupt-"] {
        assert!(names.iter().any(|n| n.starts_with(f)), "{f} in {names:?}");
    }
    let status = || {
        Command::new(oomwake_bin())
            .arg("status")
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || status().status.code()
            == Some(4)),
        "{:?}",
        status()
    );
    assert!(String::from_utf8_lossy(&status().stdout).contains("JOURNAL DAMAGED"));
}

/// 7.7: a dry run that finds journaled loans writes nothing: not at start, not in the
/// keeper, not at shutdown; it says what it would give back.
#[test]
fn a_dry_run_keeps_journaled_loans_and_writes_nothing() {
    let Some(()) = require_v1("a_dry_run_keeps_journaled_loans_and_writes_nothing") else {
        return;
    };
    let mut s = Scratch::new("dryloan");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("d", &cg.rel, "", EXTENDING))], &[]);
    let (hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "36M", "--hold", "60s"]);
    let dir = agent.crash();
    let lent = cg.limit();
    assert!(lent > 32 * MIB);
    // The workload shrinks: an enforcing agent would give the loan back within a second.
    s.kill_hog(hog.pid);
    let journal = journal_text(dir.path());
    let mut agent = Agent::start_in(dir, &["--dry-run"]);
    let would = agent.expect("restore", &cg.rel, Duration::from_secs(10));
    assert_eq!(would["outcome"], "would");
    assert_eq!(would["new_limit"], 32 * MIB);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cg.limit(), lent, "log:\n{}", agent.log());
    assert!(agent.stop().is_some_and(|st| st.success()));
    assert_eq!(cg.limit(), lent);
    assert_eq!(agent.journal(), journal, "the dry run wrote the journal");
}

/// 7.5: at hold expiry a workload that would fit under the original limit only just
/// (usage above `restore_below`) is not squeezed back to the wall: the episode resumes
/// at the step after raise_limit, and the limit comes back once usage is below the
/// margin.
#[test]
fn hold_expiry_below_the_limit_but_above_the_margin_resumes_instead_of_restoring() {
    let Some(()) =
        require_v1("hold_expiry_below_the_limit_but_above_the_margin_resumes_instead_of_restoring")
    else {
        return;
    };
    let mut s = Scratch::new("margin");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let steps = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "50%"
hold = "3s"
restore_below = "80%"

[[step]]
action = "kill"
victim = "largest_rss"
"#;
    let agent = Agent::start(&[("p.toml", &policy("margin", &cg.rel, "", steps))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    // 27 MiB that stay, and 10 MiB that push it over the wall and are then freed.
    let big = s.hog(&cg, &["--touch", "27M", "--hold", "60s"]);
    assert!(big.report(Duration::from_secs(10)).is_some());
    let burst = s.hog(
        &cg,
        &["--touch", "10M", "--hold", "200ms", "--free-after", "60s"],
    );
    assert!(
        burst.report(Duration::from_secs(15)).is_some(),
        "log:\n{}",
        agent.log()
    );
    agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(5), || cg.usage() < 31 * MIB),
        "usage {}",
        cg.usage()
    );
    let usage = cg.usage();
    assert!(
        usage > 26 * MIB,
        "usage {usage}: the test needs it above the margin"
    );
    let resumed = agent
        .wait_for(Duration::from_secs(15), |v| {
            v["event"] == "oom" && v["resumed"] == true
        })
        .unwrap_or_else(|| panic!("no resumed episode; audit:\n{:?}", agent.audit()));
    assert_eq!(resumed["start_step"], 1);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(15));
    assert_eq!(restore["new_limit"], 32 * MIB);
    let kill = agent
        .events("action", &cg.rel)
        .into_iter()
        .find(|a| a["action"] == "kill")
        .expect("kill action");
    assert_eq!(kill["pid"], big.pid);
    // Order in the audit log (timestamps may share a millisecond).
    let audit = agent.audit();
    let at = |v: &serde_json::Value| audit.iter().position(|a| a == v);
    assert!(
        at(&restore) > at(&kill),
        "restored before the workload fit: {restore} / {kill}"
    );
    assert_eq!(cg.limit(), 32 * MIB);
}

/// A loan held 4 s, then a kill: the policy the reload tests rename or remove.
const SHORT_LOAN_THEN_KILL: &str = r#"
[[step]]
action = "raise_limit"
by = "50%"
max_extra = "50%"
hold = "4s"

[[step]]
action = "kill"
victim = "largest_rss"
"#;

/// 6.7 and 7.16: a reload renames the policy that lent and puts a step before its
/// raise_limit. At hold expiry the loan still acts: the episode resumes with the policy
/// that matches the cgroup now, at the step after its raise_limit.
#[test]
fn a_loan_whose_policy_was_renamed_still_resumes_at_hold_expiry() {
    let Some(()) = require_v1("a_loan_whose_policy_was_renamed_still_resumes_at_hold_expiry")
    else {
        return;
    };
    let mut s = Scratch::new("renamed");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let raise_kill = SHORT_LOAN_THEN_KILL;
    let agent = Agent::start(
        &[("a.toml", &policy("first", &cg.rel, "", raise_kill))],
        &[],
    );
    let (hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "60s"]);
    let pdir = agent.tmp.path().join("policies");
    std::fs::remove_file(pdir.join("a.toml")).unwrap();
    let renamed = format!("[[step]]\naction = \"reclaim\"\n{raise_kill}");
    std::fs::write(pdir.join("b.toml"), policy("second", &cg.rel, "", &renamed)).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || agent.log().contains("reloaded")),
        "log:\n{}",
        agent.log()
    );
    let resumed = agent
        .wait_for(Duration::from_secs(15), |v| {
            v["event"] == "oom" && v["resumed"] == true
        })
        .unwrap_or_else(|| panic!("no resumed episode; log:\n{}", agent.log()));
    assert_eq!(resumed["policy"], "second");
    assert_eq!(resumed["start_step"], 2);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(15));
    assert_eq!(restore["new_limit"], 32 * MIB);
    assert_eq!(s.exit_signal(hog.pid), Some(libc::SIGKILL));
    assert!(Path::new(&cg.dir).exists());
}

/// 6.7, the other half: a reload removes the policy that lent, and no policy matches the
/// cgroup any more. At hold expiry the loan still acts: with no step to resume, it is
/// kept (with a warning) only while the workload does not fit, and given back at once
/// when it does, with a `restore` line that says `hold_expired`. Nothing kills meanwhile.
#[test]
fn a_loan_whose_policy_was_removed_is_given_back_at_hold_expiry() {
    let Some(()) = require_v1("a_loan_whose_policy_was_removed_is_given_back_at_hold_expiry")
    else {
        return;
    };
    let mut s = Scratch::new("removed");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let raise_kill = SHORT_LOAN_THEN_KILL;
    // A second policy for a cgroup that does not exist keeps the policies dir from
    // being empty after the removal (an empty dir would bring in the embedded default,
    // which matches everything).
    let elsewhere = format!("{}/elsewhere", cg.rel);
    let agent = Agent::start(
        &[
            ("a.toml", &policy("first", &cg.rel, "", raise_kill)),
            ("b.toml", &policy("other", &elsewhere, "", raise_kill)),
        ],
        &[],
    );
    let (hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "40M", "--hold", "60s"]);
    assert_eq!(cg.limit(), 48 * MIB, "the loan");
    let pdir = agent.tmp.path().join("policies");
    std::fs::remove_file(pdir.join("a.toml")).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || agent.log().contains("reloaded")),
        "log:\n{}",
        agent.log()
    );
    // Hold expiry finds the workload above the original limit and no policy to resume.
    assert!(
        wait_until(Duration::from_secs(15), || agent
            .log()
            .contains("no policy matches the cgroup any more (it was first)")),
        "no warning at hold expiry; log:\n{}",
        agent.log()
    );
    assert_eq!(
        cg.limit(),
        48 * MIB,
        "the loan is kept while the workload does not fit"
    );
    assert!(
        s.alive(hog.pid),
        "the hog was killed; log:\n{}",
        agent.log()
    );
    assert!(agent.events("restore", &cg.rel).is_empty());
    // The workload shrinks: the expired loan is given back without waiting for anything.
    s.kill_hog(hog.pid);
    let restore = agent.expect("restore", &cg.rel, Duration::from_secs(10));
    assert_eq!(restore["reason"], "hold_expired", "{restore}");
    assert_eq!(restore["old_limit"], 48 * MIB, "{restore}");
    assert_eq!(restore["new_limit"], 32 * MIB, "{restore}");
    assert_eq!(cg.limit(), 32 * MIB);
    no_given_up(&agent, &cg.rel);
    assert!(
        agent
            .events("oom", &cg.rel)
            .iter()
            .all(|v| v["resumed"] != true),
        "an episode resumed without a policy: {:?}",
        agent.events("oom", &cg.rel)
    );
    assert_forgotten(&agent, &cg);
}

/// 7.2: a limit that none of the loan's records explain was set by someone else: the
/// loan is given up, the audit log says so with the facts, the journal forgets it and
/// the other writer's limit stands (nothing lowers it onto the workload).
#[test]
fn a_limit_changed_by_someone_else_gives_the_loan_up_and_says_so() {
    let Some(()) = require_v1("a_limit_changed_by_someone_else_gives_the_loan_up_and_says_so")
    else {
        return;
    };
    let mut s = Scratch::new("givenup");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("g", &cg.rel, "", EXTENDING))], &[]);
    let (hog, _) = s.stall_resolved(&agent, &cg, &["--touch", "36M", "--hold", "60s"]);
    assert_eq!(cg.limit(), 40 * MIB, "the loan");
    assert!(agent.journal().contains(&cg.rel), "{}", agent.journal());
    // An operator raises the limit by hand (memsw first: it may not be below memory).
    let theirs = 96 * MIB;
    let sw = cg.dir.join("memory.memsw.limit_in_bytes");
    if sw.exists() {
        write(&sw, &theirs.to_string());
    }
    write(&cg.dir.join("memory.limit_in_bytes"), &theirs.to_string());
    // The workload shrinks: the keeper comes to give the loan back and finds the change.
    s.kill_hog(hog.pid);
    let g = agent.expect("loan_given_up", &cg.rel, Duration::from_secs(10));
    assert_eq!(g["original_limit"], 32 * MIB, "{g}");
    assert_eq!(g["lent_limit"], 40 * MIB, "{g}");
    assert_eq!(g["current_limit"], theirs, "{g}");
    assert_eq!(g["reason"], "limit changed by someone else", "{g}");
    assert!(agent.events("restore", &cg.rel).is_empty());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cg.limit(), theirs, "the other writer's limit was changed");
    assert_forgotten(&agent, &cg);
}

/// 6.6 (compute side) and 7.3, on the kernel itself: a raise computed far past the
/// kernel's maximum is clamped, recorded as the kernel read it back, and given back.
#[test]
fn an_absurd_raise_on_a_real_cgroup_is_clamped_and_given_back() {
    use oomwake::cgroup::{v1::V1, CgroupPath, Hierarchy};
    use oomwake::loan::{Lend, LoanBook, Restore};
    use oomwake::policy::{Amount, Ceiling, Raise};
    let Some(()) = require_v1("an_absurd_raise_on_a_real_cgroup_is_clamped_and_given_back") else {
        return;
    };
    let s = Scratch::new("absurd");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let h = Hierarchy::detect(Path::new(MEMROOT), Path::new("/proc")).unwrap();
    let ctl = V1::new(h);
    let path = CgroupPath::new(&cg.rel);
    let book = LoanBook::new(None);
    let r = Raise {
        by: Amount::Percent(1e28),
        ceiling: Ceiling::MaxExtra(Amount::Percent(1e28)),
        hold: Duration::from_secs(60),
        restore_below: 0.9,
        restore_after: Duration::ZERO,
    };
    let lent = book.lend(&ctl, &path, "p", &r, 1, 1, false).unwrap();
    let Lend::Raised { new, .. } = lent else {
        panic!("{lent:?}");
    };
    assert_eq!(new, cg.limit(), "recorded as the kernel holds it");
    assert_eq!(
        book.restore(&ctl, &path).unwrap(),
        Restore::Restored {
            old: new,
            new: 32 * MIB
        }
    );
    assert_eq!(cg.limit(), 32 * MIB);
}

/// The journal forgets `cg`'s loan within 5 s (an unreadable journal counts as not yet).
fn assert_forgotten(agent: &Agent, cg: &Cg) {
    let journaled = || {
        oomwake::journal::Journal::open(&agent.tmp.path().join("state"))
            .and_then(|j| j.load())
            .map(|recs| recs.iter().any(|r| r.cgroup.as_str() == cg.rel))
            .unwrap_or(true)
    };
    assert!(
        wait_until(Duration::from_secs(5), || !journaled()),
        "still journaled: {}",
        agent.journal()
    );
}
