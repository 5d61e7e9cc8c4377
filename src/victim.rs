//! Choosing whom to signal: the tasks of a cgroup's subtree as `/proc` describes them,
//! ordered by the policy's criterion with `prefer` first and `avoid` last. Never pid 1,
//! never the agent itself, never a task the operator shielded with oom_score_adj -1000,
//! never a kernel thread.
//!
//! Facts that cannot be read fail closed: an unreadable `cmdline` counts as matching
//! every `avoid` rule (and no `prefer` rule), an unreadable `oom_score_adj` as -1000.

use std::path::Path;

use crate::cgroup::{CgroupPath, Controller};
use crate::policy::{VictimOrder, VictimSpec};

/// One process, as read from `/proc/PID`.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub pid: i32,
    pub comm: String,
    /// `None` when `/proc/PID/cmdline` could not be read: such a task is ranked as if it
    /// matched every `avoid` rule.
    pub cmdline: Option<String>,
    pub rss_bytes: u64,
    pub oom_score: i64,
    /// -1000 (shielded) when it could not be read.
    pub oom_score_adj: i64,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat): tells a
    /// process from a later one that reuses its PID.
    pub start_ticks: u64,
    /// The cgroup (below the hierarchy root) the task was found in.
    pub cgroup: CgroupPath,
}

/// `comm` and start time from `/proc/PID/stat`. The comm may contain spaces and
/// parentheses, so split at the last `)`.
pub fn parse_stat(s: &str) -> Option<(String, u64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); starttime is field 22.
    let start = rest.get(19)?.parse().ok()?;
    Some((comm, start))
}

/// `VmRSS` from `/proc/PID/status` in bytes; `None` for kernel threads (no mm).
pub fn parse_status_rss(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `/proc/PID/cmdline` as the policy's rules match it: arguments joined by spaces.
pub fn cmdline_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches('\0')
        .replace('\0', " ")
}

/// Start ticks of a live process, to re-check identity after opening a pidfd.
pub fn start_ticks(proc_root: &Path, pid: i32) -> Option<u64> {
    let path = proc_root.join(pid.to_string()).join("stat");
    let s = std::fs::read_to_string(&path)
        .map_err(|e| note_read_error(&path, &e))
        .ok()?;
    parse_stat(&s).map(|(_, t)| t)
}

thread_local! {
    /// What this thread could not read of `/proc` and the cgroups since the last
    /// [`take_gaps`] (see [`Gaps`]).
    static GAPS: std::cell::RefCell<Gaps> = const {
        std::cell::RefCell::new(Gaps { out_of_memory: false, first: None })
    };
}

/// What a listing of tasks could not read, for a kill step's report: a task left out
/// because its files could not be read is not a task that exited, and a cgroup whose
/// `cgroup.procs` could not be read is not an empty one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gaps {
    /// A read failed with ENOMEM: the agent shares a cgroup at its wall, where the
    /// kernel's `struct file` and seq_file buffers are charged too. (Which read fails
    /// varies: a small object may still come from the kernel's per-CPU pre-charged
    /// stock while a page-sized buffer cannot.)
    pub out_of_memory: bool,
    /// The first read that failed for a reason other than the process or cgroup being
    /// gone, with its error.
    pub first: Option<String>,
}

impl Gaps {
    /// True when something that exists could not be read.
    pub fn any(&self) -> bool {
        self.out_of_memory || self.first.is_some()
    }
}

/// Notes a read error of `what`: ENOMEM means the task was not read for want of memory,
/// not that it is gone; any error but "gone" (ENOENT, ESRCH) is a gap in the listing.
pub fn note_read_error(what: &Path, e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        return;
    }
    GAPS.with(|g| {
        let mut g = g.borrow_mut();
        if e.raw_os_error() == Some(libc::ENOMEM) {
            g.out_of_memory = true;
        }
        if g.first.is_none() {
            g.first = Some(format!("{}: {e}", what.display()));
        }
    });
}

/// What this thread could not read since the last call (and forgets it).
pub fn take_gaps() -> Gaps {
    GAPS.with(|g| std::mem::take(&mut *g.borrow_mut()))
}

