//! Signalling processes without races: choose a victim from `/proc`, open a pidfd,
//! re-check that the process behind it is the one chosen (same start time) and is still
//! in the cgroup's subtree, then signal through the pidfd. After SIGKILL,
//! `process_mrelease` frees the victim's memory without waiting for it to run.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Env, Outcome, Report, StepCtx};
use crate::cgroup::{parse, CgroupPath};
use crate::policy::VictimSpec;
use crate::sys::PidFd;
use crate::victim::{self, Task};

/// How long to wait for a SIGKILLed process to be gone before the settle wait.
const KILL_WAIT: Duration = Duration::from_secs(2);

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| sig.to_string())
}

/// Opens a pidfd for `task` and confirms it still is that task, inside `within`.
/// `Ok(None)`: it exited, its PID was reused, or it moved out.
pub fn verified_pidfd(
    env: &Env,
    task: &Task,
    within: &CgroupPath,
) -> Result<Option<PidFd>, String> {
    let pfd = match PidFd::open(task.pid) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // The task is there but its pidfd (a `struct file`) cannot be had: a gap, and
        // the next candidate is tried as for one that exited.
        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
            victim::note_read_error(Path::new(&format!("pidfd_open({})", task.pid)), &e);
            return Ok(None);
        }
        Err(e) => return Err(format!("pidfd_open({}): {e}", task.pid)),
    };
    if victim::start_ticks(&env.proc_root, task.pid) != Some(task.start_ticks) {
        return Ok(None);
    }
    let path = env.proc_root.join(task.pid.to_string()).join("cgroup");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) => {
            victim::note_read_error(&path, &e);
            return Ok(None);
        }
    };
    let Some(cg) =
        parse::proc_memory_cgroup_bytes(&text).and_then(|p| env.ctl.hierarchy().from_proc_path(p))
    else {
        return Ok(None);
    };
    if !cg.is_within(within) {
        return Ok(None);
    }
    Ok(Some(pfd))
}

fn victim_fields(r: Report, t: &Task, sig: i32) -> Report {
    r.with("pid", t.pid)
        .with("comm", t.comm.clone())
        .with("rss_bytes", t.rss_bytes)
        .with("signal", signal_name(sig))
        .with("victim_cgroup", t.cgroup.to_string())
}

/// The start of a skipped kill's error when the subtree's processes could not be read
/// for want of memory (the agent shares the stuck cgroup).
pub const UNREADABLE: &str = "no victim can be read in a cgroup the agent shares";

/// Sends `sig` to the best victim of the subtree; with `grace`, waits up to that long
/// for it to exit (or for the cgroup to recover).
pub fn signal_victim(
    env: &Env,
    ctx: &StepCtx,
    spec: &VictimSpec,
    sig: i32,
    grace: Option<Duration>,
) -> Report {
    victim::take_gaps();
    let tasks = victim::candidates(env.ctl.as_ref(), &env.proc_root, ctx.cgroup, env.self_pid);
    let ranked = victim::rank(&tasks, spec);
    let Some(first) = ranked.first() else {
        return nobody(env, ctx, "no candidate process in the cgroup");
    };
    if ctx.audit {
        return victim_fields(Report::new(Outcome::Would), first, sig);
    }
    // The first choice may have exited between reading /proc and opening the pidfd;
    // fall back to the next in order rather than to nobody.
    for t in ranked.iter().take(4) {
        let pfd = match verified_pidfd(env, t, ctx.cgroup) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => return victim_fields(Report::failed(e), t, sig),
        };
        if let Err(e) = pfd.send_signal(sig) {
            if e.kind() == std::io::ErrorKind::NotFound {
                continue;
            }
            return victim_fields(Report::failed(format!("pidfd_send_signal: {e}")), t, sig);
        }
        let mut rep = victim_fields(Report::new(Outcome::Done), t, sig);
        if sig == libc::SIGKILL {
            match pfd.process_mrelease() {
                Ok(()) => rep = rep.with("mreleased", true),
                Err(e) => {
                    log::debug!("process_mrelease({}): {e}", t.pid);
                    rep = rep.with("mreleased", false);
                }
            }
        }
        // Recorded now: the wait may be long, and the agent may stop during it.
        (ctx.taken)(&rep);
        let wait = grace.unwrap_or(KILL_WAIT);
        let start = Instant::now();
        let exited = wait_exit(&pfd, wait, ctx.still_stuck);
        rep = rep
            .with("exited", exited)
            .with("waited_ms", start.elapsed().as_millis() as u64);
        return rep;
    }
    nobody(
        env,
        ctx,
        "every candidate exited or left the cgroup before it could be signalled",
    )
}

