//! `kernel_oom_kill`: hand one stall back to the kernel's own OOM killer, for a cgroup
//! where the agent cannot choose or signal a victim itself (it shares the stuck cgroup:
//! every open, pidfd and read buffer it would need is charged there and fails with
//! ENOMEM). The kernel's OOM killer needs no memory from the agent, and skips it
//! (`oom_score_adj` -1000, where the agent may set it).
//!
//! v1: `oom_kill_disable` 0 through the `memory.oom_control` descriptor kept open for
//! the cgroup (the write wakes the sleepers; the first charge that fails again runs the
//! kernel's OOM killer), wait for the kill, and 1 again in every case. The kill is
//! seen as the file's `oom_kill` counter rising, or as the kernel's log line naming a
//! victim of this cgroup's OOM ([`crate::kmsg`]): v1 counts a kill only in the
//! victim's own cgroup, so a kill in a child of the stuck cgroup leaves the stuck
//! cgroup's counter where it was. The kernel chooses within the memory cgroup that is out of memory:
//! the stuck cgroup, which is the one the episode runs on (a parent whose limit was hit
//! has the episode, not its child).
//!
//! v2: there is no switch; the agent holds the workload at `memory.high` below
//! `memory.max`. The hand-off lifts `memory.high` to `max` (the workload then reaches
//! `memory.max`, where the kernel kills), waits for `memory.events` `oom_kill` to
//! rise, and puts back the value it found. A loan's writes wait meanwhile (the loan
//! book's gate of the cgroup).
//!
//! Between the two writes a crash of the agent would leave v1's OOM killer enabled
//! (the kernel's default, but not the operator's setting): before the first write a
//! record is written to the state dir (`kernel-oom-<hash>.json`), removed after the
//! second, and [`recover`] puts back `oom_kill_disable 1` at the next start. The
//! record needs a page cache page: an agent that shares the stuck cgroup usually
//! cannot write it (ENOMEM), hands off anyway and says so (`crash_record: false`). On
//! v2 the hold's own journal covers it: a restart holds the cgroup again.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Env, Outcome, Report, StepCtx};
use crate::cgroup::{parse::is_unlimited, CgroupPath, Identity, Kind, Limits};
use crate::kmsg;

/// How often the counter is read while the kernel works.
const POLL: Duration = Duration::from_millis(2);
/// The write-back of the operator's setting is tried this often before giving up.
const WRITE_BACK_TRIES: u32 = 5;
/// After the counter rose, how long the kernel's `Killed process` line may take.
const KMSG_WAIT: Duration = Duration::from_millis(200);

/// Runs the hand-off (see the module docs).
pub fn kernel_oom_kill(env: &Env, ctx: &StepCtx, timeout: Duration) -> Report {
    match env.ctl.hierarchy().kind() {
        Kind::V1 => v1(env, ctx, timeout),
        Kind::V2 => v2(env, ctx, timeout),
    }
}

fn base(outcome: Outcome, error: Option<String>) -> Report {
    let mut r = Report::new(outcome)
        .with("via", "kernel")
        .with("signal", "SIGKILL");
    r.error = error;
    r
}

fn oom_kills(env: &Env, cg: &CgroupPath) -> Option<u64> {
    env.ctl.oom_state(cg).ok().flatten().map(|s| s.oom_kill)
}

/// How the wait for the kernel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// The first write failed: nothing was handed over.
    NotHanded,
    Killed,
    Recovered,
    Cancelled,
    TimedOut,
}

/// How long the stall must look over before the wait ends without a kill seen: the
/// write wakes the sleepers, which leave the OOM wait (under_oom may read 0) before they
/// charge again and the kernel kills.
const RECOVER_GRACE: Duration = Duration::from_millis(100);

