//! `exec`: run a command (no shell) with the episode in its environment, bounded by a
//! timeout after which the command is killed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Env, Outcome, Report, StepCtx};

pub fn run(env: &Env, ctx: &StepCtx, command: &[String], timeout: Duration) -> Report {
    let Some((prog, args)) = command.split_first() else {
        return Report::failed("empty command");
    };
    if ctx.audit {
        return Report::new(Outcome::Would).with("command", command.to_vec());
    }
    let dir = env.ctl.hierarchy().dir(ctx.cgroup);
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .env("OOMWAKE_CGROUP", ctx.cgroup.as_str())
        .env("OOMWAKE_CGROUP_DIR", &dir)
        .env("OOMWAKE_POLICY", &ctx.policy.name)
        .env("OOMWAKE_EPISODE", ctx.episode.to_string())
        .env("OOMWAKE_STEP", ctx.step.to_string())
        .env("OOMWAKE_MODE", if ctx.audit { "audit" } else { "enforce" });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Report::failed(format!("{prog}: {e}")).with("command", command.to_vec()),
    };
    // The agent shields itself with oom_score_adj -1000, which children inherit; a hook
    // must not be unkillable. (Raising the value needs no privilege.)
    let adj = env
        .proc_root
        .join(child.id().to_string())
        .join("oom_score_adj");
    if let Err(e) = std::fs::write(&adj, "0") {
        log::debug!("{}: {e}", adj.display());
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline || (ctx.cancelled)() => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Report::failed(format!("waiting for {prog}: {e}"))
                    .with("command", command.to_vec())
            }
        }
    };
    match status {
        Some(st) => {
            let code = st.code();
            let mut r = if st.success() {
                Report::new(Outcome::Done)
            } else {
                Report::failed(format!("{prog} exited with {st}"))
            };
            // A hook may well have fixed things even when it failed: wait and see.
            r.changed = true;
            r.with("command", command.to_vec())
                .with("exit_code", code.map(i64::from))
        }
        None => {
            // Our own unreaped child: its PID cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            let why = if (ctx.cancelled)() {
                format!("{prog} killed: the agent is stopping")
            } else {
                format!("{prog} timed out after {timeout:?}")
            };
            Report::failed(why)
                .with("command", command.to_vec())
                .with("exit_code", serde_json::Value::Null)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::action::testing;
    use crate::cgroup::CgroupPath;
    use crate::policy::PolicySet;

    #[test]
    fn runs_with_env_and_reports_exit_code() {
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/docker/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let out = t.path().join("out");
        let script = format!(
            "echo $OOMWAKE_CGROUP $OOMWAKE_POLICY $OOMWAKE_EPISODE $OOMWAKE_STEP > {}; exit 3",
            out.display()
        );
        let cmd = vec!["/bin/sh".to_string(), "-c".to_string(), script];
        let r = run(&env, &ctx, &cmd, Duration::from_secs(10));
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.fields["exit_code"], 3);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "/docker/x embedded-default 42 3"
        );
        let r = run(
            &env,
            &ctx,
            &["/bin/true".to_string()],
            Duration::from_secs(10),
        );
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(r.fields["exit_code"], 0);
        let audit = testing::ctx(&cg, &set.policies()[0], true);
        assert_eq!(
            run(&env, &audit, &cmd, Duration::from_secs(1)).outcome,
            Outcome::Would
        );
    }

    #[test]
    fn timeout_kills_the_command() {
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let start = Instant::now();
        let cmd = vec!["/bin/sleep".to_string(), "30".to_string()];
        let r = run(&env, &ctx, &cmd, Duration::from_millis(200));
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.error.unwrap().contains("timed out"));
        assert!(start.elapsed() < Duration::from_secs(10));
        let missing = vec!["/nonexistent/prog".to_string()];
        assert_eq!(
            run(&env, &ctx, &missing, Duration::from_secs(1)).outcome,
            Outcome::Failed
        );
    }
}