/// Reads one task; `None` if it vanished or is a kernel thread (or could not be read:
/// see [`take_gaps`]).
pub fn read_task(proc_root: &Path, pid: i32, cgroup: &CgroupPath) -> Option<Task> {
    let dir = proc_root.join(pid.to_string());
    let read = |f: &str| {
        let path = dir.join(f);
        std::fs::read_to_string(&path)
            .map_err(|e| note_read_error(&path, &e))
            .ok()
    };
    let (comm, start_ticks) = parse_stat(&read("stat")?)?;
    let rss_bytes = parse_status_rss(&read("status")?)?;
    let cmdline = std::fs::read(dir.join("cmdline"))
        .ok()
        .map(|b| cmdline_text(&b));
    let num = |f: &str| read(f).and_then(|s| s.trim().parse().ok());
    Some(Task {
        pid,
        comm,
        cmdline,
        rss_bytes,
        // 0 is the lowest score: an unreadable score never ranks a task higher.
        oom_score: num("oom_score").unwrap_or(0),
        // Unreadable: treated as shielded, the promise the operator may have made.
        oom_score_adj: num("oom_score_adj").unwrap_or(SHIELDED),
        start_ticks,
        cgroup: cgroup.clone(),
    })
}

/// The oom_score_adj with which an operator exempts a task from every kill.
pub const SHIELDED: i64 = -1000;

impl Task {
    /// True if the operator exempted the task (or its oom_score_adj could not be read).
    pub fn shielded(&self) -> bool {
        self.oom_score_adj <= SHIELDED
    }
}

/// Every user task in `top` and its descendants, with its facts: the one source of truth
/// for "the tasks of a subtree". Never pid 1 nor `self_pid`; kernel threads and tasks
/// that vanished while being read are left out. Shielded tasks are included: callers
/// decide (and report) what they do with them.
pub fn subtree_tasks(
    ctl: &dyn Controller,
    proc_root: &Path,
    top: &CgroupPath,
    self_pid: i32,
) -> Vec<Task> {
    let mut out = Vec::new();
    let (cgroups, complete) = ctl.hierarchy().walk_checked(top);
    if !complete {
        let dir = ctl.hierarchy().dir(top);
        note_read_error(
            &dir,
            &std::io::Error::other("a directory of the subtree could not be listed"),
        );
    }
    for cg in cgroups {
        let pids = match ctl.procs(&cg) {
            Ok(Some(pids)) => pids,
            Ok(None) => continue,
            Err(e) => {
                let path = ctl.hierarchy().dir(&cg).join("cgroup.procs");
                match e.io_source() {
                    Some(io) => note_read_error(&path, io),
                    None => note_read_error(&path, &std::io::Error::other(e.to_string())),
                }
                continue;
            }
        };
        out.extend(
            pids.into_iter()
                .filter(|&p| p > 1 && p != self_pid)
                .filter_map(|p| read_task(proc_root, p, &cg)),
        );
    }
    out
}

/// Every task in `top` and its descendants that may be chosen as a victim: the subtree's
/// tasks without the shielded ones.
pub fn candidates(
    ctl: &dyn Controller,
    proc_root: &Path,
    top: &CgroupPath,
    self_pid: i32,
) -> Vec<Task> {
    let mut v = subtree_tasks(ctl, proc_root, top, self_pid);
    v.retain(|t| !t.shielded());
    v
}

fn matches_any(res: &[regex::Regex], t: &Task) -> bool {
    res.iter()
        .any(|r| r.is_match(&t.comm) || t.cmdline.as_deref().is_some_and(|c| r.is_match(c)))
}

/// An unreadable cmdline could hide a match: count it as avoided, so that it is chosen
/// only after every task whose facts are known.
fn avoided(spec: &VictimSpec, t: &Task) -> bool {
    t.cmdline.is_none() || matches_any(&spec.avoid, t)
}