/// Waits for the kernel to kill: the `oom_kill` counter above `before`, or a victim of
/// the cgroup in the kernel's log (v1 counts a kill in the victim's own cgroup only,
/// not in the stuck parent), at most `timeout`. `end_when_clear`: also end once the
/// stall has looked over for [`RECOVER_GRACE`] (v1; on v2 lifting the hold is what
/// makes it look over, while the workload grows on to memory.max).
#[allow(clippy::too_many_arguments)]
fn wait_for_kill(
    env: &Env,
    ctx: &StepCtx,
    before: u64,
    mark: Option<&kmsg::Mark>,
    dir: &Path,
    timeout: Duration,
    start: Instant,
    end_when_clear: bool,
) -> Waited {
    let mut clear_since: Option<Instant> = None;
    loop {
        if oom_kills(env, ctx.cgroup).is_some_and(|n| n > before) {
            return Waited::Killed;
        }
        if mark.is_some_and(|m| !kmsg::victims(&m.lines(), dir).0.is_empty()) {
            return Waited::Killed;
        }
        if (ctx.cancelled)() {
            return Waited::Cancelled;
        }
        if !end_when_clear || (ctx.still_stuck)() {
            clear_since = None;
        } else if clear_since.get_or_insert_with(Instant::now).elapsed() >= RECOVER_GRACE {
            return Waited::Recovered;
        }
        if start.elapsed() >= timeout {
            return Waited::TimedOut;
        }
        std::thread::sleep(POLL);
    }
}

/// The cgroup's path as the kernel's OOM summaries in `/dev/kmsg` print it (see
/// [`kmsg::names`]).
fn kmsg_path(env: &Env, cg: &CgroupPath) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let p = env.ctl.hierarchy().proc_path(cg);
    PathBuf::from(std::ffi::OsStr::from_bytes(p.as_bytes()))
}