/// The report when no victim could be signalled. A listing with gaps is not an empty
/// one: when a cgroup's task list or a task's `/proc` files could not be read, the
/// report says so instead of "no candidate". When the agent shares the stuck cgroup,
/// any such gap is the wall itself (ENOMEM on every open or buffer that a read needs;
/// which one fails first varies with the kernel's per-CPU pre-charged stock), and the
/// report says that no victim can be read there.
fn nobody(env: &Env, ctx: &StepCtx, otherwise: &str) -> Report {
    nobody_because(victim::take_gaps(), env.loans.inside(ctx.cgroup), otherwise)
}

fn nobody_because(gaps: victim::Gaps, inside: bool, otherwise: &str) -> Report {
    let detail = gaps.first.as_deref().unwrap_or("");
    if inside && gaps.any() {
        return Report::skipped(format!(
            "{UNREADABLE}: reading the cgroup's tasks or their /proc files fails there ({detail}), so no victim can be chosen or signalled through a pidfd"
        ));
    }
    if gaps.any() {
        return Report::skipped(format!(
            "{otherwise}, but not every task could be read ({detail})"
        ));
    }
    Report::skipped(otherwise)
}

/// Waits for the process to exit, in short slices so that a recovery ends the wait.
fn wait_exit(pfd: &PidFd, total: Duration, still_stuck: &dyn Fn() -> bool) -> bool {
    let deadline = Instant::now() + total;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let slice = (deadline - now).min(Duration::from_millis(10));
        match pfd.wait_exit(slice) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        if !still_stuck() {
            // Recovery comes first when process_mrelease freed the memory of a victim
            // that is still exiting: a last short look tells whether it is gone.
            return pfd.wait_exit(Duration::from_millis(100)).unwrap_or(false);
        }
    }
}

