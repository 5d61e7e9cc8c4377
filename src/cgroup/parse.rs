//! Parsers for the memory controller's control files. Pure functions on strings, so every
//! case (good, truncated, garbage, "max") is a unit test away.

use std::collections::BTreeMap;

/// v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages);
/// anything this large is treated as unlimited.
pub const UNLIMITED_THRESHOLD: u64 = 1 << 62;

/// `memory.oom_control` of cgroup v1 (v2 maps its own files onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OomControl {
    pub oom_kill_disable: bool,
    pub under_oom: bool,
    pub oom_kill: u64,
    /// v2: how much each `memory.events` counter rose since the probe's previous read
    /// (None on v1, and from a read that keeps no previous one).
    pub rises: Option<EventRises>,
}

/// Rises of the v2 `memory.events` counters between two reads: `high` (throttled at
/// memory.high), `max` (reclaim at memory.max), `oom` (the kernel's OOM path was
/// entered), `oom_kill` (a task was killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EventRises {
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
}

/// Parses `memory.oom_control`. `oom_kill` is absent on old kernels and defaults to 0.
pub fn oom_control(s: &str) -> Option<OomControl> {
    let mut out = OomControl::default();
    let (mut seen_disable, mut seen_under) = (false, false);
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let val: u64 = val.parse().ok()?;
        match key {
            "oom_kill_disable" => {
                out.oom_kill_disable = val != 0;
                seen_disable = true;
            }
            "under_oom" => {
                out.under_oom = val != 0;
                seen_under = true;
            }
            "oom_kill" => out.oom_kill = val,
            _ => {}
        }
    }
    (seen_disable && seen_under).then_some(out)
}

/// Parses a byte count file (`memory.limit_in_bytes`, `memory.usage_in_bytes`, v2's
/// `memory.max` where "max" means unlimited and is returned as `u64::MAX`).
pub fn bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    if t == "max" {
        return Some(u64::MAX);
    }
    t.parse().ok()
}

/// True if a limit value means "no limit".
pub fn is_unlimited(v: u64) -> bool {
    v >= UNLIMITED_THRESHOLD
}

/// Parses a flat keyed file such as `memory.stat` or v2's `memory.events`.
pub fn flat_keyed(s: &str) -> Option<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for line in s.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let key = it.next()?;
        let val = it.next()?.parse().ok()?;
        out.insert(key.to_string(), val);
    }
    Some(out)
}

/// Parses `cgroup.procs` / `tasks`: one PID per line.
pub fn pids(s: &str) -> Option<Vec<i32>> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().ok())
        .collect()
}

/// The memory cgroup path of a process from `/proc/PID/cgroup`: the v1 line whose
/// controller list includes `memory`, or else the v2 `0::` line. Text only: a path that
/// is not UTF-8 comes back with U+FFFD in it; use [`proc_memory_cgroup_bytes`] where the
/// path is acted on.
pub fn proc_memory_cgroup(s: &str) -> Option<String> {
    proc_memory_cgroup_bytes(s.as_bytes()).map(|p| String::from_utf8_lossy(p).into_owned())
}

/// [`proc_memory_cgroup`] on the raw bytes of `/proc/PID/cgroup`: cgroup names are bytes,
/// not text.
pub fn proc_memory_cgroup_bytes(s: &[u8]) -> Option<&[u8]> {
    let mut unified = None;
    for line in s.split(|&c| c == b'\n') {
        let mut parts = line.splitn(3, |&c| c == b':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if ctrls.split(|&c| c == b',').any(|c| c == b"memory") {
            return Some(path);
        }
        if ctrls.is_empty() {
            unified = Some(path);
        }
    }
    unified
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_control_parses_all_fields() {
        let s = "oom_kill_disable 1\nunder_oom 1\noom_kill 3\n";
        assert_eq!(
            oom_control(s),
            Some(OomControl {
                oom_kill_disable: true,
                under_oom: true,
                oom_kill: 3,
                rises: None
            })
        );
    }

    #[test]
    fn oom_control_without_oom_kill_line() {
        let c = oom_control("oom_kill_disable 0\nunder_oom 0\n").unwrap();
        assert!(!c.oom_kill_disable && !c.under_oom && c.oom_kill == 0);
    }

    #[test]
    fn oom_control_rejects_truncated_and_garbage() {
        assert_eq!(oom_control(""), None);
        assert_eq!(oom_control("oom_kill_disable 1\n"), None);
        assert_eq!(oom_control("oom_kill_disable x\nunder_oom 0\n"), None);
    }

    #[test]
    fn bytes_and_unlimited() {
        assert_eq!(bytes("33554432\n"), Some(33554432));
        assert_eq!(bytes("max\n"), Some(u64::MAX));
        assert_eq!(bytes("-1"), None);
        assert_eq!(bytes(""), None);
        assert!(is_unlimited(9223372036854771712));
        assert!(is_unlimited(u64::MAX));
        assert!(!is_unlimited(64 << 20));
    }

    #[test]
    fn flat_keyed_parses_memory_stat() {
        let m = flat_keyed("cache 4096\nrss 8192\ntotal_rss 8192\n").unwrap();
        assert_eq!(m["rss"], 8192);
        assert_eq!(m["cache"], 4096);
        assert_eq!(flat_keyed("rss x\n"), None);
        assert_eq!(flat_keyed("").unwrap().len(), 0);
    }

    #[test]
    fn pids_parse() {
        assert_eq!(pids("1\n22\n333\n"), Some(vec![1, 22, 333]));
        assert_eq!(pids(""), Some(vec![]));
        assert_eq!(pids("12\nabc\n"), None);
    }

    #[test]
    fn proc_cgroup_memory_line() {
        let v1 = "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(proc_memory_cgroup(v1).as_deref(), Some("/docker/abc"));
        let v2 = "0::/system.slice/x.service\n";
        assert_eq!(
            proc_memory_cgroup(v2).as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(proc_memory_cgroup(""), None);
        let raw = b"5:memory:/docker/bad\xff\n0::/\n";
        assert_eq!(proc_memory_cgroup_bytes(raw), Some(&b"/docker/bad\xff"[..]));
    }
}
