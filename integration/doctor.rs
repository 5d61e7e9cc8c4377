//! `oomwake doctor` on real cgroups (root, cgroup v1): each kind of risk is found in a
//! scratch tree, only what is below `--cgroup-root` is reported (other tests' cgroups
//! exist meanwhile), the exit status tells scripts what it found, and `--json` is
//! machine-readable.

use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn doctor(root: &std::path::Path, dir: &std::path::Path, json: bool) -> (i32, String) {
    let mut cmd = Command::new(oomwake_bin());
    cmd.arg("doctor")
        .arg("--cgroup-root")
        .arg(root)
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--insecure-policies");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run oomwake doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn loan(cgroup: &str) -> oomwake::journal::LoanRecord {
    let limits = |m: u64| oomwake::cgroup::Limits {
        memory: m,
        memsw: None,
        high: None,
    };
    oomwake::journal::LoanRecord {
        cgroup: oomwake::cgroup::CgroupPath::new(cgroup),
        policy: "app".into(),
        episode: 42,
        original: limits(64 * MIB),
        lent: limits(96 * MIB),
        change: None,
        started_unix_ms: 1,
        hold_until_unix_ms: u64::MAX / 2,
        restore_below_bytes: 0,
        restore_after_ms: 0,
        resume_step: 1,
        identity: None,
    }
}

#[test]
fn doctor_finds_each_risk_below_its_root_and_exits_for_scripts() {
    let name = "doctor_finds_each_risk_below_its_root_and_exits_for_scripts";
    let Some(()) = require_v1(name) else { return };
    let mut s = Scratch::new("doctor");
    // The scratch root is the doctor's root: globs are relative to it.
    let _free = s.cgroup("free", None, true);
    let _orphan = s.cgroup("orphan", Some(32 * MIB), true);
    let app = s.cgroup("app", Some(64 * MIB), true);
    let _killable = s.cgroup("killable", Some(32 * MIB), false);
    // 16 MiB used in /app: its early threshold at 10% (6.4 MiB) is below usage.
    let hog = s.hog(&app, &["--touch", "16M", "--hold", "60s"]);
    assert!(hog.report(std::time::Duration::from_secs(20)).is_some());
    let steps = "[[step]]\naction = \"reclaim\"\n";
    let dir = Agent::dir(&[
        (
            "app.toml",
            &format!(
                "name = \"app\"\n[match]\ncgroup = [\"/app\"]\n{steps}[early]\nat = \"10%\"\n[[early.step]]\naction = \"reclaim\"\n"
            ),
        ),
        (
            "ghost.toml",
            &format!("name = \"ghost\"\n[match]\ncgroup = [\"/nothing-here\"]\n{steps}"),
        ),
    ]);
    let journal = oomwake::journal::Journal::open(&dir.path().join("state")).unwrap();
    journal.put(&loan("/app")).unwrap();
    journal.sync().unwrap();

    let (code, out) = doctor(&s.dir, dir.path(), true);
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut got: Vec<(String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let what = f["cgroup"].as_str().or(f["policy"].as_str()).unwrap_or("");
            (f["kind"].as_str().unwrap().to_string(), what.to_string())
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = [
        ("early_cannot_work", "/app"),
        ("loan_outstanding", "/app"),
        ("policy_matches_nothing", "ghost"),
        ("uncovered", "/orphan"),
        ("unlimited_kill_disabled", "/free"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{out}");
    // The scratch root and its four children.
    assert_eq!(v["scanned"], 5, "{out}");

    // The text form says the same, one line each.
    let (code, text) = doctor(&s.dir, dir.path(), false);
    assert_eq!(code, 1);
    assert!(text.contains("uncovered /orphan: "), "{text}");
    assert!(text.contains("5 findings"), "{text}");

    // Fixed: every risk gone, exit 0.
    std::fs::remove_dir(s.dir.join("free")).unwrap();
    write(&s.dir.join("orphan/memory.oom_control"), "0");
    std::fs::remove_file(dir.path().join("policies/ghost.toml")).unwrap();
    std::fs::write(
        dir.path().join("policies/app.toml"),
        format!("name = \"app\"\n[match]\ncgroup = [\"/app\"]\n{steps}"),
    )
    .unwrap();
    journal.remove(&loan("/app").cgroup).unwrap();
    journal.sync().unwrap();
    let (code, text) = doctor(&s.dir, dir.path(), false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("nothing found"), "{text}");

    // Cannot scan: exit 2.
    let (code, _) = doctor(&s.dir.join("no-such-cgroup"), dir.path(), false);
    assert_eq!(code, 2);
}