/// SIGKILLs every task in the subtree (never pid 1 nor the agent), in rounds, until it
/// is empty or five rounds have passed (tasks may fork meanwhile). Tasks shielded with
/// oom_score_adj -1000 are spared, as by every other action, and reported as `spared`.
pub fn kill_all(env: &Env, ctx: &StepCtx) -> Report {
    let list = || -> (Vec<Task>, Vec<Task>) {
        victim::subtree_tasks(env.ctl.as_ref(), &env.proc_root, ctx.cgroup, env.self_pid)
            .into_iter()
            .partition(|t| !t.shielded())
    };
    victim::take_gaps();
    let (first, shielded) = list();
    let mut spared: Vec<i32> = shielded.iter().map(|t| t.pid).collect();
    if first.is_empty() {
        let r = if spared.is_empty() {
            nobody(env, ctx, "no process in the cgroup")
        } else {
            Report::skipped("every process in the cgroup is shielded (oom_score_adj -1000)")
        };
        return r.with("spared", spared);
    }
    if ctx.audit {
        let pids: Vec<i32> = first.iter().map(|t| t.pid).collect();
        return Report::new(Outcome::Would)
            .with("pids", pids)
            .with("spared", spared)
            .with("signal", "SIGKILL");
    }
    // v2: one write to cgroup.kill kills the whole subtree, forks included; it spares
    // nobody, so only when no task is shielded.
    if spared.is_empty() {
        match env.ctl.kill_all(ctx.cgroup) {
            Ok(true) => {
                let pids: Vec<i32> = first.iter().map(|t| t.pid).collect();
                return Report::new(Outcome::Done)
                    .with("pids", pids)
                    .with("spared", spared)
                    .with("signal", "SIGKILL")
                    .with("via", "cgroup.kill");
            }
            Ok(false) => {}
            Err(e) => log::warn!("{}: {e}; killing task by task", ctx.cgroup),
        }
    }
    let mut killed = Vec::new();
    let mut errors = Vec::new();
    let mut pidfds = Vec::new();
    let mut tasks = first;
    for _round in 0..5 {
        if tasks.is_empty() {
            break;
        }
        for t in &tasks {
            match verified_pidfd(env, t, ctx.cgroup) {
                Ok(Some(pfd)) => match pfd.send_signal(libc::SIGKILL) {
                    Ok(()) => {
                        let _ = pfd.process_mrelease();
                        killed.push(t.pid);
                        pidfds.push(pfd);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(format!("{}: {e}", t.pid)),
                },
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        // Let the killed go before looking for stragglers (forked children).
        let deadline = Instant::now() + KILL_WAIT;
        for p in &pidfds {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = p.wait_exit(left);
        }
        let (next, shielded) = list();
        for t in shielded {
            if !spared.contains(&t.pid) {
                spared.push(t.pid);
            }
        }
        tasks = next
            .into_iter()
            .filter(|t| !killed.contains(&t.pid))
            .collect();
    }
    let mut rep = if errors.is_empty() {
        Report::new(Outcome::Done)
    } else {
        Report::failed(errors.join("; "))
    };
    rep = rep
        .with("pids", killed)
        .with("spared", spared)
        .with("signal", "SIGKILL");
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;
    use std::process::{Child, Command};

    use crate::action::testing;
    use crate::cgroup::CgroupPath;
    use crate::policy::PolicySet;

    /// A fake `/proc/PID` for a real child process: what `read_task` and the pidfd
    /// re-check read, with the oom_score_adj the test wants (a real task cannot be given
    /// -1000 without CAP_SYS_RESOURCE).
    fn fake_proc(proc_root: &Path, pid: i32, adj: i64) {
        let d = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let real = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap();
        std::fs::write(d.join("stat"), real("stat")).unwrap();
        std::fs::write(d.join("status"), real("status")).unwrap();
        std::fs::write(d.join("cmdline"), real("cmdline")).unwrap();
        std::fs::write(d.join("oom_score"), "0\n").unwrap();
        std::fs::write(d.join("oom_score_adj"), format!("{adj}\n")).unwrap();
        std::fs::write(d.join("cgroup"), "5:memory:/cg\n0::/cg\n").unwrap();
    }

    /// The signal that ended `c`, waiting up to 10 s; a child still running then is
    /// killed (it is ours) and reported as `None`.
    fn ended_by(c: &mut Child) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return st.signal();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().unwrap()
    }

    /// A fake `/cg` (cgroup root `cg/`, proc root `proc/` in the returned dir) listing
    /// a normal sleeper and a shielded one (oom_score_adj -1000): (dir, normal, shielded).
    fn normal_and_shielded() -> (tempfile::TempDir, Child, Child) {
        let t = tempfile::tempdir().unwrap();
        let cg_root = t.path().join("cg");
        let proc_root = t.path().join("proc");
        let normal = sleeper();
        let shielded = sleeper();
        let (np, sp) = (normal.id() as i32, shielded.id() as i32);
        std::fs::create_dir_all(cg_root.join("cg")).unwrap();
        std::fs::write(cg_root.join("cg/cgroup.procs"), format!("{np}\n{sp}\n")).unwrap();
        fake_proc(&proc_root, np, 0);
        fake_proc(&proc_root, sp, -1000);
        (t, normal, shielded)
    }

    #[test]
    fn kill_all_spares_shielded_tasks_and_reports_them() {
        let (t, mut normal, mut shielded) = normal_and_shielded();
        let (cg_root, proc_root) = (t.path().join("cg"), t.path().join("proc"));
        let (np, sp) = (normal.id() as i32, shielded.id() as i32);
        let env = testing::env(&cg_root, &proc_root);
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");

        let audit = kill_all(&env, &testing::ctx(&cg, &set.policies()[0], true));
        assert_eq!(audit.outcome, Outcome::Would);
        assert_eq!(audit.fields["pids"], serde_json::json!([np]));
        assert_eq!(audit.fields["spared"], serde_json::json!([sp]));

        // The killed one stays listed in the fake cgroup.procs: kill_all goes on in
        // rounds and must neither re-kill it nor ever touch the shielded one.
        let r = kill_all(&env, &testing::ctx(&cg, &set.policies()[0], false));
        let normal_signal = ended_by(&mut normal);
        let shielded_alive = matches!(shielded.try_wait(), Ok(None));
        let _ = shielded.kill();
        let _ = shielded.wait();
        assert_eq!(normal_signal, Some(libc::SIGKILL));
        assert!(
            shielded_alive,
            "kill_all killed a task with oom_score_adj -1000"
        );
        assert_eq!(r.fields["pids"], serde_json::json!([np]));
        assert_eq!(r.fields["spared"], serde_json::json!([sp]));
    }

    #[test]
    fn kill_all_on_v2_does_not_use_cgroup_kill_when_a_task_is_shielded() {
        use crate::cgroup::{v2::V2, Hierarchy, Kind};
        let (t, mut normal, mut shielded) = normal_and_shielded();
        let (cg_root, proc_root) = (t.path().join("cg"), t.path().join("proc"));
        let sp = shielded.id() as i32;
        std::fs::write(cg_root.join("cg/cgroup.kill"), "").unwrap();
        let mut env = testing::env(&cg_root, &proc_root);
        env.ctl = Box::new(V2::new(Hierarchy::fake(&cg_root, Kind::V2)));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let r = kill_all(&env, &testing::ctx(&cg, &set.policies()[0], false));
        let normal_signal = ended_by(&mut normal);
        let shielded_alive = matches!(shielded.try_wait(), Ok(None));
        let _ = shielded.kill();
        let _ = shielded.wait();
        assert_eq!(
            std::fs::read_to_string(cg_root.join("cg/cgroup.kill")).unwrap(),
            "",
            "cgroup.kill spares nobody: {r:?}"
        );
        assert_eq!(normal_signal, Some(libc::SIGKILL));
        assert!(shielded_alive);
        assert_eq!(r.fields["spared"], serde_json::json!([sp]));
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(999), "999");
    }

    /// A cgroup whose task list cannot be read is not an empty cgroup: the kill step
    /// says that it could not read, and when the agent shares the cgroup it says why
    /// (on Debian's 6.1 kernel the `cgroup.procs` read was what failed with ENOMEM
    /// while a probe open of `/proc/self/stat` still succeeded, and the step said "no
    /// candidate process in the cgroup").
    #[test]
    fn an_unreadable_task_list_is_reported_as_such_not_as_no_candidate() {
        let t = tempfile::tempdir().unwrap();
        let (cg_root, proc_root) = (t.path().join("cg"), t.path().join("proc"));
        // A directory where the file should be: reading it fails with EISDIR.
        std::fs::create_dir_all(cg_root.join("cg/cgroup.procs")).unwrap();
        std::fs::create_dir_all(&proc_root).unwrap();
        let env = testing::env(&cg_root, &proc_root);
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let spec = crate::policy::VictimSpec {
            order: crate::policy::VictimOrder::LargestRss,
            prefer: Vec::new(),
            avoid: Vec::new(),
        };
        let ctx = testing::ctx(&cg, &set.policies()[0], false);

        let r = signal_victim(&env, &ctx, &spec, libc::SIGKILL, None);
        assert_eq!(r.outcome, Outcome::Skipped);
        let err = r.error.clone().unwrap_or_default();
        assert!(err.contains("not every task could be read"), "{err}");
        assert!(err.contains("cgroup.procs"), "{err}");
        let r = kill_all(&env, &ctx);
        let err = r.error.clone().unwrap_or_default();
        assert!(err.contains("not every task could be read"), "{err}");

        // A readable, really empty cgroup is still "no candidate".
        std::fs::remove_dir(cg_root.join("cg/cgroup.procs")).unwrap();
        std::fs::write(cg_root.join("cg/cgroup.procs"), "").unwrap();
        let r = signal_victim(&env, &ctx, &spec, libc::SIGKILL, None);
        assert_eq!(
            r.error.as_deref(),
            Some("no candidate process in the cgroup")
        );
    }

    #[test]
    fn inside_a_shared_cgroup_any_gap_is_the_wall() {
        let enomem = victim::Gaps {
            out_of_memory: true,
            first: Some(
                "/sys/fs/cgroup/memory/pod/cgroup.procs: Cannot allocate memory (os error 12)"
                    .into(),
            ),
        };
        let other = victim::Gaps {
            out_of_memory: false,
            first: Some("/proc/7/stat: Permission denied".into()),
        };
        for gaps in [enomem.clone(), other] {
            let r = nobody_because(gaps, true, "no candidate process in the cgroup");
            let err = r.error.unwrap();
            assert!(err.starts_with(UNREADABLE), "{err}");
        }
        // Outside, the same gap is named but is not blamed on sharing the cgroup.
        let r = nobody_because(enomem, false, "no candidate process in the cgroup");
        let err = r.error.unwrap();
        assert!(!err.starts_with(UNREADABLE), "{err}");
        assert!(err.contains("cgroup.procs"), "{err}");
        // Nothing unread: the plain reason, inside or not.
        for inside in [true, false] {
            let r = nobody_because(
                victim::Gaps::default(),
                inside,
                "no candidate process in the cgroup",
            );
            assert_eq!(
                r.error.as_deref(),
                Some("no candidate process in the cgroup")
            );
        }
    }
}
