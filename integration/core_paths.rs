//! Cgroup paths as the kernel has them: names that are not UTF-8 are cgroups like any
//! other, and no path read from outside (the journal) leaves the agent's root
//! (root, cgroup v1).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::common::*;

/// A stuck cgroup named `bad\xff` (and the task in its child) is watched, rescued, and
/// named in the audit log in the escaped text form, which reads back to the same bytes.
#[test]
fn non_utf8_cgroup_is_rescued_and_audited_escaped() {
    let Some(()) = require_v1("non_utf8_cgroup_is_rescued_and_audited_escaped") else {
        return;
    };
    let mut s = Scratch::new("bytes");
    let bad_dir = s.dir.join(OsStr::from_bytes(b"bad\xff"));
    std::fs::create_dir(&bad_dir).unwrap();
    write(
        &bad_dir.join("memory.limit_in_bytes"),
        &(32 * MIB).to_string(),
    );
    write(&bad_dir.join("memory.oom_control"), "1");
    std::fs::create_dir(bad_dir.join("w")).unwrap();
    // The text form of the cgroup, as globs, the audit log and `explain` write it.
    let bad_rel = format!("{}/bad\\xff", s.rel);
    // A TOML literal string: the backslash is the escape of the byte, not TOML's.
    let pol = format!("name = \"bytes\"\n[match]\ncgroup = ['{bad_rel}']\n{KILL}");
    let agent = Agent::start(&[("p.toml", &pol)], &[]);
    agent.expect("watch", &bad_rel, Duration::from_secs(10));

    // The hog takes its cgroup as a UTF-8 argument: join through a symlink.
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("w");
    std::os::unix::fs::symlink(bad_dir.join("w"), &link).unwrap();
    let child = Cg {
        rel: format!("{bad_rel}/w"),
        dir: link,
    };
    let hog = s.hog(&child, &["--touch", "48M", "--hold", "30s"]);
    let resolved = agent.expect("resolved", &bad_rel, Duration::from_secs(20));
    assert_eq!(resolved["by_action"], "kill", "{resolved}");
    let act = &agent.events("action", &bad_rel)[0];
    assert_eq!(act["outcome"], "done", "{act}");
    assert_eq!(act["pid"], hog.pid, "{act}");
    assert_eq!(act["victim_cgroup"], format!("{bad_rel}/w"), "{act}");
    assert!(
        wait_until(Duration::from_secs(10), || !s.alive(hog.pid)),
        "the victim survived"
    );
    // The audit file is UTF-8 JSON Lines, and its cgroup reads back to the real bytes.
    let text = std::fs::read(agent.tmp.path().join("audit.jsonl")).unwrap();
    let text = String::from_utf8(text).expect("the audit log is UTF-8");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let back: oomwake::cgroup::CgroupPath =
        serde_json::from_value(resolved["cgroup"].clone()).unwrap();
    assert_eq!(
        back.as_bytes(),
        format!("{}/bad", s.rel)
            .bytes()
            .chain([0xff])
            .collect::<Vec<u8>>()
    );
}

/// A journal naming `/../victim` would make the agent restore a limit outside its root:
/// the sibling of the subtree it manages. The path is refused at start, with the file
/// named, and the sibling keeps its limit.
#[test]
fn journal_path_leaving_the_root_is_refused() {
    let Some(()) = require_v1("journal_path_leaving_the_root_is_refused") else {
        return;
    };
    let s = Scratch::new("escape");
    let managed = s.cgroup("managed", None, false);
    let victim = s.cgroup("victim", Some(64 * MIB), false);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("policies")).unwrap();
    std::fs::create_dir(tmp.path().join("state")).unwrap();
    // An expired loan: a start would give "back" 16 MiB to the cgroup it names.
    let line = serde_json::json!({
        "op": "put",
        "loan": {
            "cgroup": "/../victim",
            "policy": "p",
            "episode": 1,
            "original": {"memory": 16 * MIB, "memsw": null},
            "lent": {"memory": 64 * MIB, "memsw": null},
            "started_unix_ms": 1,
            "hold_until_unix_ms": 2,
            "restore_below_bytes": 0,
            "restore_after_ms": 0,
            "resume_step": 0
        }
    });
    write(&tmp.path().join("state/loans.log"), &format!("{line}\n"));
    let mut agent = Agent::start_in_root(tmp, &managed.dir, &[]);
    // Refusing to start, or starting with the journal moved aside: either way it says
    // why, naming the file, within a few seconds.
    let said = wait_until(Duration::from_secs(10), || {
        let log = agent.log();
        log.contains("loans.log") && log.contains("leave the hierarchy root")
    });
    assert!(said, "no clear message; log:\n{}", agent.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        victim.limit(),
        64 * MIB,
        "a limit outside the root was written"
    );
    let _ = agent.running();
}

/// `explain` takes a cgroup path from the command line: `..` is a usage error, before
/// anything else is read (runs anywhere, no root).
#[test]
fn explain_refuses_a_path_leaving_the_root() {
    let out = std::process::Command::new(oomwake_bin())
        .args(["explain", "--policies", "/nonexistent", "/docker/../../etc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leave the hierarchy root"), "{err}");
}

/// Issue 16.19: the control files an episode needs are kept open per cgroup directory.
/// A v1 cgroup removed and made again at the same path left them open on the old one:
/// the next read got ENODEV and took the new cgroup for gone. Now the read goes to the
/// cgroup at the path; and a loan of the old one is never given back onto the new one
/// (its identity differs, see loans_failure).
#[test]
fn a_cgroup_made_again_at_a_prepared_path_is_read_not_taken_for_gone() {
    use oomwake::cgroup::{v1::V1, CgroupPath, Controller, Hierarchy};
    let Some(()) = require_v1("a_cgroup_made_again_at_a_prepared_path_is_read_not_taken_for_gone")
    else {
        return;
    };
    let s = Scratch::new("prepared");
    let cg = s.cgroup("c", Some(32 * MIB), true);
    let h =
        Hierarchy::detect(std::path::Path::new(MEMROOT), std::path::Path::new("/proc")).unwrap();
    let ctl = V1::new(h);
    let path = CgroupPath::new(&cg.rel);
    ctl.prepare(&path);
    assert_eq!(ctl.limits(&path).unwrap().map(|l| l.memory), Some(32 * MIB));
    std::fs::remove_dir(&cg.dir).unwrap();
    let cg = s.cgroup("c", Some(48 * MIB), true);
    assert_eq!(
        ctl.limits(&path).unwrap().map(|l| l.memory),
        Some(48 * MIB),
        "the cgroup made again at the path was taken for gone"
    );
    assert!(!ctl.oom_state(&path).unwrap().unwrap().under_oom);
    std::fs::remove_dir(&cg.dir).unwrap();
    assert_eq!(ctl.limits(&path).unwrap(), None, "really gone");
}
