//! Signalling processes without races: choose a victim from `/proc`, open a pidfd,
//! re-check that the process behind it is the one chosen (same start time) and is still
//! in the cgroup's subtree, then signal through the pidfd. After SIGKILL,
//! `process_mrelease` frees the victim's memory without waiting for it to run.

use std::path::Path;
use std::sync::Arc;
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

/// Where a kill step's tasks and pidfds come from: `/proc` read now with a pidfd opened
/// per victim, or, in a cgroup the agent shares, the kill kit armed ahead of time
/// ([`crate::armed`]), which needs no new kernel memory at the wall.
enum Source {
    Live,
    Armed(crate::armed::Listing),
}

impl Source {
    fn of(env: &Env, ctx: &StepCtx) -> Source {
        if env.loans.inside(ctx.cgroup) {
            if let Some(l) =
                env.armed
                    .listing(env.ctl.as_ref(), &env.proc_root, ctx.cgroup, env.self_pid)
            {
                return Source::Armed(l);
            }
        }
        Source::Live
    }

    /// Every task of the subtree, shielded ones included.
    fn tasks(&self, env: &Env, ctx: &StepCtx) -> Vec<Task> {
        match self {
            Source::Live => {
                victim::subtree_tasks(env.ctl.as_ref(), &env.proc_root, ctx.cgroup, env.self_pid)
            }
            Source::Armed(l) => l.tasks.clone(),
        }
    }

    /// A pidfd confirmed to be `t`, inside the cgroup's subtree. `Ok(None)`: gone.
    fn pidfd(
        &self,
        env: &Env,
        t: &Task,
        within: &CgroupPath,
    ) -> Result<Option<Arc<PidFd>>, String> {
        match self {
            Source::Live => verified_pidfd(env, t, within).map(|p| p.map(Arc::new)),
            // Listed in the subtree's task lists just now, read through kept files, and
            // the pidfd is alive: a live PID is one process, so it is that task.
            Source::Armed(l) => Ok(l.pidfd(t.pid).cloned()),
        }
    }

    /// What the listing could not read.
    fn gaps(&self) -> victim::Gaps {
        match self {
            Source::Live => victim::take_gaps(),
            Source::Armed(l) => l.gaps.clone(),
        }
    }

    fn via(&self) -> &'static str {
        match self {
            Source::Live => "proc",
            Source::Armed(_) => "armed",
        }
    }
}

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
    let source = Source::of(env, ctx);
    let mut tasks = source.tasks(env, ctx);
    tasks.retain(|t| !t.shielded());
    if let Source::Armed(l) = &source {
        // In a cgroup the agent shares, a task it could not read may be the one that
        // grows: it does not choose among the others.
        if l.gaps.any() {
            return refused(l.gaps.clone());
        }
    }
    let ranked = victim::rank(&tasks, spec);
    let Some(first) = ranked.first() else {
        return nobody(env, ctx, &source, "no candidate process in the cgroup");
    };
    if ctx.audit {
        return victim_fields(Report::new(Outcome::Would), first, sig).with("via", source.via());
    }
    // The first choice may have exited between reading /proc and opening the pidfd;
    // fall back to the next in order rather than to nobody.
    for t in ranked.iter().take(4) {
        let pfd = match source.pidfd(env, t, ctx.cgroup) {
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
        let mut rep = victim_fields(Report::new(Outcome::Done), t, sig).with("via", source.via());
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
        &source,
        "every candidate exited or left the cgroup before it could be signalled",
    )
}

/// The report of a kill step in a cgroup the agent shares whose armed listing has a
/// gap: it names the gap and chooses nobody.
fn refused(gaps: victim::Gaps) -> Report {
    Report::skipped(format!(
        "{UNREADABLE}: {} (not choosing among the tasks it knows while one it cannot read may be the one that grows)",
        gaps.first.as_deref().unwrap_or("a task list could not be read")
    ))
}

