//! Stalls the kernel never reports: a cgroup pinned at its limit. Its charges fail
//! (`memory.failcnt` rises) but nothing sends it into the OOM wait (`under_oom` stays
//! 0): kernel-memory and syscall-path charges get ENOMEM instead, and a runtime that
//! retries them makes no progress. Neither the OOM eventfd nor the under_oom sweep sees
//! it.
//!
//! Failed charges at the wall are not enough: a cgroup whose headroom is small (an idle
//! process holds almost all of it) sits at its limit with failcnt rising by thousands a
//! second while a writer streams files through the rest, reclaim turning its page cache
//! over (issue 16: such a cgroup was taken for pinned and its idle holder killed). Every
//! page charged or uncharged is counted by `memory.stat` (`total_pgpgin`,
//! `total_pgpgout`, in charge events); a pinned cgroup moves neither, a cgroup making
//! progress at its wall moves both (measured: 0 against about 9,700 a second each).
//!
//! The rule, judged by the sweep on each watched v1 cgroup that is not under OOM (and
//! whose policy has not set `pinned = false`):
//! - *suspect*: `memory.failcnt` rose since the previous sweep, usage is at the limit
//!   (within [`wall_margin`]: the larger of 1 MiB and 1% of it) and little is left to
//!   reclaim: the file pages (`total_inactive_file` + `total_active_file`) are below
//!   [`little_cache`] (1/32 of the limit). The page counters are noted then.
//! - *pinned*: at a later sweep (at most [`SUSPECT_FOR`] later) failcnt has risen again
//!   since, the cgroup is still at the wall with little cache, and the page counters
//!   moved by at most [`STILL_EVENTS`] since they were noted: charges kept failing over
//!   at least one whole sweep interval and not a page came or went.
//!
//! A suspect whose counters moved starts over (noted again if failcnt rose, else
//! dropped); one that left the wall, or was not confirmed within [`SUSPECT_FOR`], is
//! dropped. Only `memory.failcnt` is read at every sweep; usage, limit and `memory.stat`
//! when it rose or while the cgroup is a suspect. Swap is not counted as reclaimable:
//! with swap, anonymous memory can make room, and swapping moves the page counters.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one look saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    pub failcnt: u64,
}

/// The page counters of `memory.stat` that move when the cgroup makes progress: a page
/// charged (`pgpgin`: faulted in, read into the page cache, written) or uncharged
/// (`pgpgout`: reclaimed, freed, truncated). Counted in charge events, not pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub pgpgin: u64,
    pub pgpgout: u64,
}

impl Progress {
    /// Charge events since `earlier` (a counter that went back counts as moved a lot:
    /// it is not the same cgroup's history).
    pub fn since(&self, earlier: &Progress) -> u64 {
        let d = |now: u64, then: u64| now.checked_sub(then).unwrap_or(u64::MAX / 4);
        d(self.pgpgin, earlier.pgpgin).saturating_add(d(self.pgpgout, earlier.pgpgout))
    }
}

/// What the sweep reads of a cgroup whose failcnt rose (or that is a suspect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wall {
    pub usage: u64,
    pub limit: u64,
    /// Reclaimable file pages (`total_inactive_file` + `total_active_file`).
    pub file_bytes: u64,
    pub progress: Progress,
}

impl Wall {
    /// At the limit with little to reclaim: the state a pinned cgroup is in (but also a
    /// cgroup streaming files through a small headroom; the page counters tell them
    /// apart).
    fn cornered(&self) -> bool {
        !crate::cgroup::parse::is_unlimited(self.limit)
            && at_wall(self.usage, self.limit)
            && self.file_bytes < little_cache(self.limit)
    }
}

/// A cgroup seen cornered once: the evidence a later sweep compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspect {
    pub since: Instant,
    pub failcnt: u64,
    pub progress: Progress,
}

/// A pinned stall as detected: what the `oom` audit line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pinned {
    /// How much `memory.failcnt` rose over the window.
    pub failcnt_delta: u64,
    pub usage: u64,
    pub limit: u64,
    /// Reclaimable file pages (`total_inactive_file` + `total_active_file`).
    pub file_bytes: u64,
    /// Page charge events (`total_pgpgin` + `total_pgpgout`) over the window: at most
    /// [`STILL_EVENTS`].
    pub progress_events: u64,
    /// How long the evidence was gathered: from the sweep that first saw the cgroup
    /// cornered to the one that judged it pinned.
    pub window_ms: u64,
}

