//! `exec`: run a command (no shell) with the episode in its environment, bounded by a
//! timeout after which the command and everything it started are killed.
//!
//! The hook runs in its own process group (killed as a whole on timeout), with
//! `oom_score_adj` reset to 0 before exec (the agent's -1000 is not inherited), the
//! soft open-file limit the agent started with (not the one it raised), and
//! its stdout and stderr captured, bounded, into the action's audit line: never onto
//! the agent's own stderr, which may carry the audit log.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::pipe2;

use crate::policy::Trust;
use crate::sys::spawn::{SpawnRequest, Spawned};

use super::{Env, Outcome, Report, StepCtx};

/// How much of each stream goes into the audit line; the rest is read and dropped.
pub const OUTPUT_CAP: usize = 4096;

/// How long to wait for the output pipes to close once the hook itself is gone (a
/// process it left behind may hold them open).
const DRAIN_WAIT: Duration = Duration::from_millis(200);

/// The first `OUTPUT_CAP` bytes of a stream and whether there was more.
#[derive(Default)]
struct Captured {
    head: Vec<u8>,
    truncated: bool,
}

impl Captured {
    fn push(&mut self, data: &[u8]) {
        let room = OUTPUT_CAP.saturating_sub(self.head.len());
        let take = room.min(data.len());
        self.head.extend_from_slice(&data[..take]);
        if take < data.len() {
            self.truncated = true;
        }
    }

    fn text(&self) -> (String, bool) {
        (
            String::from_utf8_lossy(&self.head).into_owned(),
            self.truncated,
        )
    }
}

/// One of the hook's output pipes, read by the episode's own thread (non-blocking,
/// between waits): no reader thread is started per hook, since a new thread's stack is
/// charged to the agent's cgroup, which may be the stuck one (issue 6.11).
struct Stream<R> {
    pipe: Option<R>,
    cap: Captured,
}

impl<R: Read + AsFd> Stream<R> {
    fn new(pipe: Option<R>) -> Stream<R> {
        let pipe = pipe.filter(|p| {
            let fd = p.as_fd().as_raw_fd();
            // A pipe left blocking would hold up the episode: not read at all then.
            fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| log::warn!("exec: the hook's output pipe: {e}"))
                .is_ok()
        });
        Stream {
            pipe,
            cap: Captured::default(),
        }
    }

    /// Reads what is in the pipe now; closes it at its end or on an error.
    fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        while let Some(p) = self.pipe.as_mut() {
            match p.read(&mut buf) {
                Ok(0) => self.pipe = None,
                Ok(n) => self.cap.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => self.pipe = None,
            }
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.pipe.as_ref().map(|p| p.as_fd())
    }
}

/// Waits up to `wait` for output on either pipe (or just waits, when both are closed).
fn wait_output<A: Read + AsFd, B: Read + AsFd>(a: &Stream<A>, b: &Stream<B>, wait: Duration) {
    let mut fds: Vec<PollFd> = [a.fd(), b.fd()]
        .into_iter()
        .flatten()
        .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
        .collect();
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    if fds.is_empty() {
        std::thread::sleep(wait);
    } else if poll(&mut fds, PollTimeout::from(ms)).is_err() {
        // EINTR and the like: the caller's loop looks again.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts the hook (see [`crate::sys::spawn`]: the agent's memory is shared with the
/// child until exec, never copied) with stdin on /dev/null, stdout and stderr on pipes
/// whose read ends are returned, the episode in its environment, in a process group of
/// its own (so that a timeout kills what the hook started too), and with
/// `oom_score_adj` 0: the agent shields itself with -1000, which children inherit, and
/// a hook (and whatever it forks) must not be unkillable.
fn spawn(
    env: &Env,
    ctx: &StepCtx,
    command: &[String],
    dir: &std::path::Path,
    program: &crate::perm::Program,
    trust: Trust,
) -> std::io::Result<(Spawned, File, File)> {
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC)?;
    let null = File::open("/dev/null")?;
    let episode = ctx.episode.to_string();
    let step = ctx.step.to_string();
    let ours: [(&str, &OsStr); 6] = [
        ("OOMWAKE_CGROUP", OsStr::new(ctx.cgroup.as_str())),
        ("OOMWAKE_CGROUP_DIR", dir.as_os_str()),
        ("OOMWAKE_POLICY", OsStr::new(&ctx.policy.name)),
        ("OOMWAKE_EPISODE", OsStr::new(&episode)),
        ("OOMWAKE_STEP", OsStr::new(&step)),
        (
            "OOMWAKE_MODE",
            OsStr::new(if ctx.audit { "audit" } else { "enforce" }),
        ),
    ];
    // The agent's environment, with the episode's variables in place of any of the same
    // name, and only the trusted directories of its PATH.
    let inherited: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !ours.iter().any(|(name, _)| k == name))
        .map(|(k, v)| {
            let v = if k == "PATH" {
                trusted_path(&v, trust.checks())
            } else {
                v
            };
            (k, v)
        })
        .collect();
    let adj = env.proc_root.join("self/oom_score_adj");
    let req = SpawnRequest {
        program: OsStr::new(&command[0]),
        program_at: Some((program.dir.as_fd(), program.name.as_os_str())),
        program_fd: Some(program.file.as_fd()),
        args: command.iter().map(OsStr::new).collect(),
        env: inherited
            .iter()
            .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
            .chain(ours.iter().map(|(k, v)| (OsStr::new(*k), *v)))
            .collect(),
        stdio: [null.as_fd(), out_w.as_fd(), err_w.as_fd()],
        oom_score_adj: adj.as_os_str(),
        nofile_soft: crate::sys::spawn::start_nofile_soft(),
    };
    let child = crate::sys::spawn::spawn(&req)?;
    // The write ends are the child's now: the pipes end when it (and what it started)
    // is gone.
    Ok((child, File::from(out_r), File::from(err_r)))
}

