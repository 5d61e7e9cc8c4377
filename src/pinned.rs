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
//! Progress that moves no page (kernel objects made and freed, the dentries and slab
//! that reclaim frees for them: a process looking up names at the wall moved no page
//! counter either) still needs the CPU: the cgroup's processes used 60-80 % of a CPU
//! there, against 0-1 % for the pinned workload, which sleeps between its failed
//! retries. cgroup v1 has no per-cgroup PSI or reclaim counter to ask instead.
//!
//! The rule, judged by the sweep on each watched v1 cgroup that is not under OOM (and
//! whose policy has not set `pinned = false`):
//! - *suspect*: `memory.failcnt` rose since the previous sweep, usage is at the limit
//!   (within [`wall_margin`]: the larger of 1 MiB and 1% of it) and little is left to
//!   reclaim: the file pages (`total_inactive_file` + `total_active_file`) are below
//!   [`little_cache`] (1/32 of the limit). The page counters are noted then.
//! - *pinned*: at a later sweep (at least [`MIN_WINDOW`] and at most [`SUSPECT_FOR`]
//!   later) failcnt has risen again
//!   since, the cgroup is still at the wall with little cache, the page counters
//!   moved by at most [`STILL_EVENTS`] since they were noted, and the same processes
//!   used at most [`IDLE_PERCENT`] of a CPU meanwhile (utime + stime of
//!   `/proc/PID/stat`, for up to [`MAX_TASKS`] processes of `cgroup.procs`): charges
//!   kept failing over at least one whole sweep interval, not a page came or went, and
//!   nothing ran.
//!
//! A suspect whose counters moved (or whose processes ran, came or went) starts over (noted again if failcnt rose, else
//! dropped); one that left the wall, or was not confirmed within [`SUSPECT_FOR`], is
//! dropped. Only `memory.failcnt` is read at every sweep; usage, limit, `memory.stat`
//! and the processes' `/proc/PID/stat` when it rose or while the cgroup is a suspect. Swap is not counted as reclaimable:
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

/// The cgroup's processes: which ones, and the CPU time they have used. Progress that
/// moves no page (kernel objects made and freed, dentries and slab reclaimed) still
/// needs the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tasks {
    /// A fingerprint of the set of PIDs: a process started or gone is a change.
    pub pids: u64,
    /// utime + stime of all of them, in milliseconds.
    pub cpu_ms: u64,
}

/// What the sweep reads of a cgroup whose failcnt rose (or that is a suspect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wall {
    pub usage: u64,
    pub limit: u64,
    /// Reclaimable file pages (`total_inactive_file` + `total_active_file`).
    pub file_bytes: u64,
    pub progress: Progress,
    /// None when they could not all be read (or there are more than [`MAX_TASKS`]):
    /// then nothing proves the cgroup idle, and it is not judged pinned.
    pub tasks: Option<Tasks>,
}