/// What a sweep concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to follow.
    Clear,
    /// Cornered: look again at the next sweep.
    Suspect(Suspect),
    Pinned(Pinned),
}

/// Page charge events a pinned cgroup may still show over its window: a pinned cgroup
/// showed none, one streaming a file through 2 MiB of headroom about 9,700 a second.
pub const STILL_EVENTS: u64 = 8;

/// How long a suspect waits for the failed charge that confirms it. A cgroup at its
/// wall where charges fail once in a while (an idle holder, a runtime that handles
/// ENOMEM) is not followed for ever.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

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

fn stat_get(stat: &BTreeMap<String, u64>, k: &str) -> Option<u64> {
    stat.get(&format!("total_{k}"))
        .or_else(|| stat.get(k))
        .copied()
}

/// Reclaimable file pages from `memory.stat` (hierarchical totals when present).
pub fn file_bytes(stat: &BTreeMap<String, u64>) -> Option<u64> {
    Some(stat_get(stat, "inactive_file")?.saturating_add(stat_get(stat, "active_file")?))
}

/// The page counters from `memory.stat` (hierarchical totals when present).
pub fn progress(stat: &BTreeMap<String, u64>) -> Option<Progress> {
    Some(Progress {
        pgpgin: stat_get(stat, "pgpgin")?,
        pgpgout: stat_get(stat, "pgpgout")?,
    })
}