/// The report when no victim could be signalled. A listing with gaps is not an empty
/// one: when a cgroup's task list or a task's `/proc` files could not be read, the
/// report says so instead of "no candidate". When the agent shares the stuck cgroup,
/// any such gap is the wall itself (ENOMEM on every open or buffer that a read needs;
/// which one fails first varies with the kernel's per-CPU pre-charged stock), and the
/// report says that no victim can be read there.
fn nobody(env: &Env, ctx: &StepCtx, source: &Source, otherwise: &str) -> Report {
    nobody_because(source.gaps(), env.loans.inside(ctx.cgroup), otherwise)
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
    // Each round lists again (tasks may fork meanwhile), from the same kind of source.
    let list = || -> (Source, Vec<Task>, Vec<Task>) {
        victim::take_gaps();
        let source = Source::of(env, ctx);
        let (alive, shielded) = source
            .tasks(env, ctx)
            .into_iter()
            .partition(|t| !t.shielded());
        (source, alive, shielded)
    };
    let (mut source, first, shielded) = list();
    let mut spared: Vec<i32> = shielded.iter().map(|t| t.pid).collect();
    if first.is_empty() {
        let r = if spared.is_empty() {
            nobody(env, ctx, &source, "no process in the cgroup")
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
    // nobody, so only when no task is shielded, and never in a cgroup that holds the
    // agent (it would be killed too).
    if spared.is_empty() && !env.loans.inside(ctx.cgroup) {
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
            match source.pidfd(env, t, ctx.cgroup) {
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
        let (next_source, next, shielded) = list();
        source = next_source;
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
        .with("signal", "SIGKILL")
        .with("via", source.via());
    if let Some(gap) = source.gaps().first {
        rep = rep.with("unread", gap);
    }
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

    /// An env whose agent shares `/cg` (its own cgroup is `/cg/agent`), with the kill
    /// kit armed for `/cg`: the task list `cg/cgroup.procs` lists `pids`.
    fn shared_env(t: &Path, pids: &[i32]) -> Env {
        let (cg_root, proc_root) = (t.join("cg"), t.join("proc"));
        std::fs::create_dir_all(cg_root.join("cg/agent")).unwrap();
        std::fs::write(cg_root.join("cg/agent/cgroup.procs"), "").unwrap();
        let list: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(cg_root.join("cg/cgroup.procs"), list).unwrap();
        let env = testing::env(&cg_root, &proc_root);
        env.loans.set_own_cgroup(Some(CgroupPath::new("/cg/agent")));
        env.armed.refresh(
            env.ctl.as_ref(),
            &proc_root,
            env.self_pid,
            Some(&CgroupPath::new("/cg")),
        );
        env
    }

    fn largest() -> crate::policy::VictimSpec {
        crate::policy::VictimSpec {
            order: crate::policy::VictimOrder::LargestRss,
            prefer: Vec::new(),
            avoid: Vec::new(),
        }
    }

    /// In a cgroup the agent shares, the kill chooses and signals through the kit
    /// armed ahead of time: the audit says `via: armed`, and the victim is the task.
    #[test]
    fn inside_a_shared_cgroup_the_kill_goes_through_the_armed_kit() {
        let t = tempfile::tempdir().unwrap();
        let mut victim = sleeper();
        let vp = victim.id() as i32;
        fake_proc(&t.path().join("proc"), vp, 0);
        let env = shared_env(t.path(), &[vp]);
        assert_eq!(env.armed.summary().0, 1, "the task was not armed");
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let r = signal_victim(&env, &ctx, &largest(), libc::SIGKILL, None);
        assert_eq!(r.outcome, Outcome::Done, "{r:?}");
        assert_eq!(r.fields["via"], "armed");
        assert_eq!(r.fields["pid"], vp);
        assert_eq!(ended_by(&mut victim), Some(libc::SIGKILL));
    }

    /// Never the wrong kill: a task that appeared in the shared cgroup since the kit was
    /// armed and cannot be read now may be the one that grows, so the kill chooses
    /// nobody rather than the known task (which would be the wrong one), and says why.
    #[test]
    fn inside_a_shared_cgroup_an_unknown_task_makes_the_kill_refuse() {
        let t = tempfile::tempdir().unwrap();
        let mut known = sleeper();
        let mut unknown = sleeper();
        let (kp, up) = (known.id() as i32, unknown.id() as i32);
        let proc_root = t.path().join("proc");
        fake_proc(&proc_root, kp, 0);
        let env = shared_env(t.path(), &[kp]);
        // Appears after arming, and its /proc cannot be read (a directory where the
        // stat file should be: EISDIR, as ENOMEM is at the wall).
        std::fs::create_dir_all(proc_root.join(format!("{up}/stat"))).unwrap();
        std::fs::write(t.path().join("cg/cg/cgroup.procs"), format!("{kp}\n{up}\n")).unwrap();
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let r = signal_victim(&env, &ctx, &largest(), libc::SIGKILL, None);
        // Audit mode refuses the same way: it would not know whom either.
        let audit = testing::ctx(&cg, &set.policies()[0], true);
        let would = signal_victim(&env, &audit, &largest(), libc::SIGKILL, None);
        let known_alive = matches!(known.try_wait(), Ok(None));
        for c in [&mut known, &mut unknown] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(r.outcome, Outcome::Skipped, "{r:?}");
        let err = r.error.unwrap_or_default();
        assert!(err.starts_with(UNREADABLE), "{err}");
        assert!(err.contains(&format!("pid {up}")), "{err}");
        assert!(known_alive, "the known task was killed");
        assert_eq!(would.outcome, Outcome::Skipped, "{would:?}");
    }

    /// A task armed before the wall that exited since is not signalled (its kept files
    /// read empty), and a listing outside the armed subtree is not the kit's.
    #[test]
    fn the_kit_lists_only_live_tasks_of_its_own_subtree() {
        let t = tempfile::tempdir().unwrap();
        let mut gone = sleeper();
        let gp = gone.id() as i32;
        fake_proc(&t.path().join("proc"), gp, 0);
        let env = shared_env(t.path(), &[gp]);
        let _ = gone.kill();
        let _ = gone.wait();
        let proc_root = t.path().join("proc");
        assert!(env
            .armed
            .listing(
                env.ctl.as_ref(),
                &proc_root,
                &CgroupPath::new("/other"),
                env.self_pid
            )
            .is_none());
        let l = env
            .armed
            .listing(
                env.ctl.as_ref(),
                &proc_root,
                &CgroupPath::new("/cg"),
                env.self_pid,
            )
            .unwrap();
        assert!(!l.gaps.any(), "{:?}", l.gaps);
        // The fake stat file still reads (it is a copy), but the pidfd is dead: the
        // kill finds nobody to signal.
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let r = signal_victim(&env, &ctx, &largest(), libc::SIGKILL, None);
        assert_eq!(r.outcome, Outcome::Skipped, "{r:?}");
    }

    /// A task the kit armed in the shared cgroup whose own `/proc/PID/cgroup` says it
    /// is elsewhere now (it left after the lists were read, or the lists are the
    /// kernel's cached ones) is never signalled, and the kill refuses: a list that is
    /// not what it is now may also miss the task that grows.
    #[test]
    fn a_task_that_left_the_shared_cgroup_is_not_signalled_and_the_kill_refuses() {
        let t = tempfile::tempdir().unwrap();
        let mut left = sleeper();
        let lp = left.id() as i32;
        let proc_root = t.path().join("proc");
        fake_proc(&proc_root, lp, 0);
        let env = shared_env(t.path(), &[lp]);
        assert_eq!(env.armed.summary().0, 1, "the task was not armed");
        // It moves out; the task list still shows it.
        std::fs::write(
            proc_root.join(lp.to_string()).join("cgroup"),
            "5:memory:/elsewhere\n0::/elsewhere\n",
        )
        .unwrap();
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let r = signal_victim(&env, &ctx, &largest(), libc::SIGKILL, None);
        let alive = matches!(left.try_wait(), Ok(None));
        let _ = left.kill();
        let _ = left.wait();
        assert!(alive, "a task outside the cgroup was killed: {r:?}");
        assert_eq!(r.outcome, Outcome::Skipped, "{r:?}");
        let err = r.error.clone().unwrap_or_default();
        assert!(err.contains("/elsewhere"), "{r:?}");
        let r = kill_all(&env, &ctx);
        assert!(
            r.fields
                .get("pids")
                .and_then(|p| p.as_array())
                .is_none_or(|p| p.is_empty()),
            "{r:?}"
        );
    }

    /// A child cgroup made in the shared cgroup since the kit was armed may hold the
    /// task that grows, and its task list is not kept: the kill refuses and names it
    /// rather than choose among the tasks it knows.
    #[test]
    fn inside_a_shared_cgroup_a_child_cgroup_made_since_makes_the_kill_refuse() {
        let t = tempfile::tempdir().unwrap();
        let mut known = sleeper();
        let kp = known.id() as i32;
        fake_proc(&t.path().join("proc"), kp, 0);
        let env = shared_env(t.path(), &[kp]);
        assert_eq!(env.armed.summary().1, 2, "/cg and /cg/agent are kept");
        std::fs::create_dir(t.path().join("cg/cg/new")).unwrap();
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let r = signal_victim(&env, &ctx, &largest(), libc::SIGKILL, None);
        let known_alive = matches!(known.try_wait(), Ok(None));
        let _ = known.kill();
        let _ = known.wait();
        assert_eq!(r.outcome, Outcome::Skipped, "{r:?}");
        let err = r.error.unwrap_or_default();
        assert!(err.contains("/cg/new appeared since"), "{err}");
        assert!(known_alive, "the known task was killed");
    }

    /// A task armed while it was still about to exec (`runc init`, a shell) is chosen
    /// by what it runs at the wall: its name and command line are read again there
    /// through the kept files, so a `prefer` or `avoid` rule on the program it exec'd holds.
    #[test]
    fn the_kit_chooses_by_the_program_a_task_runs_now_not_the_one_it_was_armed_as() {
        let t = tempfile::tempdir().unwrap();
        let mut db = sleeper();
        let mut other = sleeper();
        let (dp, op) = (db.id() as i32, other.id() as i32);
        let proc_root = t.path().join("proc");
        fake_proc(&proc_root, dp, 0);
        fake_proc(&proc_root, op, 0);
        let env = shared_env(t.path(), &[dp, op]);
        // After arming, `dp` execs the database: same process (start time), new comm
        // and command line.
        let stat_path = proc_root.join(format!("{dp}/stat"));
        let real = std::fs::read_to_string(&stat_path).unwrap();
        let (open, close) = (real.find('(').unwrap(), real.rfind(')').unwrap());
        let exec = format!("{}(postgres{}", &real[..open], &real[close..]);
        std::fs::write(&stat_path, exec).unwrap();
        std::fs::write(
            proc_root.join(format!("{dp}/cmdline")),
            "postgres\0-D\0/db\0",
        )
        .unwrap();
        let l = env
            .armed
            .listing(
                env.ctl.as_ref(),
                &proc_root,
                &CgroupPath::new("/cg"),
                env.self_pid,
            )
            .unwrap();
        let listed = l.tasks.iter().find(|t| t.pid == dp).unwrap();
        assert_eq!(listed.comm, "postgres");
        assert_eq!(listed.cmdline.as_deref(), Some("postgres -D /db"));
        // Without a rule the tie goes to the newer PID (`op`); a prefer rule on the
        // program `dp` runs now picks `dp`.
        let spec = crate::policy::VictimSpec {
            order: crate::policy::VictimOrder::LargestRss,
            prefer: vec![regex::Regex::new("^postgres -D").unwrap()],
            avoid: Vec::new(),
        };
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let ctx = testing::ctx(&cg, &set.policies()[0], false);
        let r = signal_victim(&env, &ctx, &spec, libc::SIGKILL, None);
        let other_alive = matches!(other.try_wait(), Ok(None));
        for c in [&mut db, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(r.fields["pid"], dp, "{r:?}");
        assert_eq!(r.fields["comm"], "postgres", "{r:?}");
        assert!(other_alive, "the other task was killed");
    }

    /// A PID armed as one process and listed later as another (the first exited and
    /// the PID was reused) is not taken for the armed one: its kept files no longer
    /// describe it (a different start time here), so it is read anew.
    #[test]
    fn a_reused_pid_is_read_anew_not_taken_for_the_armed_process() {
        let t = tempfile::tempdir().unwrap();
        let mut child = sleeper();
        let pid = child.id() as i32;
        let proc_root = t.path().join("proc");
        fake_proc(&proc_root, pid, 0);
        let env = shared_env(t.path(), &[pid]);
        let stat_path = proc_root.join(format!("{pid}/stat"));
        let real = std::fs::read_to_string(&stat_path).unwrap();
        let (_, start) = crate::armed::parse_stat_rss(&real).unwrap();
        // The "new" process behind the PID: another start time in every /proc file.
        let close = real.rfind(')').unwrap();
        let mut fields: Vec<String> = real[close + 2..]
            .split_whitespace()
            .map(String::from)
            .collect();
        fields[19] = (start + 1000).to_string();
        let newer = format!("{} {}", &real[..=close], fields.join(" "));
        std::fs::write(&stat_path, &newer).unwrap();
        let l = env
            .armed
            .listing(
                env.ctl.as_ref(),
                &proc_root,
                &CgroupPath::new("/cg"),
                env.self_pid,
            )
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(l.tasks.len(), 1, "{:?}", l.tasks);
        assert_eq!(
            l.tasks[0].start_ticks,
            start + 1000,
            "taken for the armed one"
        );
    }

    /// `kill_all` of a cgroup that holds the agent never writes v2's `cgroup.kill`,
    /// which would kill the agent too.
    #[test]
    fn kill_all_of_a_cgroup_the_agent_shares_does_not_use_cgroup_kill() {
        use crate::cgroup::{v2::V2, Hierarchy, Kind};
        let t = tempfile::tempdir().unwrap();
        let mut normal = sleeper();
        let np = normal.id() as i32;
        fake_proc(&t.path().join("proc"), np, 0);
        let mut env = shared_env(t.path(), &[np]);
        let cg_root = t.path().join("cg");
        std::fs::write(cg_root.join("cg/cgroup.kill"), "").unwrap();
        env.ctl = Box::new(V2::new(Hierarchy::fake(&cg_root, Kind::V2)));
        let set = PolicySet::embedded_default();
        let cg = CgroupPath::new("/cg");
        let r = kill_all(&env, &testing::ctx(&cg, &set.policies()[0], false));
        assert_eq!(ended_by(&mut normal), Some(libc::SIGKILL), "{r:?}");
        assert_eq!(
            std::fs::read_to_string(cg_root.join("cg/cgroup.kill")).unwrap(),
            "",
            "cgroup.kill would kill the agent: {r:?}"
        );
        assert_eq!(r.fields["via"], "armed");
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