/// The directories of `path` (a PATH value) a hook may look programs up in: absolute
/// ones that pass the owner and mode checks. A hook runs as root, and what it runs by
/// name (`#!/usr/bin/env python3`, `sh -c 'curl ...'`) is found there: a directory of
/// another user's (an operator's own `~/bin`), or the working directory (an empty entry,
/// `.`), would be theirs to plant a program in.
fn trusted_path(path: &OsStr, checks: crate::perm::Checks) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let crate::perm::Checks::Strict(owners) = checks else {
        return path.to_os_string();
    };
    let kept: Vec<&[u8]> = path
        .as_bytes()
        .split(|&b| b == b':')
        .filter(|d| {
            let dir = std::path::Path::new(OsStr::from_bytes(d));
            let ok = dir.is_absolute() && crate::perm::check(dir, "", owners).is_ok();
            if !ok && !d.is_empty() && dir.exists() {
                log::debug!("exec: {} left out of the hook's PATH", dir.display());
            }
            ok
        })
        .collect();
    OsString::from_vec(kept.join(&b':'))
}

/// Runs the hook. Its program is judged again first, on the descriptor it is then
/// executed from ([`crate::perm::open_program`]): since the policy was loaded the file
/// (or a directory above it) may have changed hands, and a path checked and then run
/// could be swapped in between.
pub fn run(
    env: &Env,
    ctx: &StepCtx,
    command: &[String],
    timeout: Duration,
    trust: Trust,
) -> Report {
    let Some(prog) = command.first() else {
        return Report::failed("empty command");
    };
    if ctx.audit {
        return Report::new(Outcome::Would).with("command", command.to_vec());
    }
    let program = match crate::perm::open_program_to_run(
        std::path::Path::new(prog),
        "an exec hook",
        trust.checks(),
    ) {
        Ok(p) => p,
        Err(e) => return Report::failed(e.to_string()).with("command", command.to_vec()),
    };
    // A script's interpreter (and its own, for a chain of `#!`) runs as root too: the
    // kernel finds it by path.
    if let Err(e) =
        crate::perm::check_interpreters(&program.file, std::path::Path::new(prog), trust.checks())
    {
        return Report::failed(e.to_string()).with("command", command.to_vec());
    }
    let dir = env.ctl.hierarchy().dir(ctx.cgroup);
    let (mut child, out, err) = match spawn(env, ctx, command, &dir, &program, trust) {
        Ok(started) => started,
        Err(e) => return Report::failed(format!("{prog}: {e}")).with("command", command.to_vec()),
    };
    let mut out = Stream::new(Some(out));
    let mut err = Stream::new(Some(err));
    let deadline = Instant::now() + timeout;
    let status = loop {
        out.pump();
        err.pump();
        match child.try_wait() {
            Ok(Some(st)) => break Ok(Some(st)),
            Ok(None) if Instant::now() >= deadline || (ctx.cancelled)() => break Ok(None),
            Ok(None) => wait_output(&out, &err, Duration::from_millis(5)),
            Err(e) => break Err(e),
        }
    };
    if !matches!(status, Ok(Some(_))) {
        // The leader is our own unreaped child, so its PID (the group's id) cannot have
        // been reused: the group is the hook's.
        let pgid = nix::unistd::Pid::from_raw(child.id());
        if let Err(e) = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL) {
            log::warn!("killpg({pgid}): {e}");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // The pipes end when every writer is gone; a process the hook left running may keep
    // them open, so read a little longer, then take what was read.
    let drain_end = Instant::now() + DRAIN_WAIT;
    loop {
        out.pump();
        err.pump();
        let left = drain_end.saturating_duration_since(Instant::now());
        if (out.pipe.is_none() && err.pipe.is_none()) || left.is_zero() {
            break;
        }
        wait_output(&out, &err, left.min(Duration::from_millis(5)));
    }
    let (stdout, t1) = out.cap.text();
    let (stderr, t2) = err.cap.text();
    let with_output = |r: Report| {
        r.with("command", command.to_vec())
            .with("stdout", stdout.clone())
            .with("stderr", stderr.clone())
            .with("output_truncated", t1 || t2)
    };
    match status {
        Ok(Some(st)) => {
            let code = st.code();
            let mut r = if st.success() {
                Report::new(Outcome::Done)
            } else {
                Report::failed(format!("{prog} exited with {st}"))
            };
            // A hook may well have fixed things even when it failed: wait and see.
            r.changed = true;
            with_output(r).with("exit_code", code.map(i64::from))
        }
        Ok(None) => {
            let why = if (ctx.cancelled)() && ctx.early {
                format!("{prog} killed: the limit was reached, the OOM episode takes over")
            } else if (ctx.cancelled)() {
                format!("{prog} killed: the agent is stopping")
            } else {
                format!("{prog} timed out after {timeout:?}")
            };
            with_output(Report::failed(why)).with("exit_code", serde_json::Value::Null)
        }
        Err(e) => with_output(Report::failed(format!("waiting for {prog}: {e}"))),
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
        let r = run(&env, &ctx, &cmd, Duration::from_secs(10), Trust::Strict);
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
            Trust::Strict,
        );
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(r.fields["exit_code"], 0);
        let audit = testing::ctx(&cg, &set.policies()[0], true);
        assert_eq!(
            run(&env, &audit, &cmd, Duration::from_secs(1), Trust::Strict).outcome,
            Outcome::Would
        );
    }

    #[test]
    fn the_hooks_path_keeps_only_trusted_directories() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let mine = t.path().join("mine");
        let theirs = t.path().join("theirs");
        for d in [&mine, &theirs] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let path = format!(
            "{}::.:/usr/bin:{}:bin:{}",
            theirs.display(),
            mine.display(),
            t.path().join("missing").display()
        );
        let strict = Trust::Strict.checks();
        assert_eq!(
            trusted_path(OsStr::new(&path), strict),
            OsString::from(format!("/usr/bin:{}", mine.display()))
        );
        let insecure = Trust::Insecure.checks();
        assert_eq!(
            trusted_path(OsStr::new(&path), insecure),
            OsString::from(&path)
        );
    }

    fn sh(script: String) -> Vec<String> {
        vec!["/bin/sh".to_string(), "-c".to_string(), script]
    }

    #[test]
    fn output_is_captured_bounded_and_kept_off_the_agents_stderr() {
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        // About 60 KiB on stdout, a short line on stderr.
        let cmd = sh(
            "i=0; while [ $i -lt 3000 ]; do echo \"line $i of hook output\"; \
                      i=$((i+1)); done; echo 'hook \"complains\"' >&2"
                .to_string(),
        );
        let r = run(&env, &ctx, &cmd, Duration::from_secs(20), Trust::Strict);
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        let stdout = r.fields["stdout"].as_str().unwrap();
        assert_eq!(stdout.len(), OUTPUT_CAP);
        assert!(stdout.starts_with("line 0 of hook output\nline 1 "));
        assert_eq!(r.fields["stderr"], "hook \"complains\"\n");
        assert_eq!(r.fields["output_truncated"], true);
        // The action line stays one valid JSON line whatever the hook printed.
        let line = serde_json::to_string(&r.fields).unwrap();
        assert!(!line.contains('\n'));
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["stdout"].as_str().unwrap().len(), OUTPUT_CAP);

        let r = run(
            &env,
            &ctx,
            &sh("echo small".into()),
            Duration::from_secs(10),
            Trust::Strict,
        );
        assert_eq!(r.fields["stdout"], "small\n");
        assert_eq!(r.fields["output_truncated"], false);
    }

    fn gone(pid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for whoever adopted it.
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
    }

    #[test]
    fn timeout_kills_the_hooks_grandchildren_too() {
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let pidfile = t.path().join("grandchild");
        let cmd = sh(format!(
            "sleep 60 & echo $! > {p}.tmp; mv {p}.tmp {p}; wait",
            p = pidfile.display()
        ));
        let r = run(&env, &ctx, &cmd, Duration::from_millis(1500), Trust::Strict);
        assert!(
            r.error.as_deref().unwrap_or("").contains("timed out"),
            "{r:?}"
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("the hook never started its grandchild")
            .trim()
            .parse()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while !gone(pid) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let survived = !gone(pid);
        if survived {
            // Ours: clean up before failing.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        assert!(
            !survived,
            "the hook's grandchild {pid} outlived the timeout"
        );
    }

    /// Sets this test process's oom_score_adj for the guard's lifetime (raising needs no
    /// privilege, and going back down to 0 is allowed as 0 is the floor we started at).
    struct AdjGuard;
    impl AdjGuard {
        fn set(v: i64) -> AdjGuard {
            std::fs::write("/proc/self/oom_score_adj", v.to_string()).unwrap();
            AdjGuard
        }
    }
    impl Drop for AdjGuard {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/self/oom_score_adj", "0");
        }
    }

    #[test]
    fn oom_score_adj_is_reset_before_the_hook_runs() {
        // The agent's own -1000 cannot be set here (no CAP_SYS_RESOURCE), so the agent's
        // shield is played by 500: a value the hook must not inherit either. The fake
        // proc root has no /proc/PID entries, so a reset done after spawn through
        // /proc/CHILD would come too late by construction; only the child's own reset
        // (through self, before exec) can work.
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        std::fs::create_dir(&proc_root).unwrap();
        std::os::unix::fs::symlink("/proc/self", proc_root.join("self")).unwrap();
        let env = testing::env(t.path(), &proc_root);
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let (own, forked) = (t.path().join("own"), t.path().join("forked"));
        let cmd = sh(format!(
            "cat /proc/$$/oom_score_adj > {}; cat /proc/self/oom_score_adj > {}",
            own.display(),
            forked.display()
        ));
        let (r, after) = {
            let _g = AdjGuard::set(500);
            let r = run(&env, &ctx, &cmd, Duration::from_secs(10), Trust::Strict);
            (
                r,
                std::fs::read_to_string("/proc/self/oom_score_adj").unwrap(),
            )
        };
        // The child wrote 0 while it still shared the agent's memory: the kernel
        // copies a write to every process sharing the writer's mm unless the writer is
        // a vfork child, so the agent keeps its own value.
        assert_eq!(after.trim(), "500", "the hook's reset reached the agent");
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        assert_eq!(std::fs::read_to_string(&own).unwrap().trim(), "0");
        assert_eq!(std::fs::read_to_string(&forked).unwrap().trim(), "0");
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
        let r = run(&env, &ctx, &cmd, Duration::from_millis(200), Trust::Strict);
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(r.error.unwrap().contains("timed out"));
        assert!(start.elapsed() < Duration::from_secs(10));
        let missing = vec!["/nonexistent/prog".to_string()];
        assert_eq!(
            run(&env, &ctx, &missing, Duration::from_secs(1), Trust::Strict).outcome,
            Outcome::Failed
        );
    }

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The `exec` step of a policy file naming `hook`, loaded with StrictModes.
    fn hook_policy(t: &Path, hook: &Path) -> PolicySet {
        let p = t.join("p.toml");
        std::fs::write(
            &p,
            format!(
                "[match]\ncgroup = [\"/x\"]\n[[step]]\naction = \"exec\"\ncommand = [\"{}\", \"arg1\"]\n",
                hook.display()
            ),
        )
        .unwrap();
        crate::policy::load_files(&[p]).unwrap()
    }

    #[test]
    fn a_hook_made_untrusted_after_load_is_refused_before_it_runs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let bin = t.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        chmod(&bin, 0o755);
        let hook = bin.join("hook");
        let marker = t.path().join("ran");
        std::fs::write(
            &hook,
            format!("#!/bin/sh\necho \"$1\" > {}\n", marker.display()),
        )
        .unwrap();
        chmod(&hook, 0o755);
        let set = hook_policy(t.path(), &hook);
        let policy = &set.policies()[0];
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, policy, false);
        let step = &policy.steps[0].action;
        let r = crate::action::perform(&env, &ctx, step);
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "arg1\n");
        std::fs::remove_file(&marker).unwrap();
        // Uid 65534 is given the hook after the policy was loaded: not run as root.
        std::os::unix::fs::chown(&hook, Some(65534), None).unwrap();
        let r = crate::action::perform(&env, &ctx, step);
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        let e = r.error.unwrap_or_default();
        assert!(
            e.starts_with(&format!("{}: owned by uid 65534", hook.display())),
            "{e}"
        );
        assert!(!marker.exists(), "the untrusted hook ran");
        // Root's again, but its directory writable by others.
        std::os::unix::fs::chown(&hook, Some(0), None).unwrap();
        chmod(&bin, 0o777);
        let r = crate::action::perform(&env, &ctx, step);
        let e = r.error.unwrap_or_default();
        assert!(
            e.starts_with(&format!("{}: writable by group or others", bin.display())),
            "{e}"
        );
        assert!(!marker.exists(), "the untrusted hook ran");
        chmod(&bin, 0o755);
        // Its interpreter given to uid 65534: not run either.
        let interp = bin.join("interp");
        std::fs::copy("/bin/sh", &interp).unwrap();
        std::os::unix::fs::chown(&interp, Some(65534), None).unwrap();
        std::fs::write(
            &hook,
            format!(
                "#!{}\necho \"$1\" > {}\n",
                interp.display(),
                marker.display()
            ),
        )
        .unwrap();
        let r = crate::action::perform(&env, &ctx, step);
        let e = r.error.unwrap_or_default();
        assert!(
            e.starts_with(&format!("{}: owned by uid 65534", interp.display())),
            "{e}"
        );
        assert!(!marker.exists(), "the untrusted interpreter ran");
        std::os::unix::fs::chown(&interp, Some(0), None).unwrap();
        let r = crate::action::perform(&env, &ctx, step);
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        assert!(marker.exists());
    }

    #[test]
    fn scripts_run_from_their_directory_with_or_without_a_shebang() {
        // execveat(dir, name) hands a `#!` script's interpreter /dev/fd/D/NAME, which it
        // can open only if the directory's descriptor survives the exec; a script
        // without `#!` goes to /bin/sh the same way.
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        for (name, head) in [("with", "#!/bin/sh\n"), ("without", "")] {
            let hook = t.path().join(name);
            let out = t.path().join(format!("{name}.out"));
            std::fs::write(
                &hook,
                format!("{head}echo \"{name} $1\" > {}\n", out.display()),
            )
            .unwrap();
            chmod(&hook, 0o755);
            let cmd = vec![hook.display().to_string(), "arg1".to_string()];
            let r = run(&env, &ctx, &cmd, Duration::from_secs(10), Trust::Strict);
            assert_eq!(r.outcome, Outcome::Done, "{name}: {r:?}");
            assert_eq!(
                std::fs::read_to_string(&out).unwrap(),
                format!("{name} arg1\n")
            );
        }
        // A binary keeps the directory's descriptor close-on-exec: it inherits neither
        // its directory nor itself.
        let cmd = vec![
            "/bin/ls".to_string(),
            "-l".to_string(),
            "/proc/self/fd".to_string(),
        ];
        let r = run(&env, &ctx, &cmd, Duration::from_secs(10), Trust::Strict);
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        let ls = std::fs::canonicalize("/bin/ls").unwrap();
        let fds = r.fields["stdout"].as_str().unwrap();
        assert!(!fds.contains(&format!("-> {}", ls.display())), "{fds}");
        let bin = ls.parent().unwrap();
        assert!(!fds.contains(&format!("-> {}\n", bin.display())), "{fds}");
    }

    /// A hook named by a link (`/bin/sleep` to a multi-call busybox) runs under the
    /// link's name, as `execve` of its path would name it: the VM's busybox `sleep` ran
    /// as "busybox" when the link was resolved before the exec, and before that as "3"
    /// (the descriptor) on Debian's 6.1 kernel.
    #[test]
    fn a_hook_named_by_a_link_runs_under_the_links_name() {
        let t = tempfile::tempdir().unwrap();
        let env = testing::env(t.path(), Path::new("/proc"));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/x");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let real = t.path().join("multicall");
        std::fs::write(&real, "#!/bin/sh\ncat /proc/$$/comm\n").unwrap();
        chmod(&real, 0o755);
        let link = t.path().join("alias");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let cmd = vec![link.display().to_string()];
        let r = run(&env, &ctx, &cmd, Duration::from_secs(10), Trust::Strict);
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        assert_eq!(r.fields["stdout"].as_str(), Some("alias\n"), "{r:?}");
    }
}