impl Wall {
    /// At the limit with little to reclaim: the state a pinned cgroup is in (but also a
    /// cgroup streaming files through a small headroom; the page counters tell them
    /// apart).
    pub(crate) fn cornered(&self) -> bool {
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
    pub tasks: Option<Tasks>,
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
    /// CPU time the cgroup's processes used over the window: at most [`IDLE_PERCENT`]
    /// of it.
    pub cpu_ms: u64,
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

/// The most CPU (percent of the window, over all the cgroup's processes) a pinned
/// cgroup may use: the pinned workload used 0-1 %, a process making and freeing kernel
/// objects at the wall (no page moves) 60-80 %.
pub const IDLE_PERCENT: u64 = 10;

/// The CPU evidence is read for at most this many processes; a larger cgroup is never
/// judged pinned.
pub const MAX_TASKS: usize = 256;

/// The shortest window that can judge a cgroup pinned, whatever the sweep interval:
/// `/proc/PID/stat` counts CPU time in clock ticks (10 ms at USER_HZ 100), so a
/// process running flat out shows no CPU at all over a window of a few milliseconds
/// (measured: 0 ms over 9 ms with `sweep_interval = "10ms"`, and its idle neighbour was
/// killed). Over 500 ms, [`IDLE_PERCENT`] is 5 ticks.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);

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

/// utime + stime in clock ticks from `/proc/PID/stat` (fields 14 and 15; the comm may
/// hold spaces and parentheses, so count from the last `)`).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // rest[0] is field 3 (state).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// The processes `pids` as read under `proc_root` now; None if one could not be read
/// (gone meanwhile, or /proc unreadable) or there are more than [`MAX_TASKS`].
pub fn tasks(proc_root: &std::path::Path, pids: &[i32]) -> Option<Tasks> {
    if pids.len() > MAX_TASKS {
        return None;
    }
    let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    };
    let mut sorted = pids.to_vec();
    sorted.sort_unstable();
    let mut ticks = 0u64;
    let mut fp = sorted.len() as u64;
    for pid in sorted {
        let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
        ticks = ticks.saturating_add(parse_cpu_ticks(&text)?);
        fp = fp.wrapping_mul(0x100_0000_01b3) ^ pid as u64;
    }
    Some(Tasks {
        pids: fp,
        cpu_ms: ticks.saturating_mul(1000) / hz,
    })
}

/// CPU used between two reads of the same processes, if it was little enough to call
/// them idle over `window`; None if the set changed, a read is missing, or they were busy.
fn idle_cpu(then: Option<Tasks>, now: Option<Tasks>, window: Duration) -> Option<u64> {
    let (a, b) = (then?, now?);
    if a.pids != b.pids {
        return None;
    }
    let used = b.cpu_ms.checked_sub(a.cpu_ms)?;
    (used.saturating_mul(100) <= IDLE_PERCENT.saturating_mul(window.as_millis() as u64))
        .then_some(used)
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
    judge_every(now, prev, cur, suspect, Duration::ZERO, wall)
}

/// How long a suspect is followed when the sweep comes every `sweep`: [`SUSPECT_FOR`],
/// or three sweeps when that is longer (a sweep interval above 10 s would otherwise
/// drop every suspect before the next look, and no pinned stall would ever be found).
pub fn suspect_for(sweep: Duration) -> Duration {
    SUSPECT_FOR.max(sweep.saturating_mul(3))
}

/// [`judge`] for a sweep that comes every `sweep` (see [`suspect_for`]).
pub fn judge_every(
    now: Instant,
    prev: Look,
    cur: Look,
    suspect: Option<Suspect>,
    sweep: Duration,
    wall: impl FnOnce() -> Option<Wall>,
) -> Verdict {
    let rose = cur.failcnt > prev.failcnt;
    let follow = suspect_for(sweep);
    let suspect = suspect.filter(|s| now.saturating_duration_since(s.since) <= follow);
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
                tasks: w.tasks,
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
    let window = now.saturating_duration_since(s.since);
    let Some(cpu_ms) = idle_cpu(s.tasks, w.tasks, window) else {
        // Busy (or other processes, or unknown): nothing proves it stuck.
        return note();
    };
    if window < MIN_WINDOW {
        // Too short to tell idle from busy (a short `sweep_interval`): CPU time moves
        // in clock ticks. Keep gathering from the first look.
        return Verdict::Suspect(s);
    }
    match cur.failcnt.checked_sub(s.failcnt) {
        Some(d) if d > 0 => Verdict::Pinned(Pinned {
            failcnt_delta: d,
            usage: w.usage,
            limit: w.limit,
            file_bytes: w.file_bytes,
            progress_events: moved,
            cpu_ms,
            window_ms: window.as_millis() as u64,
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

    /// The pinned workload's one process, asleep.
    const IDLE: Option<Tasks> = Some(Tasks { pids: 7, cpu_ms: 0 });

    fn wall(usage: u64, limit: u64, file_bytes: u64, pgpg: (u64, u64)) -> Option<Wall> {
        busy(usage, limit, file_bytes, pgpg, IDLE)
    }

    fn busy(
        usage: u64,
        limit: u64,
        file_bytes: u64,
        pgpg: (u64, u64),
        tasks: Option<Tasks>,
    ) -> Option<Wall> {
        Some(Wall {
            usage,
            limit,
            file_bytes,
            progress: Progress {
                pgpgin: pgpg.0,
                pgpgout: pgpg.1,
            },
            tasks,
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
                cpu_ms: 0,
                window_ms: 1000,
            })
        );
        // 1 % of a CPU (as measured) is idle; 10 % is the most.
        for cpu_ms in [10, 100] {
            let v = judge(t0 + SEC, look(1360), look(2710), Some(s), || {
                busy(
                    16 * MIB,
                    16 * MIB,
                    0,
                    (500, 400),
                    Some(Tasks { pids: 7, cpu_ms }),
                )
            });
            assert!(
                matches!(v, Verdict::Pinned(p) if p.cpu_ms == cpu_ms),
                "{v:?}"
            );
        }
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

    /// A process looking up names at the wall as measured: failcnt +50,000-90,000 a
    /// second, usage at the limit, no file cache, the page counters still (the dentries
    /// it makes and reclaim frees are no pages of the LRU), 60-80 % of a CPU.
    #[test]
    fn a_busy_cgroup_that_moves_no_page_is_not_pinned() {
        let t0 = Instant::now();
        let tasks = |cpu_ms| Some(Tasks { pids: 9, cpu_ms });
        let mut s = suspect(judge(t0, look(0), look(50_000), None, || {
            busy(64 * MIB, 64 * MIB, 0, (0, 0), tasks(0))
        }));
        for i in 1..10u32 {
            let v = judge(
                t0 + SEC * i,
                look(50_000 * u64::from(i)),
                look(50_000 * u64::from(i + 1)),
                Some(s),
                || busy(64 * MIB, 64 * MIB, 0, (0, 0), tasks(600 * u64::from(i))),
            );
            s = suspect(v);
        }
        // Just above 10 % of the window.
        let s = suspect(judge(t0, look(0), look(1), None, || {
            busy(MIB, MIB, 0, (0, 0), tasks(0))
        }));
        let v = judge(t0 + SEC, look(1), look(2), Some(s), || {
            busy(MIB, MIB, 0, (0, 0), tasks(101))
        });
        assert!(matches!(v, Verdict::Suspect(_)), "{v:?}");
        // Other processes than at the first look: something happened.
        let v = judge(t0 + SEC, look(1), look(2), Some(s), || {
            busy(
                MIB,
                MIB,
                0,
                (0, 0),
                Some(Tasks {
                    pids: 10,
                    cpu_ms: 0,
                }),
            )
        });
        assert!(matches!(v, Verdict::Suspect(_)), "{v:?}");
        // Processes that could not be read prove nothing.
        let v = judge(t0 + SEC, look(1), look(2), Some(s), || {
            busy(MIB, MIB, 0, (0, 0), None)
        });
        assert!(matches!(v, Verdict::Suspect(_)), "{v:?}");
    }

    #[test]
    fn cpu_ticks_count_from_the_last_parenthesis() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("42 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn tasks_reads_each_process_and_fingerprints_the_set() {
        let root = tempfile::tempdir().unwrap();
        let put = |pid: i32, utime: u64| {
            let d = root.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let line = format!("{pid} (w) S 1 1 1 0 -1 0 0 0 0 0 {utime} 0 0 0 20 0 1 0 5 0 0");
            std::fs::write(d.join("stat"), line).unwrap();
        };
        put(10, 100);
        put(11, 50);
        let a = tasks(root.path(), &[11, 10]).unwrap();
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as u64;
        assert_eq!(a.cpu_ms, 150 * 1000 / hz);
        assert_eq!(tasks(root.path(), &[10, 11]).unwrap().pids, a.pids);
        assert_ne!(tasks(root.path(), &[10]).unwrap().pids, a.pids);
        // A process gone (or unreadable): unknown.
        assert_eq!(tasks(root.path(), &[10, 12]), None);
        let many: Vec<i32> = (0..=MAX_TASKS as i32).collect();
        assert_eq!(tasks(root.path(), &many), None);
    }

    /// A short sweep interval: a busy process can show no CPU tick over a few ms. The
    /// first look's evidence is kept until the window is long enough to judge.
    #[test]
    fn a_window_too_short_to_count_cpu_ticks_judges_nothing() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let w = || wall(16 * MIB, 16 * MIB, 0, (7, 7));
        let s = suspect(judge(t0, look(1), look(2), None, w));
        for i in [10u32, 100, 499] {
            assert_eq!(
                judge(t0 + ms * i, look(2), look(3), Some(s), w),
                Verdict::Suspect(s),
                "{i} ms"
            );
        }
        assert!(matches!(
            judge(t0 + MIN_WINDOW, look(3), look(4), Some(s), w),
            Verdict::Pinned(Pinned {
                window_ms: 500,
                failcnt_delta: 2,
                ..
            })
        ));
        // Busy within the short window still starts over.
        let v = judge(t0 + ms * 10, look(2), look(3), Some(s), || {
            busy(
                16 * MIB,
                16 * MIB,
                0,
                (7, 7),
                Some(Tasks {
                    pids: 7,
                    cpu_ms: 10,
                }),
            )
        });
        assert!(
            matches!(v, Verdict::Suspect(n) if n.since == t0 + ms * 10),
            "{v:?}"
        );
    }

    /// A sweep interval above 10 s: the suspect waits for the next sweep.
    #[test]
    fn a_long_sweep_interval_still_finds_a_pinned_cgroup() {
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        let w = || wall(16 * MIB, 16 * MIB, 0, (7, 7));
        let s = suspect(judge_every(t0, look(1), look(2), None, every, w));
        assert!(matches!(
            judge_every(t0 + every, look(2), look(3), Some(s), every, w),
            Verdict::Pinned(_)
        ));
        // The default still drops it after 10 s.
        assert!(matches!(
            judge(t0 + every, look(2), look(3), Some(s), w),
            Verdict::Suspect(n) if n.since == t0 + every
        ));
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
