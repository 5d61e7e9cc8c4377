//! What the agent trusts and how the command line reports problems: StrictModes on the
//! policies dir, the config and the state dir; unreadable policy files; warnings with
//! positions; `explain` of a missing cgroup; `status` of a dead agent; an error's cause
//! printed once; the warning of an agent that cannot set its own `oom_score_adj`. The
//! `run` cases need root and the v1 hierarchy (the agent starts on it with a policy
//! that matches nothing and in dry-run mode, so it can change nothing).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn oomwake(args: &[&str]) -> (i32, String, String) {
    text(&Command::new(oomwake_bin()).args(args).output().unwrap())
}

/// A policy no cgroup has: an agent running it changes nothing.
fn inert_policy(mode: &str) -> String {
    format!(
        "mode = \"{mode}\"\n[match]\ncgroup = [\"/oomwake-policy-test-matches-nothing-{}\"]\n[[step]]\naction = \"kill\"\n",
        std::process::id()
    )
}

/// `oomwake run` in `dir` (policies/, state/, oomwake.toml), dry-run, bounded: returns
/// the exit code and stderr, or None (and stops it) if it was still running after
/// `wait` (it started).
fn run_agent(dir: &Path, extra: &[&str], wait: Duration) -> (Option<i32>, String) {
    run_agent_via(&[], dir, extra, wait)
}

/// [`run_agent`] started through `wrapper` (a command and its arguments, such as
/// setpriv's), which execs the agent.
fn run_agent_via(
    wrapper: &[&str],
    dir: &Path,
    extra: &[&str],
    wait: Duration,
) -> (Option<i32>, String) {
    run_agent_inner(wrapper, dir, extra, wait, &|| false)
}

/// [`run_agent`] that stops waiting (and stops the agent) as soon as it has written its
/// `status.json`, i.e. started for good: bounded by `max`, not a fixed sleep that a slow
/// machine (the emulated VM) can overrun.
fn run_agent_until_started(dir: &Path, extra: &[&str], max: Duration) -> (Option<i32>, String) {
    let status = dir.join("state/status.json");
    run_agent_inner(&[], dir, extra, max, &|| status.exists())
}

fn run_agent_inner(
    wrapper: &[&str],
    dir: &Path,
    extra: &[&str],
    wait: Duration,
    started: &dyn Fn() -> bool,
) -> (Option<i32>, String) {
    let log = dir.join("agent.log");
    let mut cmd = match wrapper.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(oomwake_bin());
            c
        }
        None => Command::new(oomwake_bin()),
    };
    let mut child = cmd
        .arg("run")
        .arg("--config")
        .arg(dir.join("oomwake.toml"))
        .arg("--cgroup-root")
        .arg(MEMROOT)
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .arg("--dry-run")
        .args(extra)
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut code = None;
    wait_until(wait, || {
        code = child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1));
        code.is_some() || started()
    });
    if code.is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if !wait_until(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        }) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    (code, read(&log))
}

fn agent_dir(policy: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("policies");
    std::fs::create_dir(&p).unwrap();
    chmod(&p, 0o755);
    std::fs::write(p.join("inert.toml"), policy).unwrap();
    chmod(&p.join("inert.toml"), 0o644);
    t
}

#[test]
fn run_refuses_a_world_writable_policies_dir_unless_insecure() {
    let Some(()) = require_v1("run_refuses_a_world_writable_policies_dir_unless_insecure") else {
        return;
    };
    let t = agent_dir(&inert_policy("audit"));
    let dir = t.path().join("policies");
    chmod(&dir, 0o777);
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it started:\n{log}");
    assert!(log.contains("writable by group or others"), "{log}");
    assert!(
        log.contains(&format!("chmod go-w {}", dir.display())),
        "{log}"
    );
    assert!(log.contains("--insecure-policies"), "{log}");
    assert!(log.contains("not starting"), "{log}");

    // For development: it starts (and says what it is doing).
    let (code, log) =
        run_agent_until_started(t.path(), &["--insecure-policies"], Duration::from_secs(30));
    assert_eq!(code, None, "it did not start:\n{log}");
    assert!(log.contains("--insecure-policies"), "{log}");
    assert!(t.path().join("state/status.json").exists(), "{log}");
}