/// Orders tasks best victim first: preferred before others, avoided only after every
/// other candidate, then by the policy's criterion (ties: newer PID first).
pub fn rank<'a>(tasks: &'a [Task], spec: &VictimSpec) -> Vec<&'a Task> {
    let mut v: Vec<&Task> = tasks.iter().collect();
    v.sort_by(|a, b| {
        let key = |t: &Task| (avoided(spec, t), !matches_any(&spec.prefer, t));
        key(a).cmp(&key(b)).then_with(|| {
            let by = match spec.order {
                VictimOrder::LargestRss => b.rss_bytes.cmp(&a.rss_bytes),
                VictimOrder::HighestOomScore => b.oom_score.cmp(&a.oom_score),
                VictimOrder::Newest => b.start_ticks.cmp(&a.start_ticks),
                VictimOrder::Oldest => a.start_ticks.cmp(&b.start_ticks),
            };
            by.then_with(|| b.pid.cmp(&a.pid))
        })
    });
    v
}

/// The best victim, if any.
pub fn choose<'a>(tasks: &'a [Task], spec: &VictimSpec) -> Option<&'a Task> {
    rank(tasks, spec).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn task(pid: i32, comm: &str, rss: u64, score: i64, start: u64) -> Task {
        Task {
            pid,
            comm: comm.into(),
            cmdline: Some(format!("/usr/bin/{comm} --flag")),
            rss_bytes: rss,
            oom_score: score,
            oom_score_adj: 0,
            start_ticks: start,
            cgroup: CgroupPath::new("/a"),
        }
    }

    fn spec(order: VictimOrder, prefer: &[&str], avoid: &[&str]) -> VictimSpec {
        VictimSpec {
            order,
            prefer: prefer.iter().map(|r| Regex::new(r).unwrap()).collect(),
            avoid: avoid.iter().map(|r| Regex::new(r).unwrap()).collect(),
        }
    }

    fn tasks() -> Vec<Task> {
        vec![
            task(10, "master", 300, 100, 1),
            task(11, "worker", 200, 900, 5),
            task(12, "worker", 100, 500, 9),
        ]
    }

    #[test]
    fn orders_by_criterion() {
        let t = tasks();
        let pick = |o| choose(&t, &spec(o, &[], &[])).unwrap().pid;
        assert_eq!(pick(VictimOrder::LargestRss), 10);
        assert_eq!(pick(VictimOrder::HighestOomScore), 11);
        assert_eq!(pick(VictimOrder::Newest), 12);
        assert_eq!(pick(VictimOrder::Oldest), 10);
    }

    #[test]
    fn prefer_first_avoid_last() {
        let t = tasks();
        let s = spec(VictimOrder::LargestRss, &["^worker"], &[]);
        assert_eq!(choose(&t, &s).unwrap().pid, 11);
        let s = spec(VictimOrder::LargestRss, &[], &["^master$"]);
        assert_eq!(choose(&t, &s).unwrap().pid, 11);
        // Matching on cmdline too.
        let s = spec(VictimOrder::Oldest, &["bin/worker"], &[]);
        assert_eq!(choose(&t, &s).unwrap().pid, 11);
    }

    #[test]
    fn avoided_chosen_only_when_alone() {
        let t = vec![task(10, "master", 300, 1, 1)];
        let s = spec(VictimOrder::LargestRss, &[], &["master"]);
        assert_eq!(choose(&t, &s).unwrap().pid, 10);
        assert!(choose(&[], &s).is_none());
    }

    #[test]
    fn stat_parsing_handles_odd_comm() {
        let s = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(s), Some(("a (b) c".to_string(), 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_rss() {
        assert_eq!(
            parse_status_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_status_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = crate::sys::getpid();
        let t = read_task(Path::new("/proc"), me, &CgroupPath::root()).unwrap();
        assert_eq!(t.pid, me);
        assert!(t.rss_bytes > 0);
        assert_eq!(start_ticks(Path::new("/proc"), me), Some(t.start_ticks));
    }

    /// A fake `/proc/PID` with the files `read_task` reads; `None` leaves a file out
    /// (as an unreadable one would be).
    fn fake_proc(root: &Path, pid: i32, comm: &str, cmdline: Option<&str>, adj: Option<i64>) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let stat = format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {pid}00 1000 10 0"
        );
        std::fs::write(d.join("stat"), stat).unwrap();
        std::fs::write(d.join("status"), "Name:\tx\nVmRSS:\t  4096 kB\n").unwrap();
        std::fs::write(d.join("oom_score"), "500\n").unwrap();
        if let Some(c) = cmdline {
            std::fs::write(d.join("cmdline"), c.replace(' ', "\0") + "\0").unwrap();
        }
        if let Some(a) = adj {
            std::fs::write(d.join("oom_score_adj"), format!("{a}\n")).unwrap();
        }
    }

    fn fake_cgroup(root: &Path, pids: &[i32]) -> crate::cgroup::v1::V1 {
        let cg = root.join("cg");
        std::fs::create_dir_all(&cg).unwrap();
        let list: String = pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(cg.join("cgroup.procs"), list).unwrap();
        crate::cgroup::v1::V1::new(crate::cgroup::Hierarchy::fake(
            root,
            crate::cgroup::Kind::V1,
        ))
    }

    #[test]
    fn unreadable_cmdline_is_avoided_not_matched_as_empty() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        // The protected master's cmdline cannot be read; a small worker can.
        fake_proc(&proc_root, 100, "nginx", None, Some(0));
        fake_proc(
            &proc_root,
            101,
            "nginx",
            Some("nginx: worker process"),
            Some(0),
        );
        let ctl = fake_cgroup(&t.path().join("cg"), &[100, 101]);
        let tasks = candidates(&ctl, &proc_root, &CgroupPath::new("/cg"), -1);
        assert_eq!(tasks.len(), 2, "{tasks:?}");
        let master = tasks.iter().find(|t| t.pid == 100).unwrap();
        assert_eq!(master.cmdline, None);
        // By age the master (started first) comes first, unless the avoid rule still
        // protects it.
        let s = spec(VictimOrder::Oldest, &[], &["^nginx: master"]);
        assert_eq!(choose(&tasks, &s).unwrap().pid, 101);
        // Even with no avoid rule matching anything, the unknown one goes last.
        let s = spec(VictimOrder::Oldest, &[], &[]);
        assert_eq!(choose(&tasks, &s).unwrap().pid, 101);
        // A prefer rule on the cmdline cannot pull it forward either.
        let s = spec(VictimOrder::Oldest, &["master"], &[]);
        assert_eq!(choose(&tasks, &s).unwrap().pid, 101);
        // Alone, it is still a candidate (avoided tasks are chosen last, not never).
        let only: Vec<Task> = tasks.iter().filter(|t| t.pid == 100).cloned().collect();
        assert_eq!(choose(&only, &s).unwrap().pid, 100);
    }

    #[test]
    fn unreadable_oom_score_adj_excludes_the_task() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        fake_proc(&proc_root, 200, "db", Some("db --serve"), None);
        fake_proc(&proc_root, 201, "shielded", Some("shielded"), Some(-1000));
        fake_proc(&proc_root, 202, "batch", Some("batch"), Some(0));
        let ctl = fake_cgroup(&t.path().join("cg"), &[200, 201, 202]);
        let top = CgroupPath::new("/cg");
        let c = candidates(&ctl, &proc_root, &top, -1);
        assert_eq!(c.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![202]);
        // The subtree's task list keeps them, marked shielded, for kill_all to report.
        let all = subtree_tasks(&ctl, &proc_root, &top, -1);
        let shielded: Vec<i32> = all.iter().filter(|t| t.shielded()).map(|t| t.pid).collect();
        assert_eq!(shielded, vec![200, 201]);
    }

    #[test]
    fn candidates_skip_init_self_and_shielded() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("cg");
        std::fs::create_dir(&cg).unwrap();
        let me = crate::sys::getpid();
        std::fs::write(cg.join("cgroup.procs"), format!("1\n{me}\n")).unwrap();
        let ctl = crate::cgroup::v1::V1::new(crate::cgroup::Hierarchy::fake(
            t.path(),
            crate::cgroup::Kind::V1,
        ));
        let c = candidates(&ctl, Path::new("/proc"), &CgroupPath::new("/cg"), me);
        assert!(c.is_empty(), "{c:?}");
        // From another pid's point of view this process is a candidate.
        let c = candidates(&ctl, Path::new("/proc"), &CgroupPath::new("/cg"), -1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].cgroup, CgroupPath::new("/cg"));
    }
}
