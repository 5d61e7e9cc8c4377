//! Stalls the kernel never reports: a cgroup pinned at its limit. Its charges fail
//! (`memory.failcnt` rises) but nothing sends it into the OOM wait (`under_oom` stays
//! 0): kernel-memory and syscall-path charges get ENOMEM instead, and a runtime that
//! retries them (or thrashes on its last few file pages) makes no progress. Neither the
//! OOM eventfd nor the under_oom sweep sees it.
//!
//! The rule, judged by the sweep on each watched v1 cgroup that is not under OOM, from
//! two looks one sweep interval apart:
//! - `memory.failcnt` rose between the two looks (charges failed meanwhile);
//! - usage is at the limit now: within [`wall_margin`] of it (the larger of 1 MiB and
//!   1% of the limit);
//! - little is left to reclaim: the file pages of `memory.stat` (`total_inactive_file`
//!   and `total_active_file`) are below [`little_cache`] (1/32 of the limit). A cgroup
//!   full of page cache also sits at its limit with failcnt rising, but there reclaim
//!   works and every charge ends up served: that is normal, not a stall.
//!
//! Only `memory.failcnt` is read at every sweep; usage, limit and `memory.stat` only
//! when it rose. Swap is not counted as reclaimable: with swap, anonymous memory can
//! make room and such a cgroup rarely pins (the rule may then act on a cgroup that was
//! swapping its way forward slowly, which is a stall of its own).

use serde::Serialize;

/// What one look saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    pub failcnt: u64,
}

/// A pinned stall as detected: what the `oom` audit line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pinned {
    /// How much `memory.failcnt` rose between the two looks.
    pub failcnt_delta: u64,
    pub usage: u64,
    pub limit: u64,
    /// Reclaimable file pages (`total_inactive_file` + `total_active_file`).
    pub file_bytes: u64,
}

/// How close to the limit usage must be to count as "at the wall": the kernel charges
/// in pages and batches, so a pinned cgroup sits a little below its limit.
pub fn wall_margin(limit: u64) -> u64 {
    (1u64 << 20).max(limit / 100)
}

/// Usage at (or within [`wall_margin`] of) the limit.
pub fn at_wall(usage: u64, limit: u64) -> bool {
    usage.saturating_add(wall_margin(limit)) >= limit
}

/// "Little page cache": less than this much to reclaim.
pub fn little_cache(limit: u64) -> u64 {
    limit / 32
}

/// Reclaimable file pages from `memory.stat` (hierarchical totals when present).
pub fn file_bytes(stat: &std::collections::BTreeMap<String, u64>) -> Option<u64> {
    let get = |k: &str| {
        stat.get(&format!("total_{k}"))
            .or_else(|| stat.get(k))
            .copied()
    };
    Some(get("inactive_file")?.saturating_add(get("active_file")?))
}

/// The second look's verdict. `usage_limit` and `file` are read only when needed
/// (failcnt rose): they return `None` when the cgroup cannot be read (then: not pinned).
pub fn judge(
    prev: Look,
    now: Look,
    usage_limit: impl FnOnce() -> Option<(u64, u64)>,
    file: impl FnOnce() -> Option<u64>,
) -> Option<Pinned> {
    let failcnt_delta = now.failcnt.checked_sub(prev.failcnt).filter(|&d| d > 0)?;
    let (usage, limit) = usage_limit()?;
    if crate::cgroup::parse::is_unlimited(limit) || !at_wall(usage, limit) {
        return None;
    }
    let file_bytes = file()?;
    (file_bytes < little_cache(limit)).then_some(Pinned {
        failcnt_delta,
        usage,
        limit,
        file_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn look(failcnt: u64) -> Look {
        Look { failcnt }
    }

    #[test]
    fn failcnt_rising_at_the_wall_with_no_cache_is_pinned() {
        let p = judge(
            look(10),
            look(14),
            || Some((192 * MIB - 4096, 192 * MIB)),
            || Some(0),
        );
        assert_eq!(
            p,
            Some(Pinned {
                failcnt_delta: 4,
                usage: 192 * MIB - 4096,
                limit: 192 * MIB,
                file_bytes: 0
            })
        );
    }

    #[test]
    fn failcnt_still_is_not_pinned_and_reads_nothing_more() {
        let p = judge(
            look(10),
            look(10),
            || panic!("usage read without a failcnt rise"),
            || panic!("stat read without a failcnt rise"),
        );
        assert_eq!(p, None);
        // A counter that went down (reset by a write) is no rise either.
        assert_eq!(judge(look(10), look(3), || None, || None), None);
    }

    #[test]
    fn below_the_wall_is_not_pinned() {
        // A failed charge a while ago, then usage fell (a task exited, a loan).
        let p = judge(
            look(1),
            look(9),
            || Some((150 * MIB, 192 * MIB)),
            || panic!("stat read below the wall"),
        );
        assert_eq!(p, None);
        // An unlimited cgroup has no wall.
        assert_eq!(
            judge(
                look(1),
                look(9),
                || Some((u64::MAX >> 1, u64::MAX >> 1)),
                || Some(0)
            ),
            None
        );
    }

    #[test]
    fn page_cache_at_the_limit_is_normal() {
        // Full of reclaimable cache: failcnt rises, reclaim serves every charge.
        let p = judge(
            look(100),
            look(900),
            || Some((64 * MIB, 64 * MIB)),
            || Some(40 * MIB),
        );
        assert_eq!(p, None);
        // Just under 1/32 of the limit left: pinned.
        let p = judge(
            look(100),
            look(101),
            || Some((64 * MIB, 64 * MIB)),
            || Some(2 * MIB - 1),
        );
        assert!(p.is_some());
    }

    #[test]
    fn unreadable_is_not_pinned() {
        assert_eq!(judge(look(1), look(2), || None, || Some(0)), None);
        assert_eq!(judge(look(1), look(2), || Some((MIB, MIB)), || None), None);
    }

    #[test]
    fn margin_scales_with_the_limit() {
        assert_eq!(wall_margin(16 * MIB), MIB);
        assert_eq!(wall_margin(1000 * MIB), 10 * MIB);
        assert!(at_wall(16 * MIB - 32 * 1024, 16 * MIB));
        assert!(!at_wall(14 * MIB, 16 * MIB));
        assert!(at_wall(16 * MIB, 16 * MIB));
    }

    #[test]
    fn file_bytes_prefers_hierarchical_totals() {
        let mut s = std::collections::BTreeMap::new();
        s.insert("inactive_file".to_string(), 1);
        s.insert("active_file".to_string(), 2);
        assert_eq!(file_bytes(&s), Some(3));
        s.insert("total_inactive_file".to_string(), 10);
        s.insert("total_active_file".to_string(), 20);
        assert_eq!(file_bytes(&s), Some(30));
        assert_eq!(file_bytes(&Default::default()), None);
    }
}
