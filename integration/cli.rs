//! `oomwake check` and `explain` as users run them: exit codes and messages.

use std::process::Command;

use crate::common::oomwake_bin;

fn check(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(oomwake_bin())
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_policies() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let (code, out, err) = check(&["--policies", dir]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for name in ["default", "go-service", "cache", "batch-worker"] {
        assert!(
            out.contains(&format!("ok: {name} ")),
            "{name} missing in:\n{out}"
        );
    }
    assert!(out.contains("    early at 80%: raise_limit\n"), "{out}");
}

#[test]
fn check_reports_file_line_col_and_exits_1() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.toml");
    let bad = t.path().join("bad.toml");
    std::fs::write(
        &good,
        "[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"reclaim\"\n",
    )
    .unwrap();
    std::fs::write(
        &bad,
        "[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"kill\"\nprefer = [\"(oops\"]\n",
    )
    .unwrap();
    let (code, out, _) = check(&[good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("ok: good"), "{out}");
    let (code, _, err) = check(&[good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let expect = format!("{}:5:10: invalid regex", bad.display());
    assert!(err.contains(&expect), "expected {expect:?} in:\n{err}");
}

#[test]
fn check_usage_error_exits_2() {
    let (code, _, err) = check(&["--policies", "/tmp", "/tmp/x.toml"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = check(&["--bogus"]);
    assert_eq!(code, 2);
}

#[test]
fn run_refuses_invalid_policies() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("x.toml"),
        "[match]\ncgroup = [\"/a\"]\n[[step]]\naction = \"nope\"\n",
    )
    .unwrap();
    let out = Command::new(oomwake_bin())
        .arg("run")
        .arg("--config")
        .arg(t.path().join("none.toml"))
        .arg("--policies")
        .arg(t.path())
        .arg("--state-dir")
        .arg(t.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.toml:4:10: "), "{err}");
    assert!(err.contains("not starting"), "{err}");
}

#[test]
fn explain_names_the_policy_and_its_steps() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("api.toml"),
        "priority = 5\n[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"20%\"\n",
    )
    .unwrap();
    let out = Command::new(oomwake_bin())
        .args(["explain", "--policies"])
        .arg(t.path())
        .arg("--cgroup-root")
        .arg(t.path())
        .arg("/docker/abc")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policy: api"), "{text}");
    assert!(text.contains("step 0: raise_limit"), "{text}");
}
