//! SIGHUP re-reads the config as well as the policies: live settings (dry_run here)
//! take effect, restart-only ones are named in a warning and kept, and anything invalid
//! or untrusted (a bad config, a dangling policy link, a world-writable dir) keeps the
//! whole running set (root, cgroup v1).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::common::*;

fn status(agent: &Agent) -> Value {
    serde_json::from_str(&read(&agent.tmp.path().join("state/status.json"))).unwrap_or_default()
}

/// Sends SIGHUP and waits for the agent's log to report the outcome (the n-th time).
fn reload(agent: &Agent, n: usize) -> String {
    agent.signal(Signal::SIGHUP);
    let done = wait_until(Duration::from_secs(20), || {
        let log = agent.log();
        log.matches("reloaded: ").count() + log.matches("reload refused").count() >= n
    });
    assert!(done, "no reload outcome in the log:\n{}", agent.log());
    agent.log()
}

#[test]
fn sighup_applies_the_config_and_keeps_everything_on_an_invalid_one() {
    let Some(()) = require_v1("sighup_applies_the_config_and_keeps_everything_on_an_invalid_one")
    else {
        return;
    };
    let mut s = Scratch::new("reloadcfg");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let mut agent = Agent::start(&[("p.toml", &policy("first", &cg.rel, "", RAISE))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    // status.json is written by the event loop a moment after the first watch line.
    let ok = wait_until(Duration::from_secs(10), || {
        status(&agent)["dry_run"] == false
    });
    assert!(ok, "status before reload: {}", status(&agent));
    let cfg = agent.tmp.path().join("oomwake.toml");

    // dry_run can change live; the worker pool cannot (warned about, old value kept).
    // (state_dir would not do: the command line's --state-dir wins over the file.)
    write(&cfg, "dry_run = true\nworkers = 3\n");
    let log = reload(&agent, 1);
    assert!(log.contains("reloaded: 1 policy"), "{log}");
    assert!(
        log.contains("only after a restart: workers (keeping 16)"),
        "{log}"
    );
    let ok = wait_until(Duration::from_secs(10), || {
        status(&agent)["dry_run"] == true
    });
    assert!(ok, "status after reload: {}", status(&agent));

    // The mode change shows in the audit log: the next stall is only reported.
    let hog = s.hog(&cg, &["--touch", "40M", "--hold", "30s"]);
    cg.wait_stuck(hog.pid);
    let act = agent.expect("action", &cg.rel, Duration::from_secs(10));
    assert_eq!(act["mode"], "audit", "{act}");
    assert_eq!(act["outcome"], "would", "{act}");
    assert_eq!(cg.limit(), 32 * MIB, "dry run changed the limit");
    s.kill_hog(hog.pid);

    // An invalid config keeps everything: the old policies (not the renamed one) and
    // the old dry_run.
    write(
        &agent.tmp.path().join("policies/p.toml"),
        &policy("second", &cg.rel, "", RAISE),
    );
    write(&cfg, "dry_run = false\nsweep_interval = \"0ms\"\n");
    let log = reload(&agent, 2);
    assert!(log.contains("reload refused"), "{log}");
    assert!(log.contains("sweep_interval"), "{log}");
    assert_eq!(status(&agent)["policies"][0], "first");
    assert_eq!(status(&agent)["dry_run"], true);
    assert!(agent.running());
}

#[test]
fn sighup_keeps_the_old_policies_when_a_file_dangles_or_the_dir_is_untrusted() {
    let Some(()) =
        require_v1("sighup_keeps_the_old_policies_when_a_file_dangles_or_the_dir_is_untrusted")
    else {
        return;
    };
    let s = Scratch::new("reloadpol");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let mut agent = Agent::start(
        &[(
            "p.toml",
            &policy("audited", &cg.rel, "mode = \"audit\"", RAISE),
        )],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let dir = agent.tmp.path().join("policies");

    // The only policy file becomes a dangling link: not "no files", so no default.
    std::fs::remove_file(dir.join("p.toml")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/p.toml", dir.join("p.toml")).unwrap();
    let log = reload(&agent, 1);
    assert!(log.contains("reload refused"), "{log}");
    assert!(
        log.contains(&format!("{}: ", dir.join("p.toml").display())),
        "{log}"
    );
    assert_eq!(status(&agent)["policies"][0], "audited");

    // A valid file in a world-writable dir: refused too.
    std::fs::remove_file(dir.join("p.toml")).unwrap();
    write(&dir.join("p.toml"), &policy("planted", &cg.rel, "", RAISE));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = reload(&agent, 2);
    assert!(
        log.contains(&format!("chmod go-w {}", dir.display())),
        "{log}"
    );
    assert_eq!(status(&agent)["policies"][0], "audited");
    assert!(agent.running());
}

/// A FIFO named `*.toml` planted in the policies directory used to block the reload in
/// open(2) on the event loop, for good: refused at once now, and the next reload works.
#[test]
fn sighup_refuses_a_fifo_named_toml_without_blocking() {
    let Some(()) = require_v1("sighup_refuses_a_fifo_named_toml_without_blocking") else {
        return;
    };
    let s = Scratch::new("reloadfifo");
    let cg = s.cgroup("", Some(32 * MIB), true);
    let mut agent = Agent::start(
        &[(
            "p.toml",
            &policy("audited", &cg.rel, "mode = \"audit\"", RAISE),
        )],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let dir = agent.tmp.path().join("policies");
    let fifo = dir.join("q.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let log = reload(&agent, 1);
    assert!(log.contains("reload refused"), "{log}");
    assert!(
        log.contains(&format!("{}: a FIFO, not a regular file", fifo.display())),
        "{log}"
    );
    std::fs::remove_file(&fifo).unwrap();
    let log = reload(&agent, 2);
    assert!(log.contains("reloaded: 1 policy"), "{log}");
    assert_eq!(status(&agent)["policies"][0], "audited");
    assert!(agent.running());
}
