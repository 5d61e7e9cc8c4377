//! Choosing whom to signal: the tasks of a cgroup's subtree as `/proc` describes them,
//! ordered by the policy's criterion with `prefer` first and `avoid` last. Never pid 1,
//! never the agent itself, never a task the operator shielded with oom_score_adj -1000,
//! never a kernel thread.

use std::path::Path;

use crate::cgroup::{CgroupPath, Controller};
use crate::policy::{VictimOrder, VictimSpec};

/// One process, as read from `/proc/PID`.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub pid: i32,
    pub comm: String,
    pub cmdline: String,
    pub rss_bytes: u64,
    pub oom_score: i64,
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

/// Start ticks of a live process, to re-check identity after opening a pidfd.
pub fn start_ticks(proc_root: &Path, pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&s).map(|(_, t)| t)
}

/// Reads one task; `None` if it vanished or is a kernel thread.
pub fn read_task(proc_root: &Path, pid: i32, cgroup: &CgroupPath) -> Option<Task> {
    let dir = proc_root.join(pid.to_string());
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let (comm, start_ticks) = parse_stat(&read("stat")?)?;
    let rss_bytes = parse_status_rss(&read("status")?)?;
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default();
    let num = |f: &str| read(f).and_then(|s| s.trim().parse().ok());
    Some(Task {
        pid,
        comm,
        cmdline,
        rss_bytes,
        oom_score: num("oom_score").unwrap_or(0),
        oom_score_adj: num("oom_score_adj").unwrap_or(0),
        start_ticks,
        cgroup: cgroup.clone(),
    })
}

/// Every task in `top` and its descendants that may be chosen as a victim.
pub fn candidates(
    ctl: &dyn Controller,
    proc_root: &Path,
    top: &CgroupPath,
    self_pid: i32,
) -> Vec<Task> {
    let mut out = Vec::new();
    for cg in ctl.hierarchy().walk(top) {
        let Ok(Some(pids)) = ctl.procs(&cg) else {
            continue;
        };
        out.extend(
            pids.into_iter()
                .filter(|&p| p > 1 && p != self_pid)
                .filter_map(|p| read_task(proc_root, p, &cg))
                .filter(|t| t.oom_score_adj != -1000),
        );
    }
    out
}

fn matches_any(res: &[regex::Regex], t: &Task) -> bool {
    res.iter()
        .any(|r| r.is_match(&t.comm) || r.is_match(&t.cmdline))
}

/// Orders tasks best victim first: preferred before others, avoided only after every
/// other candidate, then by the policy's criterion (ties: newer PID first).
pub fn rank<'a>(tasks: &'a [Task], spec: &VictimSpec) -> Vec<&'a Task> {
    let mut v: Vec<&Task> = tasks.iter().collect();
    v.sort_by(|a, b| {
        let key = |t: &Task| (matches_any(&spec.avoid, t), !matches_any(&spec.prefer, t));
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
            cmdline: format!("/usr/bin/{comm} --flag"),
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