#[test]
fn run_refuses_a_world_writable_config_or_state_dir() {
    let Some(()) = require_v1("run_refuses_a_world_writable_config_or_state_dir") else {
        return;
    };
    let t = agent_dir(&inert_policy("audit"));
    let cfg = t.path().join("oomwake.toml");
    std::fs::write(&cfg, "sweep_interval = \"1s\"\n").unwrap();
    chmod(&cfg, 0o646);
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it started:\n{log}");
    assert!(
        log.contains(&format!("chmod go-w {}", cfg.display())),
        "{log}"
    );
    chmod(&cfg, 0o644);
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o777);
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it started:\n{log}");
    assert!(
        log.contains(&format!("chmod go-w {}", state.display())),
        "{log}"
    );
}

/// Root appends to the audit log: a link planted there (pointing at a file root owns)
/// or a file another user owns must not be written.
#[test]
fn run_refuses_an_audit_log_that_is_a_link_or_not_roots() {
    let Some(()) = require_v1("run_refuses_an_audit_log_that_is_a_link_or_not_roots") else {
        return;
    };
    let t = agent_dir(&inert_policy("audit"));
    let victim = t.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let log_path = t.path().join("audit.jsonl");
    std::os::unix::fs::symlink(&victim, &log_path).unwrap();
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it started:\n{log}");
    assert_eq!(read(&victim), "precious\n", "the link's target was written");

    std::fs::remove_file(&log_path).unwrap();
    std::fs::write(&log_path, "").unwrap();
    nix::unistd::chown(&log_path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it started:\n{log}");
    assert!(log.contains("the audit log"), "{log}");
    assert_eq!(read(&log_path), "", "a file another user owns was written");
}

/// 6.19: an agent that cannot set its own `oom_score_adj` to -1000 (no
/// CAP_SYS_RESOURCE) says so as a warning, not at debug level, and still runs.
#[test]
fn run_warns_when_it_cannot_shield_itself_from_the_oom_killer() {
    let Some(()) = require_v1("run_warns_when_it_cannot_shield_itself_from_the_oom_killer") else {
        return;
    };
    let t = agent_dir(&inert_policy("audit"));
    let status = t.path().join("state/status.json");
    let (code, log) = run_agent_inner(
        &[
            "setpriv",
            "--bounding-set",
            "-sys_resource",
            "--inh-caps",
            "-all",
            "--",
        ],
        t.path(),
        &[],
        Duration::from_secs(30),
        &|| status.exists(),
    );
    assert_eq!(code, None, "it did not keep running:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("oom_score_adj")),
        "no warning about oom_score_adj:\n{log}"
    );
}

#[test]
fn run_refuses_a_policies_dir_whose_only_file_is_unreadable() {
    let Some(()) = require_v1("run_refuses_a_policies_dir_whose_only_file_is_unreadable") else {
        return;
    };
    // The operator's audit-only policy is a link that dangles: the embedded default
    // (enforce, kill) must not take over.
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("policies");
    std::fs::create_dir(&p).unwrap();
    std::os::unix::fs::symlink("/nonexistent/audit.toml", p.join("audit.toml")).unwrap();
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it started:\n{log}");
    assert!(
        log.contains(&format!("{}: ", p.join("audit.toml").display())),
        "{log}"
    );
    assert!(!log.contains("embedded default"), "{log}");
}

#[test]
fn check_refuses_untrusted_files_and_explains_the_fix() {
    let t = agent_dir(&inert_policy("enforce"));
    let dir = t.path().join("policies");
    let dir_s = dir.to_str().unwrap();
    let (code, out, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 0, "{out}{err}");
    chmod(&dir.join("inert.toml"), 0o666);
    let (code, _, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 1, "{err}");
    let f = dir.join("inert.toml");
    assert!(
        err.contains(&format!("chmod go-w {}", f.display())),
        "{err}"
    );
    let (code, _, err) = oomwake(&["check", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = oomwake(&["check", "--insecure-policies", "--policies", dir_s]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn check_fails_on_a_dangling_link_or_a_loop_instead_of_using_the_default() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let dir_s = dir.to_str().unwrap();
    std::os::unix::fs::symlink(dir.join("gone.toml"), dir.join("audit.toml")).unwrap();
    let (code, out, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!out.contains("embedded default"), "{out}");
    assert!(
        err.contains(&format!("{}: ", dir.join("audit.toml").display())),
        "{err}"
    );
    std::fs::remove_file(dir.join("audit.toml")).unwrap();
    std::fs::write(dir.join("audit.toml"), inert_policy("audit")).unwrap();
    std::os::unix::fs::symlink(dir.join("loop.toml"), dir.join("loop.toml")).unwrap();
    let (code, out, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("loop.toml: "), "{err}");
    std::fs::remove_file(dir.join("loop.toml")).unwrap();
    let (code, out, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 0, "{out}{err}");
    // A directory that really has no *.toml: the default applies, and check says so.
    let empty = tempfile::tempdir().unwrap();
    let (code, out, _) = oomwake(&["check", "--policies", empty.path().to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("embedded default"), "{out}");
}

#[test]
fn check_reports_nonsense_values_with_positions() {
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[match]\ncgroup = [\"/a\"]\n[[step]]\naction = \"signal\"\nsignal = \"SIGSTOP\"\n",
    )
    .unwrap();
    let (code, _, err) = oomwake(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}:5:10: ", bad.display())), "{err}");
    let warn = t.path().join("warn.toml");
    std::fs::write(
        &warn,
        "[match]\ncgroup = [\"/a\"]\n[[step]]\naction = \"signal\"\ngrace = \"0s\"\n",
    )
    .unwrap();
    let (code, out, err) = oomwake(&["check", warn.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!("{}:5:9: warning: ", warn.display())),
        "{err}"
    );
}

#[test]
fn explain_of_a_missing_cgroup_exits_1() {
    let Some(()) = require_v1("explain_of_a_missing_cgroup_exits_1") else {
        return;
    };
    let t = agent_dir(&inert_policy("audit"));
    let (code, out, err) = oomwake(&[
        "explain",
        "--policies",
        t.path().join("policies").to_str().unwrap(),
        "--cgroup-root",
        MEMROOT,
        "/nonexistent-oomwake-cgroup",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("/nonexistent-oomwake-cgroup: no such cgroup under"),
        "{err}"
    );
    // An existing cgroup still explains with exit 0.
    let (code, out, err) = oomwake(&[
        "explain",
        "--policies",
        t.path().join("policies").to_str().unwrap(),
        "--cgroup-root",
        MEMROOT,
        "/",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

fn status_of(pid: u32) -> (i32, String, String) {
    let t = tempfile::tempdir().unwrap();
    let status = serde_json::json!({
        "pid": pid, "running": true, "updated": "2026-01-01T00:00:00.000Z",
        "cgroup_root": "/sys/fs/cgroup/memory", "policies": [], "dry_run": false,
        "watched": [], "episodes_running": [], "loans": []
    });
    std::fs::write(t.path().join("status.json"), status.to_string()).unwrap();
    oomwake(&["status", "--state-dir", t.path().to_str().unwrap()])
}

#[test]
fn status_does_not_take_a_zombie_or_another_program_for_the_agent() {
    // A child that has exited but is not reaped: a zombie with our pid's /proc entry.
    let mut child = Command::new(oomwake_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let zombie = wait_until(Duration::from_secs(10), || proc_state(pid as i32) == "Z");
    assert!(zombie, "child never became a zombie");
    let (code, out, err) = status_of(pid);
    let _ = child.wait();
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("oomwake not running"), "{out}");
    // A live process that is not oomwake (the pid was reused): this test binary.
    let (code, out, err) = status_of(std::process::id());
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("oomwake not running"), "{out}");
}

#[test]
fn a_fatal_error_prints_its_cause_once() {
    let t = agent_dir(&inert_policy("audit"));
    let (code, _, err) = oomwake(&[
        "run",
        "--dry-run",
        "--config",
        t.path().join("none.toml").to_str().unwrap(),
        "--policies",
        t.path().join("policies").to_str().unwrap(),
        "--state-dir",
        t.path().join("state").to_str().unwrap(),
        "--cgroup-root",
        "/nonexistent/oomwake-root",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/oomwake-root"), "{err}");
    let cause = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    assert_eq!(err.matches(&cause).count(), 1, "{err}");
}

/// `oomwake ARGS`, stopped (by its PID) if it has not exited within `limit`: None then.
fn oomwake_within(args: &[&str], limit: Duration) -> Option<(i32, String, String)> {
    let mut child = Command::new(oomwake_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    exited.then(|| text(&out))
}

/// A FIFO named `*.toml` used to block `check` (and a reload, on the agent's event loop)
/// in open(2); another user's link in the directory was judged by its target only.
#[test]
fn check_refuses_a_fifo_and_a_link_another_user_owns_without_blocking() {
    let t = agent_dir(&inert_policy("audit"));
    let dir = t.path().join("policies");
    let dir_s = dir.to_str().unwrap();
    let fifo = dir.join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let (code, out, err) = oomwake_within(&["check", "--policies", dir_s], Duration::from_secs(20))
        .expect("check blocked on a FIFO named *.toml");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("{}: a FIFO, not a regular file", fifo.display())),
        "{err}"
    );
    std::fs::remove_file(&fifo).unwrap();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped the link case: needs root to chown");
        return;
    }
    // A link to root's own policy, but owned by uid 65534: they can point it anywhere.
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(dir.join("inert.toml"), &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let (code, out, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "{}: a symbolic link owned by uid 65534",
            link.display()
        )),
        "{err}"
    );
    std::fs::remove_file(&link).unwrap();
    let (code, out, err) = oomwake(&["check", "--policies", dir_s]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A hook another user owns ran as root after they rewrote it; `restore_below = "0%"`
/// kept a loan for good. Both are refused by `check`, at the value's position.
#[test]
fn check_refuses_an_untrusted_hook_and_an_unreachable_restore_below_at_their_positions() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let hook = t.path().join("hook");
    std::fs::write(&hook, "#!/bin/sh\ntrue\n").unwrap();
    chmod(&hook, 0o755);
    std::os::unix::fs::chown(&hook, Some(65534), Some(65534)).unwrap();
    let p = t.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[match]\ncgroup = [\"/a\"]\n[[step]]\naction = \"exec\"\ncommand = [\"{}\"]\n",
            hook.display()
        ),
    )
    .unwrap();
    let (code, out, err) = oomwake(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "{}:5:11: {}: owned by uid 65534",
            p.display(),
            hook.display()
        )),
        "{err}"
    );
    let (code, out, err) = oomwake(&["check", "--insecure-policies", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(
        &p,
        "[match]\ncgroup = [\"/a\"]\n[[step]]\naction = \"raise_limit\"\nby = \"10%\"\nmax_extra = \"25%\"\nrestore_below = \"0%\"\n",
    )
    .unwrap();
    let (code, out, err) = oomwake(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("{}:7:17: ", p.display())) && err.contains("never be reached"),
        "{err}"
    );
}

/// The config file is read like a policy file: a FIFO put in its place used to block
/// the agent's start (and a SIGHUP reload) for good.
#[test]
fn run_refuses_a_config_that_is_a_fifo_without_blocking() {
    let t = agent_dir(&inert_policy("audit"));
    let cfg = t.path().join("oomwake.toml");
    nix::unistd::mkfifo(&cfg, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let (code, log) = run_agent(t.path(), &[], Duration::from_secs(20));
    assert_eq!(code, Some(1), "it did not exit:\n{log}");
    assert!(
        log.contains(&format!("{}: a FIFO, not a regular file", cfg.display())),
        "{log}"
    );
    assert!(log.contains("not starting"), "{log}");
}

/// `oomwake check` takes a `kernel_oom_kill` step and refuses the keys it does not take
/// (the kernel chooses the victim), at the key's position; the shipped sidecar policy
/// and the Docker example pass.
#[test]
fn check_validates_kernel_oom_kill_steps() {
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join("sidecar.toml");
    std::fs::write(
        &bad,
        "[match]\ncgroup = [\"/pod\"]\n[[step]]\naction = \"kernel_oom_kill\"\nvictim = \"largest_rss\"\n",
    )
    .unwrap();
    let (code, out, err) = oomwake(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("sidecar.toml:5:10: key `victim` does not apply to action `kernel_oom_kill`: the kernel chooses the victim itself"),
        "{err}"
    );
    let root = env!("CARGO_MANIFEST_DIR");
    if !Path::new(root)
        .join("packaging/docker/policies/api.toml")
        .exists()
    {
        // The VM carries the binaries, not the repository.
        return;
    }
    let (code, out, err) = oomwake(&[
        "check",
        &format!("{root}/policies/sidecar.toml"),
        &format!("{root}/packaging/docker/policies/api.toml"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sidecar") && out.contains("kill -> kernel_oom_kill"),
        "{out}"
    );
    assert!(
        out.contains("raise_limit -> signal -> kill -> kernel_oom_kill"),
        "{out}"
    );
}