/// One sweep's verdict at `now`. `prev`/`cur` are failcnt at the previous and this
/// sweep, `suspect` what an earlier sweep noted. `wall` reads usage, limit and
/// `memory.stat`; it is called only when failcnt rose or a suspect is followed, and
/// returns `None` when the cgroup cannot be read (then: clear).
pub fn judge(
    now: Instant,
    prev: Look,
    cur: Look,
    suspect: Option<Suspect>,
    wall: impl FnOnce() -> Option<Wall>,
) -> Verdict {
    let rose = cur.failcnt > prev.failcnt;
    let suspect = suspect.filter(|s| now.saturating_duration_since(s.since) <= SUSPECT_FOR);
    if !rose && suspect.is_none() {
        return Verdict::Clear;
    }
    let Some(w) = wall() else {
        return Verdict::Clear;
    };
    if !w.cornered() {
        return Verdict::Clear;
    }
    let note = || {
        if rose {
            Verdict::Suspect(Suspect {
                since: now,
                failcnt: cur.failcnt,
                progress: w.progress,
            })
        } else {
            Verdict::Clear
        }
    };
    let Some(s) = suspect else {
        return note();
    };
    let moved = w.progress.since(&s.progress);
    if moved > STILL_EVENTS {
        // Pages came and went: progress. Start over.
        return note();
    }
    match cur.failcnt.checked_sub(s.failcnt) {
        Some(d) if d > 0 => Verdict::Pinned(Pinned {
            failcnt_delta: d,
            usage: w.usage,
            limit: w.limit,
            file_bytes: w.file_bytes,
            progress_events: moved,
            window_ms: now.saturating_duration_since(s.since).as_millis() as u64,
        }),
        // No charge tried since: still a suspect, nothing proven.
        Some(_) => Verdict::Suspect(s),
        // failcnt went back (reset by a write): start over.
        None => note(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SEC: Duration = Duration::from_secs(1);

    fn look(failcnt: u64) -> Look {
        Look { failcnt }
    }

    fn wall(usage: u64, limit: u64, file_bytes: u64, pgpg: (u64, u64)) -> Option<Wall> {
        Some(Wall {
            usage,
            limit,
            file_bytes,
            progress: Progress {
                pgpgin: pgpg.0,
                pgpgout: pgpg.1,
            },
        })
    }

    fn suspect(v: Verdict) -> Suspect {
        match v {
            Verdict::Suspect(s) => s,
            other => panic!("not a suspect: {other:?}"),
        }
    }

    /// The C workload of integration/pinned.rs as measured: failcnt +1,350 a second,
    /// usage 32 KiB below a 16 MiB limit, no file cache, page counters still.
    #[test]
    fn failed_charges_at_the_wall_with_still_page_counters_are_pinned() {
        let t0 = Instant::now();
        let w = || wall(16 * MIB - 32 * 1024, 16 * MIB, 0, (500, 400));
        // First sweep: a suspect, not yet pinned.
        let s = suspect(judge(t0, look(10), look(1360), None, w));
        assert_eq!(s.failcnt, 1360);
        // One sweep later: failcnt rose again, not a page charged or uncharged.
        let v = judge(t0 + SEC, look(1360), look(2710), Some(s), w);
        assert_eq!(
            v,
            Verdict::Pinned(Pinned {
                failcnt_delta: 1350,
                usage: 16 * MIB - 32 * 1024,
                limit: 16 * MIB,
                file_bytes: 0,
                progress_events: 0,
                window_ms: 1000,
            })
        );
        // A few stray events are tolerated.
        let v = judge(t0 + SEC, look(1360), look(1361), Some(s), || {
            wall(16 * MIB, 16 * MIB, 0, (504, 404))
        });
        assert!(matches!(v, Verdict::Pinned(p) if p.progress_events == STILL_EVENTS));
    }

    /// Issue 16's healthy workload as measured: 62 of 64 MiB held idle, a writer
    /// streaming files through the rest: failcnt +35,000 a second, usage at the wall,
    /// 256 KiB of file cache, pgpgin and pgpgout +9,700 a second each. Never pinned,
    /// however many sweeps it lasts.
    #[test]
    fn a_writer_turning_the_page_cache_over_at_the_wall_is_not_pinned() {
        let t0 = Instant::now();
        let mut s = suspect(judge(t0, look(0), look(35_000), None, || {
            wall(64 * MIB - 136 * 1024, 64 * MIB, 256 * 1024, (0, 0))
        }));
        for i in 1..10u64 {
            let v = judge(
                t0 + SEC * i as u32,
                look(35_000 * i),
                look(35_000 * (i + 1)),
                Some(s),
                || {
                    wall(
                        64 * MIB - 96 * 1024,
                        64 * MIB,
                        256 * 1024,
                        (9_700 * i, 9_700 * i),
                    )
                },
            );
            // Noted again (failcnt rose), never pinned.
            s = suspect(v);
            assert_eq!(s.progress.pgpgin, 9_700 * i);
        }
        // Just above the tolerance is progress too.
        let base = suspect(judge(t0, look(0), look(1), None, || {
            wall(64 * MIB, 64 * MIB, 0, (100, 100))
        }));
        let v = judge(t0 + SEC, look(1), look(2), Some(base), || {
            wall(64 * MIB, 64 * MIB, 0, (100 + STILL_EVENTS, 101))
        });
        assert!(matches!(v, Verdict::Suspect(_)), "{v:?}");
    }

    #[test]
    fn one_look_is_never_enough() {
        // However bad it looks, the first sweep only notes it.
        let v = judge(Instant::now(), look(0), look(1_000_000), None, || {
            wall(MIB * 16, MIB * 16, 0, (0, 0))
        });
        assert!(matches!(v, Verdict::Suspect(_)), "{v:?}");
    }

    #[test]
    fn a_suspect_waits_for_the_next_failed_charge_but_not_for_ever() {
        let t0 = Instant::now();
        let w = || wall(16 * MIB, 16 * MIB, 0, (7, 7));
        let s = suspect(judge(t0, look(1), look(2), None, w));
        // failcnt still (the workload retries every 1.5 s): still a suspect.
        assert_eq!(
            judge(t0 + SEC, look(2), look(2), Some(s), w),
            Verdict::Suspect(s)
        );
        // The next failure, with no progress in between: pinned over two intervals.
        assert!(matches!(
            judge(t0 + 2 * SEC, look(2), look(3), Some(s), w),
            Verdict::Pinned(Pinned {
                window_ms: 2000,
                failcnt_delta: 1,
                ..
            })
        ));
        // Too late: the old note is dropped, and the new failure noted afresh.
        let late = t0 + SUSPECT_FOR + SEC;
        let v = suspect(judge(late, look(2), look(3), Some(s), w));
        assert_eq!(v.since, late);
        assert_eq!(
            judge(late, look(2), look(2), Some(s), || panic!(
                "read for nothing"
            )),
            Verdict::Clear
        );
    }

    #[test]
    fn failcnt_still_and_no_suspect_reads_nothing_more() {
        let v = judge(Instant::now(), look(10), look(10), None, || {
            panic!("read without a failcnt rise")
        });
        assert_eq!(v, Verdict::Clear);
        // A counter that went down (reset by a write) is no rise either.
        assert_eq!(
            judge(Instant::now(), look(10), look(3), None, || None),
            Verdict::Clear
        );
    }

    #[test]
    fn below_the_wall_or_full_of_cache_is_clear() {
        let t0 = Instant::now();
        let s = suspect(judge(t0, look(1), look(2), None, || {
            wall(64 * MIB, 64 * MIB, 0, (0, 0))
        }));
        // Usage fell (a task exited, a loan): the suspect is dropped.
        let below = || wall(50 * MIB, 64 * MIB, 0, (0, 0));
        assert_eq!(
            judge(t0 + SEC, look(2), look(3), Some(s), below),
            Verdict::Clear
        );
        // Full of reclaimable cache: reclaim serves every charge.
        let cache = || wall(64 * MIB, 64 * MIB, 40 * MIB, (0, 0));
        assert_eq!(
            judge(t0 + SEC, look(2), look(3), Some(s), cache),
            Verdict::Clear
        );
        assert_eq!(judge(t0, look(1), look(9), None, cache), Verdict::Clear);
        // Just under 1/32 of the limit in cache is little.
        let little = || wall(64 * MIB, 64 * MIB, 2 * MIB - 1, (0, 0));
        assert!(matches!(
            judge(t0 + SEC, look(2), look(3), Some(s), little),
            Verdict::Pinned(_)
        ));
        // An unlimited cgroup has no wall.
        let unl = || wall(u64::MAX >> 1, u64::MAX >> 1, 0, (0, 0));
        assert_eq!(judge(t0, look(1), look(9), None, unl), Verdict::Clear);
    }

    #[test]
    fn unreadable_is_clear() {
        let t0 = Instant::now();
        assert_eq!(judge(t0, look(1), look(2), None, || None), Verdict::Clear);
        let s = suspect(judge(t0, look(1), look(2), None, || {
            wall(MIB, MIB, 0, (0, 0))
        }));
        assert_eq!(
            judge(t0 + SEC, look(2), look(3), Some(s), || None),
            Verdict::Clear
        );
    }

    #[test]
    fn counters_that_went_back_are_progress() {
        let t0 = Instant::now();
        let s = suspect(judge(t0, look(1), look(2), None, || {
            wall(MIB, MIB, 0, (1000, 1000))
        }));
        let v = judge(t0 + SEC, look(2), look(3), Some(s), || {
            wall(MIB, MIB, 0, (10, 10))
        });
        assert!(
            matches!(v, Verdict::Suspect(n) if n.progress.pgpgin == 10),
            "{v:?}"
        );
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
    fn stat_reads_prefer_hierarchical_totals() {
        let mut s = BTreeMap::new();
        s.insert("inactive_file".to_string(), 1);
        s.insert("active_file".to_string(), 2);
        s.insert("pgpgin".to_string(), 3);
        s.insert("pgpgout".to_string(), 4);
        assert_eq!(file_bytes(&s), Some(3));
        assert_eq!(
            progress(&s),
            Some(Progress {
                pgpgin: 3,
                pgpgout: 4
            })
        );
        s.insert("total_inactive_file".to_string(), 10);
        s.insert("total_active_file".to_string(), 20);
        s.insert("total_pgpgin".to_string(), 30);
        s.insert("total_pgpgout".to_string(), 40);
        assert_eq!(file_bytes(&s), Some(30));
        assert_eq!(
            progress(&s),
            Some(Progress {
                pgpgin: 30,
                pgpgout: 40
            })
        );
        assert_eq!(file_bytes(&Default::default()), None);
        assert_eq!(progress(&Default::default()), None);
    }
}