/// False when the cgroup at `cg`'s path is not the one whose identity was `then` (it
/// was removed, or removed and made again): a write-back must not go there. True when
/// it is, or when that cannot be told (no identity then, or a stat that fails now: at
/// the wall of a cgroup the agent shares it can).
fn same_cgroup(env: &Env, cg: &CgroupPath, then: Option<&Identity>) -> bool {
    let Some(then) = then else {
        return true;
    };
    match env.ctl.hierarchy().identity(cg) {
        Ok(Some(now)) => now == *then,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Tries `f` until it succeeds, [`WRITE_BACK_TRIES`] times at most.
fn retried<E: ToString>(mut f: impl FnMut() -> Result<(), E>) -> Result<u32, String> {
    let mut last = String::new();
    for i in 1..=WRITE_BACK_TRIES {
        match f() {
            Ok(()) => return Ok(i),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(10 * u64::from(i)));
    }
    Err(last)
}

/// Writes back what the hand-off changed, [`retried`], but only while `cg` is still the
/// cgroup with `identity` (one made again under its name is not the one handed off).
/// Returns the write's result and whether the cgroup was found replaced (nothing
/// written then).
fn put_back<E: ToString>(
    env: &Env,
    cg: &CgroupPath,
    identity: Option<&crate::cgroup::Identity>,
    mut write: impl FnMut() -> Result<(), E>,
) -> (Result<u32, String>, bool) {
    let mut replaced = false;
    let back = retried(|| {
        if !same_cgroup(env, cg, identity) {
            replaced = true;
            return Ok(());
        }
        write().map_err(|e| e.to_string())
    });
    (back, replaced)
}

/// The victims named by the kernel's log since `mark`, as audit fields; returns how
/// many there are. `expect`: a kill happened or may have (wait a little for its line).
fn name_victims(r: &mut Report, mark: Option<&kmsg::Mark>, dir: &Path, expect: u64) -> u64 {
    let Some(mark) = mark else {
        r.fields.insert("victim".into(), "unknown".into());
        r.fields.insert(
            "victim_unknown".into(),
            "/dev/kmsg could not be read at start".into(),
        );
        return 0;
    };
    // The counter rises before the kernel prints the kill.
    let until = Instant::now()
        + if expect > 0 {
            KMSG_WAIT
        } else {
            Duration::ZERO
        };
    let (found, unattributed) = loop {
        let (v, u) = kmsg::victims(&mark.lines(), dir);
        if v.len() as u64 >= expect.max(1) || Instant::now() >= until {
            break (v, u);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    match found.first() {
        Some(v) => {
            r.fields.insert("pid".into(), v.pid.into());
            r.fields.insert("comm".into(), v.comm.clone().into());
            r.fields
                .insert("task_memcg".into(), v.task_memcg.clone().into());
            if found.len() > 1 {
                let all: Vec<Value> = found
                    .iter()
                    .map(|v| json!({"pid": v.pid, "comm": v.comm, "task_memcg": v.task_memcg}))
                    .collect();
                r.fields.insert("victims".into(), all.into());
            }
        }
        None if expect > 0 => {
            r.fields.insert("victim".into(), "unknown".into());
            r.fields.insert(
                "victim_unknown".into(),
                if unattributed > 0 {
                    format!("the kernel logged {unattributed} kill(s) without its rate-limited OOM summary, which names the cgroup")
                } else {
                    "no kernel line names a victim of this cgroup".to_string()
                }
                .into(),
            );
        }
        None => {}
    }
    found.len() as u64
}

fn v1(env: &Env, ctx: &StepCtx, timeout: Duration) -> Report {
    let cg = ctx.cgroup;
    let state = match env.ctl.oom_state(cg) {
        Ok(Some(s)) => s,
        Ok(None) => return Report::skipped("the cgroup is gone"),
        Err(e) => return Report::failed(e),
    };
    if !state.oom_kill_disable {
        return base(
            Outcome::Skipped,
            Some(
                "oom_kill_disable is 0: the kernel's OOM killer acts on this cgroup by itself"
                    .into(),
            ),
        );
    }
    if ctx.audit {
        return base(Outcome::Would, None)
            .with("file", "memory.oom_control")
            .with("oom_kill", state.oom_kill)
            .with("timeout_ms", timeout.as_millis() as u64);
    }
    let dir = kmsg_path(env, cg);
    // Which cgroup this is: the write-back never goes to another one made since under
    // the same name.
    let identity = env.ctl.hierarchy().identity(cg).ok().flatten();
    let record = env
        .loans
        .state_dir()
        .map(|d| Record::write(&d, cg, identity.clone()));
    let mark = kmsg::mark();
    let start = Instant::now();
    let handed = env.ctl.set_oom_kill_disable(cg, false);
    crate::loan::fault::point("handoff_enabled");
    let mut r = base(Outcome::Done, None)
        .with("oom_kill_before", state.oom_kill)
        .with("timeout_ms", timeout.as_millis() as u64);
    match &record {
        Some(Ok(_)) => r = r.with("crash_record", true),
        Some(Err(e)) => {
            r = r
                .with("crash_record", false)
                .with("crash_record_error", e.clone())
        }
        None => r = r.with("crash_record", false),
    }
    let waited = match &handed {
        Ok(kept) => {
            r.fields.insert(
                "descriptor".into(),
                if *kept { "kept" } else { "opened" }.into(),
            );
            wait_for_kill(
                env,
                ctx,
                state.oom_kill,
                mark.as_ref(),
                &dir,
                timeout,
                start,
                true,
            )
        }
        Err(_) => Waited::NotHanded,
    };
    let waited_ms = start.elapsed().as_millis() as u64;
    // Always, whatever happened: the operator's setting back, but only to the same
    // cgroup. The write goes by the path's descriptor (kept, or re-opened and kept
    // again once the watcher saw the path anew), so a cgroup removed meanwhile and
    // made again under its name would get it: it is not the operator's, and 1 there
    // would leave it with no OOM killer at all. The one removed took the setting with
    // it.
    let (back, replaced) = put_back(env, cg, identity.as_ref(), || {
        env.ctl.set_oom_kill_disable(cg, true).map(|_| ())
    });
    if replaced {
        log::info!(
            "{cg}: removed during the hand-off (or made again since): oom_kill_disable not written back"
        );
    }
    let after = oom_kills(env, cg).unwrap_or(state.oom_kill);
    let counted = after.saturating_sub(state.oom_kill);
    r = r
        .with("oom_kill_counter_delta", counted)
        .with("waited_ms", waited_ms);
    match &back {
        Ok(_) if replaced => {
            r = r
                .with("oom_kill_disable_restored", false)
                .with("cgroup_gone", true);
            if let Some(Ok(rec)) = &record {
                rec.remove();
            }
        }
        Ok(_) => {
            r = r.with("oom_kill_disable_restored", true);
            if let Some(Ok(rec)) = &record {
                rec.remove();
            }
        }
        Err(e) => {
            log::error!(
                "{cg}: cannot write oom_kill_disable 1 back to memory.oom_control after {WRITE_BACK_TRIES} tries ({e}): the kernel's OOM killer stays enabled for this cgroup"
            );
            r = r
                .with("oom_kill_disable_restored", false)
                .with("restore_error", e.clone());
        }
    }
    let expect = u64::from(matches!(waited, Waited::Killed | Waited::Recovered)).max(counted);
    let named = name_victims(&mut r, mark.as_ref(), &dir, expect);
    let kills = counted.max(named);
    r = r.with("oom_kills", kills);
    finish(r, handed.err().map(|e| e.to_string()), waited, kills, &back)
}

/// The outcome from what happened: a kill is `done` even if the write-back failed (the
/// audit line says so, and the error is logged); no kill is `failed`, except when the
/// stall ended by itself meanwhile (`done`, 0 kills).
fn finish(
    mut r: Report,
    hand_err: Option<String>,
    waited: Waited,
    kills: u64,
    back: &Result<u32, String>,
) -> Report {
    r.fields.insert(
        "ended".into(),
        match waited {
            Waited::NotHanded => "not_handed",
            Waited::Killed => "killed",
            Waited::Recovered => "recovered",
            Waited::Cancelled => "cancelled",
            Waited::TimedOut => "timed_out",
        }
        .into(),
    );
    let back_err = back
        .as_ref()
        .err()
        .map(|e| format!("the setting could not be put back: {e}"));
    if let Some(e) = hand_err {
        r.outcome = Outcome::Failed;
        r.error = Some(match back_err {
            Some(b) => format!("{e}; {b}"),
            None => e,
        });
        return r;
    }
    if kills > 0 || waited == Waited::Recovered {
        r.error = back_err;
        return r;
    }
    r.outcome = Outcome::Failed;
    let why = match waited {
        Waited::Cancelled => "the agent is stopping".to_string(),
        _ => "the kernel killed nothing in time (every task may have oom_score_adj -1000, or none is charging)".to_string(),
    };
    r.error = Some(match back_err {
        Some(b) => format!("{why}; {b}"),
        None => why,
    });
    r
}

fn v2(env: &Env, ctx: &StepCtx, timeout: Duration) -> Report {
    let cg = ctx.cgroup;
    let cur = match env.ctl.limits(cg) {
        Ok(Some(l)) => l,
        Ok(None) => return Report::skipped("the cgroup is gone"),
        Err(e) => return Report::failed(e),
    };
    if is_unlimited(cur.memory) {
        return base(
            Outcome::Skipped,
            Some("memory.max is max: there is no limit the kernel's OOM killer acts at".into()),
        );
    }
    let high = cur.high.unwrap_or(u64::MAX);
    if high >= cur.memory {
        return base(
            Outcome::Skipped,
            Some("memory.high is not below memory.max: nothing holds the workload back from the kernel's OOM killer".into()),
        );
    }
    let before = match env.ctl.oom_state(cg) {
        Ok(Some(s)) => s.oom_kill,
        Ok(None) => return Report::skipped("the cgroup is gone"),
        Err(e) => return Report::failed(e),
    };
    let fields = |r: Report| {
        r.with("memory_high", high)
            .with("memory_max", cur.memory)
            .with("timeout_ms", timeout.as_millis() as u64)
    };
    if ctx.audit {
        return fields(base(Outcome::Would, None))
            .with("file", "memory.events")
            .with("oom_kill", before);
    }
    let dir = kmsg_path(env, cg);
    let identity = env.ctl.hierarchy().identity(cg).ok().flatten();
    let lifted = Limits {
        high: Some(u64::MAX),
        ..cur
    };
    // No loan write of this cgroup between the lift and the put-back: the book would
    // take memory.high at `max` for someone else's value.
    env.loans.with_gate(cg, || {
        let mark = kmsg::mark();
        let start = Instant::now();
        let handed = env.ctl.set_limits(cg, cur, lifted);
        let waited = match &handed {
            Ok(()) => {
                wait_for_kill(env, ctx, before, mark.as_ref(), &dir, timeout, start, false)
            }
            Err(_) => Waited::NotHanded,
        };
        let waited_ms = start.elapsed().as_millis() as u64;
        // Only to the same cgroup (see v1): one made again under its name is not
        // the one whose hold was lifted.
        let (back, replaced) = put_back(env, cg, identity.as_ref(), || {
            env.ctl.set_limits(cg, lifted, cur)
        });
        let after = oom_kills(env, cg).unwrap_or(before);
        let counted = after.saturating_sub(before);
        let mut r = fields(base(Outcome::Done, None))
            .with("oom_kill_before", before)
            .with("oom_kill_counter_delta", counted)
            .with("waited_ms", waited_ms)
            .with("high_restored", back.is_ok() && !replaced);
        if replaced {
            r = r.with("cgroup_gone", true);
        }
        if let Err(e) = &back {
            log::error!(
                "{cg}: cannot put memory.high {high} back after {WRITE_BACK_TRIES} tries ({e}): the workload is held at memory.max only"
            );
            r = r.with("restore_error", e.clone());
        }
        let expect = u64::from(matches!(waited, Waited::Killed | Waited::Recovered)).max(counted);
        let named = name_victims(&mut r, mark.as_ref(), &dir, expect);
        let kills = counted.max(named);
        r = r.with("oom_kills", kills);
        finish(r, handed.err().map(|e| e.to_string()), waited, kills, &back)
    })
}

/// The record of a v1 hand-off in flight, in the state dir.
pub struct Record {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RecordFile {
    cgroup: CgroupPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<Identity>,
}

/// The prefix of hand-off records in the state dir.
const RECORD_PREFIX: &str = "kernel-oom-";

fn record_path(state_dir: &Path, cg: &CgroupPath) -> PathBuf {
    // FNV-1a: a stable name per cgroup (two hand-offs of one cgroup never overlap: one
    // episode per stall).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cg.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    state_dir.join(format!("{RECORD_PREFIX}{h:016x}.json"))
}

impl Record {
    /// Written before `oom_kill_disable` 0. Not fsynced: cgroups do not outlive a
    /// reboot, and a crash of the agent leaves the page cache in place.
    fn write(
        state_dir: &Path,
        cg: &CgroupPath,
        identity: Option<Identity>,
    ) -> Result<Record, String> {
        let path = record_path(state_dir, cg);
        let body = serde_json::to_vec(&RecordFile {
            cgroup: cg.clone(),
            identity,
        })
        .map_err(|e| e.to_string())?;
        // Never through a symbolic link planted in its place (the agent runs as root:
        // following one would truncate whatever it names).
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(&body))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Record { path })
    }

    fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("{}: {e}", self.path.display());
        }
    }
}

/// At start: puts `oom_kill_disable 1` back on every cgroup a hand-off of the previous
/// run left enabled (it crashed between its two writes). Returns what it did, one
/// `(cgroup, outcome)` per record, for the audit log.
pub fn recover(ctl: &dyn crate::cgroup::Controller, state_dir: &Path) -> Vec<(CgroupPath, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(state_dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(RECORD_PREFIX) || !name.ends_with(".json") {
            continue;
        }
        let path = e.path();
        let rec: Option<RecordFile> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(rec) = rec else {
            log::warn!(
                "{}: unreadable kernel_oom_kill record, removed",
                path.display()
            );
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let cg = rec.cgroup;
        let now = ctl.hierarchy().identity(&cg).ok().flatten();
        let what = match (ctl.oom_state(&cg), &rec.identity, &now) {
            (Ok(None), _, _) | (_, _, None) => "gone".to_string(),
            (_, Some(then), Some(now)) if then != now => "replaced".to_string(),
            (Ok(Some(s)), _, _) if s.oom_kill_disable => "already 1".to_string(),
            (Ok(Some(_)), _, _) => match ctl.set_oom_kill_disable(&cg, true) {
                Ok(_) => "restored".to_string(),
                Err(e) => format!("failed: {e}"),
            },
            (Err(e), _, _) => format!("failed: {e}"),
        };
        if !what.starts_with("failed") {
            let _ = std::fs::remove_file(&path);
        }
        out.push((cg, what));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::testing;
    use crate::policy::{Action, Step};

    fn fake(oom_control: &str) -> (tempfile::TempDir, tempfile::TempDir, CgroupPath) {
        let root = tempfile::tempdir().unwrap();
        let procs = tempfile::tempdir().unwrap();
        let d = root.path().join("pod");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("memory.oom_control"), oom_control).unwrap();
        (root, procs, CgroupPath::new("/pod"))
    }

    fn policy() -> crate::policy::Policy {
        let mut p = crate::policy::PolicySet::embedded_default().policies()[0]
            .as_ref()
            .clone();
        p.steps = vec![Step {
            action: Action::KernelOomKill {
                timeout: Duration::from_millis(50),
            },
            settle: Duration::ZERO,
        }];
        p
    }

    #[test]
    fn audit_mode_names_the_counter_it_would_watch_and_writes_nothing() {
        let (root, procs, cg) = fake("oom_kill_disable 1\nunder_oom 1\noom_kill 4\n");
        let env = testing::env(root.path(), procs.path());
        let p = policy();
        let r = kernel_oom_kill(&env, &testing::ctx(&cg, &p, true), Duration::from_secs(2));
        assert_eq!(r.outcome, Outcome::Would);
        assert_eq!(r.fields["oom_kill"], 4);
        assert_eq!(r.fields["via"], "kernel");
        assert_eq!(r.sigkilled(), 0);
        assert_eq!(
            std::fs::read_to_string(root.path().join("pod/memory.oom_control")).unwrap(),
            "oom_kill_disable 1\nunder_oom 1\noom_kill 4\n"
        );
    }

    #[test]
    fn a_cgroup_the_kernel_already_kills_in_is_skipped() {
        let (root, procs, cg) = fake("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n");
        let env = testing::env(root.path(), procs.path());
        let p = policy();
        let r = kernel_oom_kill(&env, &testing::ctx(&cg, &p, false), Duration::from_secs(2));
        assert_eq!(r.outcome, Outcome::Skipped);
        assert!(r.error.unwrap().contains("oom_kill_disable is 0"));
    }

    #[test]
    fn the_setting_is_written_back_when_the_kernel_kills_nothing() {
        // A fake file keeps what is written: the hand-off times out (no counter rise)
        // and must leave `1` behind, failing the step.
        let (root, procs, cg) = fake("oom_kill_disable 1\nunder_oom 1\noom_kill 0\n");
        let env = testing::env(root.path(), procs.path());
        let p = policy();
        let r = kernel_oom_kill(
            &env,
            &testing::ctx(&cg, &p, false),
            Duration::from_millis(30),
        );
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(r.fields["oom_kill_disable_restored"], true);
        assert_eq!(r.fields["ended"], "timed_out");
        assert_eq!(
            std::fs::read_to_string(root.path().join("pod/memory.oom_control")).unwrap(),
            "1"
        );
    }

    fn v2_env(max: &str, high: &str) -> (tempfile::TempDir, Env, CgroupPath) {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("app");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("memory.max"), max).unwrap();
        std::fs::write(d.join("memory.high"), high).unwrap();
        std::fs::write(d.join("memory.current"), "50331648\n").unwrap();
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 9\nmax 0\noom 0\noom_kill 0\n",
        )
        .unwrap();
        // The v1 fixture with a v2 controller on the same directory.
        let mut env = testing::env(root.path(), root.path());
        env.ctl = Box::new(crate::cgroup::v2::V2::new(crate::cgroup::Hierarchy::fake(
            root.path(),
            Kind::V2,
        )));
        (root, env, CgroupPath::new("/app"))
    }

    #[test]
    fn v2_without_a_limit_or_a_hold_below_it_is_skipped_with_the_reason() {
        let p = policy();
        let (_t, env, cg) = v2_env("max\n", "50331648\n");
        let r = kernel_oom_kill(&env, &testing::ctx(&cg, &p, false), Duration::from_secs(2));
        assert_eq!(r.outcome, Outcome::Skipped);
        assert!(r.error.unwrap().contains("memory.max is max"));
        let (_t, env, cg) = v2_env("67108864\n", "max\n");
        let r = kernel_oom_kill(&env, &testing::ctx(&cg, &p, false), Duration::from_secs(2));
        assert_eq!(r.outcome, Outcome::Skipped);
        assert!(r.error.unwrap().contains("not below memory.max"));
    }

    #[test]
    fn v2_audit_mode_names_the_counter_and_lifts_nothing() {
        let p = policy();
        let (t, env, cg) = v2_env("67108864\n", "50331648\n");
        let r = kernel_oom_kill(&env, &testing::ctx(&cg, &p, true), Duration::from_secs(2));
        assert_eq!(r.outcome, Outcome::Would, "{r:?}");
        assert_eq!(r.fields["file"], "memory.events");
        assert_eq!(r.fields["memory_high"], 48u64 << 20);
        assert_eq!(r.fields["memory_max"], 64u64 << 20);
        assert_eq!(
            std::fs::read_to_string(t.path().join("app/memory.high")).unwrap(),
            "50331648\n"
        );
    }

    #[test]
    fn v2_puts_the_hold_back_when_the_kernel_kills_nothing() {
        let p = policy();
        let (t, env, cg) = v2_env("67108864\n", "50331648\n");
        let r = kernel_oom_kill(
            &env,
            &testing::ctx(&cg, &p, false),
            Duration::from_millis(30),
        );
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert_eq!(r.fields["high_restored"], true);
        assert_eq!(r.fields["ended"], "timed_out");
        assert_eq!(
            std::fs::read_to_string(t.path().join("app/memory.high")).unwrap(),
            "50331648"
        );
    }

    /// The cgroup is removed and made again under its name while the hand-off waits:
    /// the new one's memory.high is not written (it is not the cgroup whose hold was
    /// lifted).
    #[test]
    fn v2_puts_no_hold_on_a_cgroup_made_again_under_the_same_name() {
        let p = policy();
        let (t, env, cg) = v2_env("67108864\n", "50331648\n");
        let dir = t.path().join("app");
        let swap = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                // Renamed away (its inode stays taken), then made again.
                std::fs::rename(&dir, dir.with_file_name("app-old")).unwrap();
                std::fs::create_dir(&dir).unwrap();
                for (f, v) in [
                    ("memory.max", "max\n"),
                    ("memory.high", "max\n"),
                    ("memory.current", "0\n"),
                    ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"),
                ] {
                    std::fs::write(dir.join(f), v).unwrap();
                }
            })
        };
        let r = kernel_oom_kill(
            &env,
            &testing::ctx(&cg, &p, false),
            Duration::from_millis(150),
        );
        swap.join().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.high")).unwrap(),
            "max\n",
            "written to the new cgroup: {r:?}"
        );
        assert_eq!(r.fields["high_restored"], false, "{r:?}");
        assert_eq!(r.fields["cgroup_gone"], true, "{r:?}");
    }

    #[test]
    fn a_kernel_kill_counts_as_sigkilled_even_without_a_pid() {
        let r = base(Outcome::Done, None).with("oom_kills", 2u64);
        assert_eq!(r.sigkilled(), 2);
        let r = base(Outcome::Failed, None).with("oom_kills", 0u64);
        assert_eq!(r.sigkilled(), 0);
    }

    /// A symbolic link planted where a hand-off writes its record is not followed (the
    /// agent is root: it would truncate the file the link names).
    #[test]
    fn the_crash_record_is_never_written_through_a_symlink() {
        let state = tempfile::tempdir().unwrap();
        let cg = CgroupPath::new("/pod");
        let precious = state.path().join("precious");
        std::fs::write(&precious, "keep me").unwrap();
        std::os::unix::fs::symlink(&precious, record_path(state.path(), &cg)).unwrap();
        let r = Record::write(state.path(), &cg, None);
        assert!(r.is_err(), "written through the link");
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    }

    #[test]
    fn a_record_left_by_a_crash_puts_oom_kill_disable_back_at_start() {
        let (root, _procs, cg) = fake("oom_kill_disable 0\nunder_oom 0\n");
        let state = tempfile::tempdir().unwrap();
        let ctl = crate::cgroup::v1::V1::new(crate::cgroup::Hierarchy::fake(root.path(), Kind::V1));
        let rec = Record::write(state.path(), &cg, None).unwrap();
        assert!(rec.path.exists());
        // Another record whose cgroup is gone is dropped too.
        Record::write(state.path(), &CgroupPath::new("/gone"), None).unwrap();
        let mut done = recover(&ctl, state.path());
        done.sort();
        assert_eq!(
            done,
            vec![
                (CgroupPath::new("/gone"), "gone".to_string()),
                (cg.clone(), "restored".to_string())
            ]
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("pod/memory.oom_control")).unwrap(),
            "1"
        );
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
    }
}
