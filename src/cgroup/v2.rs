//! cgroup v2 memory controller (the unified hierarchy): `memory.max` (the kernel kills
//! there) and `memory.high` (the kernel throttles there, never kills: oomwake's window),
//! `memory.current`, `memory.reclaim`, `cgroup.kill`, and the stall notifications:
//! `memory.events` (kernfs notifies every change; EPOLLPRI, re-read from offset 0) and
//! PSI triggers on `memory.pressure`.
//!
//! v2 has no `oom_kill_disable` and no `under_oom`. The [`OomControl`] this controller
//! reports maps them: `oom_kill_disable` is "has a `memory.max`" (the SPEC's condition
//! for handling a cgroup on v2) and `under_oom` is "held at a limit": usage at or near
//! `memory.high` (or `memory.max`). The probe is stricter and reports stuck only while
//! the kernel's `high` (or `max`) counter is rising as well, so an idle workload that
//! merely sits near its limit does not start episodes.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{parse, read_file, write_bounded, write_file, CgroupError, CgroupPath, Controller};
use super::{parse::EventRises, Hierarchy, ReclaimEnd, Reclaimed};
use super::{Limits, OomControl, OomProbe, Result, StallFd, StallSource, StallWatch};

/// Usage within this fraction of a limit counts as "at" the limit: above `memory.high`
/// the kernel reclaims back to just below it, so a held workload hovers there.
const NEAR_DIVISOR: u64 = 32;

/// The most one `memory.reclaim` request asks for (see [`V2::reclaim`]): a few
/// milliseconds of reclaim on real hardware, about a tenth of a second under emulation.
pub const RECLAIM_CHUNK: u64 = 8 << 20;

pub struct V2 {
    h: Hierarchy,
}

/// A PSI trigger on `memory.pressure`: notify when tasks were stalled on memory for
/// `stall` within any `window` ("some": at least one task, "full": all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsiTrigger {
    pub full: bool,
    pub stall: Duration,
    pub window: Duration,
}

impl PsiTrigger {
    /// Parses the policy form `"some 100ms 1s"`. The kernel accepts windows of 500ms to
    /// 10s and a stall time of at most the window.
    pub fn parse(s: &str) -> std::result::Result<PsiTrigger, String> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [kind, stall, window] = parts.as_slice() else {
            return Err(format!(
                "PSI trigger {s:?}: expected \"some|full <stall> <window>\", e.g. \"some 100ms 1s\""
            ));
        };
        let full = match *kind {
            "some" => false,
            "full" => true,
            k => return Err(format!("PSI trigger {s:?}: {k:?} is neither some nor full")),
        };
        let stall = crate::policy::units::parse_duration(stall)?;
        let window = crate::policy::units::parse_duration(window)?;
        if window < Duration::from_millis(500) || window > Duration::from_secs(10) {
            return Err(format!(
                "PSI trigger {s:?}: the kernel takes windows from 500ms to 10s"
            ));
        }
        if stall.is_zero() || stall > window {
            return Err(format!(
                "PSI trigger {s:?}: the stall time must be above 0 and at most the window"
            ));
        }
        Ok(PsiTrigger {
            full,
            stall,
            window,
        })
    }

    /// What is written to `memory.pressure` (microseconds).
    pub fn kernel_line(&self) -> String {
        format!(
            "{} {} {}",
            if self.full { "full" } else { "some" },
            self.stall.as_micros(),
            self.window.as_micros()
        )
    }
}

/// What one read of a cgroup's memory files shows.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// `memory.max`; unlimited (also for the root, which has none).
    max: u64,
    high: u64,
    current: u64,
    events: BTreeMap<String, u64>,
}

impl Snapshot {
    fn counter(&self, key: &str) -> u64 {
        self.events.get(key).copied().unwrap_or(0)
    }

    fn at_high(&self) -> bool {
        near(self.current, self.high)
    }

    fn at_max(&self) -> bool {
        near(self.current, self.max)
    }

    fn state(&self, stuck: bool) -> OomControl {
        OomControl {
            oom_kill_disable: !parse::is_unlimited(self.max),
            under_oom: stuck,
            oom_kill: self.counter("oom_kill"),
            rises: None,
        }
    }
}

/// True if `usage` is at or within 1/32 of a set `limit`.
fn near(usage: u64, limit: u64) -> bool {
    !parse::is_unlimited(limit) && usage.saturating_add(limit / NEAR_DIVISOR) >= limit
}

fn read_parsed<T>(
    dir: &Path,
    file: &str,
    what: &'static str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    let path = dir.join(file);
    let Some(s) = read_file(&path)? else {
        return Ok(None);
    };
    parse(&s).map(Some).ok_or(CgroupError::Parse {
        path,
        what,
        content: s.chars().take(200).collect(),
    })
}

/// Reads the memory files of `dir`. `Ok(None)` if the cgroup is gone; a cgroup without
/// the memory controller (the root, or a child whose parent does not enable `+memory`)
/// reads as unlimited and idle.
fn snapshot(dir: &Path) -> Result<Option<Snapshot>> {
    let Some(max) = read_parsed(dir, "memory.max", "memory.max", parse::bytes)? else {
        return Ok(dir.is_dir().then(Snapshot::default_unlimited));
    };
    let high = read_parsed(dir, "memory.high", "memory.high", parse::bytes)?.unwrap_or(u64::MAX);
    let current = read_parsed(dir, "memory.current", "memory.current", parse::bytes)?.unwrap_or(0);
    let events =
        read_parsed(dir, "memory.events", "memory.events", parse::flat_keyed)?.unwrap_or_default();
    Ok(Some(Snapshot {
        max,
        high,
        current,
        events,
    }))
}

impl Snapshot {
    fn default_unlimited() -> Snapshot {
        Snapshot {
            max: u64::MAX,
            high: u64::MAX,
            ..Snapshot::default()
        }
    }
}

fn limit_value(v: u64) -> String {
    if parse::is_unlimited(v) {
        "max".to_string()
    } else {
        v.to_string()
    }
}

/// The `memory.events` counters the probe compares: high, max, oom, oom_kill.
const COUNTERS: [&str; 4] = ["high", "max", "oom", "oom_kill"];

/// The stateful probe: stuck while the `high` counter rose since the last read with
/// usage at high, or the `max` counter rose with usage at max. Reports the rises.
struct EventsProbe {
    dir: PathBuf,
    last: Cell<Option<[u64; 4]>>,
}

impl EventsProbe {
    fn read(&self) -> Result<Option<OomControl>> {
        let Some(s) = snapshot(&self.dir)? else {
            return Ok(None);
        };
        let now = COUNTERS.map(|k| s.counter(k));
        let prev = self.last.replace(Some(now));
        let rises = prev.map(|p| {
            let d = |i: usize| now[i].saturating_sub(p[i]);
            EventRises {
                high: d(0),
                max: d(1),
                oom: d(2),
                oom_kill: d(3),
            }
        });
        let stuck = rises.is_some_and(|r| (r.high > 0 && s.at_high()) || (r.max > 0 && s.at_max()));
        let mut st = s.state(stuck);
        st.rises = rises;
        Ok(Some(st))
    }
}

impl V2 {
    pub fn new(h: Hierarchy) -> V2 {
        V2 { h }
    }

    fn write(&self, cg: &CgroupPath, file: &str, value: &str) -> Result<()> {
        write_file(&self.h.dir(cg).join(file), value)
    }
}

impl Controller for V2 {
    fn hierarchy(&self) -> &Hierarchy {
        &self.h
    }

    /// Stateless: "stuck" is usage at `memory.high` or `memory.max`.
    fn oom_state(&self, cg: &CgroupPath) -> Result<Option<OomControl>> {
        Ok(snapshot(&self.h.dir(cg))?.map(|s| {
            let stuck = s.at_high() || s.at_max();
            s.state(stuck)
        }))
    }

    fn limits(&self, cg: &CgroupPath) -> Result<Option<Limits>> {
        let dir = self.h.dir(cg);
        let Some(memory) = read_parsed(&dir, "memory.max", "memory.max", parse::bytes)? else {
            return Ok(None);
        };
        let high = read_parsed(&dir, "memory.high", "memory.high", parse::bytes)?;
        Ok(Some(Limits {
            memory,
            memsw: None,
            high,
        }))
    }

    fn usage(&self, cg: &CgroupPath) -> Result<Option<u64>> {
        read_parsed(&self.h.dir(cg), "memory.current", "usage", parse::bytes)
    }

    /// Raising: `memory.max` then `memory.high`. Lowering: `memory.high` then
    /// `memory.max`, and never `memory.max` below usage: v2 would OOM-kill to make it
    /// fit, so such a write is refused here with EBUSY, as v1's kernel refuses it.
    fn set_limits(&self, cg: &CgroupPath, from: Limits, to: Limits) -> Result<()> {
        let high = to.high.filter(|&h| Some(h) != from.high);
        let max_changes = to.memory != from.memory;
        if to.memory < from.memory {
            let usage = self.usage(cg)?.unwrap_or(0);
            if usage > to.memory {
                return Err(CgroupError::Write {
                    path: self.h.dir(cg).join("memory.max"),
                    value: limit_value(to.memory),
                    source: io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
            if let Some(h) = high {
                self.write(cg, "memory.high", &limit_value(h))?;
            }
            return self.write(cg, "memory.max", &limit_value(to.memory));
        }
        if max_changes {
            self.write(cg, "memory.max", &limit_value(to.memory))?;
        }
        if let Some(h) = high {
            self.write(cg, "memory.high", &limit_value(h))?;
        }
        Ok(())
    }

    /// Asks `memory.reclaim` for everything in use, in requests of at most
    /// [`RECLAIM_CHUNK`]: the kernel reclaims what it can and answers EAGAIN when it
    /// could not reach a request (the usual outcome: recorded as [`ReclaimEnd::Short`],
    /// not a failure). The whole is bounded by `timeout`: the kernel checks for a pending
    /// signal only between its reclaim passes, and one pass goes for the whole amount
    /// asked (on 6.1, 300 MiB into zram swap under emulation took 4.5 s in one pass), so
    /// small requests are what lets the bound ([`write_bounded`]) end it in time.
    fn reclaim(&self, cg: &CgroupPath, timeout: Duration) -> Result<Option<Reclaimed>> {
        let Some(before) = self.usage(cg)? else {
            return Ok(None);
        };
        let path = self.h.dir(cg).join("memory.reclaim");
        let start = Instant::now();
        let mut done = 0u64;
        let end = loop {
            if done >= before {
                break ReclaimEnd::Finished;
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break ReclaimEnd::TimedOut;
            }
            let ask = (before - done).min(RECLAIM_CHUNK);
            let value = ask.to_string();
            let res = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .and_then(|f| write_bounded(&f, value.as_bytes(), left));
            match res {
                Ok(false) => done += ask,
                Ok(true) => break ReclaimEnd::TimedOut,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break ReclaimEnd::Short,
                Err(e) if super::io_is_gone(&e) && !self.h.dir(cg).is_dir() => return Ok(None),
                Err(source) => {
                    return Err(CgroupError::Write {
                        path,
                        value,
                        source,
                    })
                }
            }
        };
        let took = start.elapsed();
        let after = self.usage(cg)?.unwrap_or(before);
        Ok(Some(Reclaimed {
            before,
            after,
            requested: Some(before),
            end,
            took,
        }))
    }

    fn procs(&self, cg: &CgroupPath) -> Result<Option<Vec<i32>>> {
        read_parsed(&self.h.dir(cg), "cgroup.procs", "pids", parse::pids)
    }

    fn stat(&self, cg: &CgroupPath) -> Result<Option<BTreeMap<String, u64>>> {
        read_parsed(
            &self.h.dir(cg),
            "memory.stat",
            "memory.stat",
            parse::flat_keyed,
        )
    }

    fn register_stall(&self, cg: &CgroupPath, psi: Option<&PsiTrigger>) -> Result<StallWatch> {
        let dir = self.h.dir(cg);
        let events = dir.join("memory.events");
        let f = std::fs::File::open(&events).map_err(|source| CgroupError::Read {
            path: events.clone(),
            source,
        })?;
        let mut fds = vec![StallFd::new(f.into(), StallSource::Events)];
        if let Some(t) = psi {
            use std::io::Write;
            let path = dir.join("memory.pressure");
            let line = t.kernel_line();
            let err = |source| CgroupError::Write {
                path: path.clone(),
                value: line.clone(),
                source,
            };
            // The trigger lives as long as this open file.
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(err)?;
            f.write_all(line.as_bytes()).map_err(err)?;
            fds.push(StallFd::new(f.into(), StallSource::Pressure));
        }
        Ok(StallWatch { fds })
    }

    fn oom_probe(&self, cg: &CgroupPath) -> Result<Option<OomProbe>> {
        let dir = self.h.dir(cg);
        if !dir.is_dir() {
            return Ok(None);
        }
        let probe = EventsProbe {
            dir: dir.clone(),
            last: Cell::new(None),
        };
        // Establish the baseline, so the first read after it can report a rise.
        probe.read()?;
        Ok(Some(OomProbe::custom(
            dir.join("memory.events"),
            Box::new(move || probe.read()),
        )))
    }

    fn kill_all(&self, cg: &CgroupPath) -> Result<bool> {
        match self.write(cg, "cgroup.kill", "1") {
            Ok(()) => Ok(true),
            // Before 5.14 there is no cgroup.kill: kill task by task.
            Err(e) if e.is_gone() && self.h.dir(cg).is_dir() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Kind;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    const MIB: u64 = 1 << 20;

    fn events(high: u64, max: u64, oom_kill: u64) -> String {
        format!("low 0\nhigh {high}\nmax {max}\noom 0\noom_kill {oom_kill}\noom_group_kill 0\n")
    }

    fn fake() -> (tempfile::TempDir, V2) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("app");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("memory.max"), format!("{}\n", 64 * MIB)).unwrap();
        std::fs::write(d.join("memory.high"), format!("{}\n", 58 * MIB)).unwrap();
        std::fs::write(d.join("memory.current"), format!("{}\n", 20 * MIB)).unwrap();
        std::fs::write(d.join("memory.events"), events(0, 0, 0)).unwrap();
        std::fs::write(d.join("memory.reclaim"), "").unwrap();
        std::fs::write(d.join("cgroup.procs"), "10\n11\n").unwrap();
        std::fs::write(d.join("cgroup.kill"), "").unwrap();
        std::fs::write(d.join("memory.stat"), "anon 4096\nfile 8192\n").unwrap();
        let v = V2::new(Hierarchy::fake(t.path(), Kind::V2));
        (t, v)
    }

    fn put(t: &tempfile::TempDir, file: &str, v: impl ToString) {
        std::fs::write(t.path().join("app").join(file), v.to_string()).unwrap();
    }

    fn get(t: &tempfile::TempDir, file: &str) -> String {
        std::fs::read_to_string(t.path().join("app").join(file)).unwrap()
    }

    fn app() -> CgroupPath {
        CgroupPath::new("/app")
    }

    #[test]
    fn reads_limits_usage_procs_stat() {
        let (_t, v) = fake();
        let l = v.limits(&app()).unwrap().unwrap();
        assert_eq!(
            l,
            Limits {
                memory: 64 * MIB,
                memsw: None,
                high: Some(58 * MIB)
            }
        );
        assert_eq!(v.usage(&app()).unwrap(), Some(20 * MIB));
        assert_eq!(v.procs(&app()).unwrap(), Some(vec![10, 11]));
        assert_eq!(v.stat(&app()).unwrap().unwrap()["file"], 8192);
    }

    #[test]
    fn max_reads_as_unlimited_and_is_written_as_max() {
        let (t, v) = fake();
        put(&t, "memory.high", "max\n");
        let l = v.limits(&app()).unwrap().unwrap();
        assert!(parse::is_unlimited(l.high.unwrap()));
        assert_eq!(limit_value(u64::MAX), "max");
        let to = Limits {
            high: Some(u64::MAX),
            ..l
        };
        v.set_limits(&app(), l, to).unwrap();
        assert_eq!(
            get(&t, "memory.high"),
            "max\n",
            "unchanged high not written"
        );
    }

    #[test]
    fn missing_cgroup_reads_none_and_controllerless_reads_unlimited() {
        let (t, v) = fake();
        let gone = CgroupPath::new("/gone");
        assert!(v.oom_state(&gone).unwrap().is_none());
        assert!(v.limits(&gone).unwrap().is_none());
        assert!(v.usage(&gone).unwrap().is_none());
        assert!(v.oom_probe(&gone).unwrap().is_none());
        // The root (no memory.max) is not gone: it exists and is never handled.
        let root = v.oom_state(&CgroupPath::root()).unwrap().unwrap();
        assert!(!root.oom_kill_disable && !root.under_oom);
        assert!(v.oom_probe(&CgroupPath::root()).unwrap().is_some());
        drop(t);
    }

    #[test]
    fn bad_content_is_a_parse_error_naming_the_file() {
        let (t, v) = fake();
        put(&t, "memory.max", "lots\n");
        let err = v.limits(&app()).unwrap_err();
        assert!(err.to_string().contains("memory.max"), "{err}");
        put(&t, "memory.max", "1024\n");
        put(&t, "memory.events", "high x\n");
        let err = v.oom_state(&app()).unwrap_err();
        assert!(err.to_string().contains("memory.events"), "{err}");
    }

    #[test]
    fn state_maps_max_to_handled_and_usage_at_high_to_stuck() {
        let (t, v) = fake();
        let st = v.oom_state(&app()).unwrap().unwrap();
        assert!(st.oom_kill_disable, "has a memory.max");
        assert!(!st.under_oom, "20 MiB of 58 MiB");
        put(&t, "memory.current", 58 * MIB - 4096);
        assert!(v.oom_state(&app()).unwrap().unwrap().under_oom);
        put(&t, "memory.high", "max\n");
        assert!(!v.oom_state(&app()).unwrap().unwrap().under_oom, "no high");
        put(&t, "memory.current", 64 * MIB);
        assert!(v.oom_state(&app()).unwrap().unwrap().under_oom, "at max");
        put(&t, "memory.max", "max\n");
        let st = v.oom_state(&app()).unwrap().unwrap();
        assert!(!st.oom_kill_disable && !st.under_oom);
    }

    #[test]
    fn probe_is_stuck_only_while_the_high_counter_rises_at_high() {
        let (t, v) = fake();
        put(&t, "memory.current", 58 * MIB);
        put(&t, "memory.events", events(5, 0, 0));
        let probe = v.oom_probe(&app()).unwrap().unwrap();
        // Baseline taken when opened: no rise yet.
        assert!(!probe.read().unwrap().unwrap().under_oom);
        put(&t, "memory.events", events(9, 0, 0));
        assert!(probe.read().unwrap().unwrap().under_oom, "rising at high");
        assert!(!probe.read().unwrap().unwrap().under_oom, "stopped rising");
        // Rising, but usage is well below high (the limit was raised meanwhile).
        put(&t, "memory.current", 10 * MIB);
        put(&t, "memory.events", events(12, 0, 0));
        assert!(!probe.read().unwrap().unwrap().under_oom);
        // The max counter rising at max counts too (no high set).
        put(&t, "memory.high", "max\n");
        put(&t, "memory.current", 64 * MIB);
        put(&t, "memory.events", events(12, 3, 1));
        let st = probe.read().unwrap().unwrap();
        assert!(st.under_oom);
        assert_eq!(st.oom_kill, 1);
        assert_eq!(
            st.rises,
            Some(EventRises {
                high: 0,
                max: 3,
                oom: 0,
                oom_kill: 1
            }),
            "rises since the previous read"
        );
        std::fs::remove_dir_all(t.path().join("app")).unwrap();
        assert!(probe.read().unwrap().is_none(), "gone");
    }

    #[test]
    fn raising_writes_both_limits_and_lowering_refuses_below_usage() {
        let (t, v) = fake();
        let old = v.limits(&app()).unwrap().unwrap();
        let up = Limits {
            memory: 80 * MIB,
            memsw: None,
            high: Some(74 * MIB),
        };
        v.set_limits(&app(), old, up).unwrap();
        assert_eq!(get(&t, "memory.max"), (80 * MIB).to_string());
        assert_eq!(get(&t, "memory.high"), (74 * MIB).to_string());
        // Usage above the old max: giving it back would make the kernel kill.
        put(&t, "memory.current", 70 * MIB);
        let err = v.set_limits(&app(), up, old).unwrap_err();
        assert!(err.is_busy(), "{err}");
        assert_eq!(get(&t, "memory.max"), (80 * MIB).to_string(), "untouched");
        assert_eq!(get(&t, "memory.high"), (74 * MIB).to_string(), "untouched");
        put(&t, "memory.current", 30 * MIB);
        v.set_limits(&app(), up, old).unwrap();
        assert_eq!(get(&t, "memory.max"), (64 * MIB).to_string());
        assert_eq!(get(&t, "memory.high"), (58 * MIB).to_string());
    }

    #[test]
    fn reclaim_asks_for_current_usage_and_kill_all_writes_cgroup_kill() {
        let (t, v) = fake();
        let r = v.reclaim(&app(), Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!((r.before, r.after, r.freed()), (20 * MIB, 20 * MIB, 0));
        assert_eq!((r.requested, r.end), (Some(20 * MIB), ReclaimEnd::Finished));
        // In requests of 8 MiB: 8, 8, then the last 4.
        assert_eq!(get(&t, "memory.reclaim"), (4 * MIB).to_string());
        assert!(v
            .reclaim(&CgroupPath::new("/gone"), Duration::from_secs(5))
            .unwrap()
            .is_none());
        assert!(v.kill_all(&app()).unwrap());
        assert_eq!(get(&t, "cgroup.kill"), "1");
        std::fs::remove_file(t.path().join("app/cgroup.kill")).unwrap();
        assert!(!v.kill_all(&app()).unwrap(), "old kernel: task by task");
        assert!(v.kill_all(&CgroupPath::new("/gone")).unwrap_err().is_gone());
    }

    /// `memory.reclaim` as a FIFO whose buffer is full: the write blocks as a long
    /// kernel reclaim does, and the bound must end it (the kernel's reclaim loop
    /// returns EINTR on the same signal, see the VM scenarios).
    #[test]
    fn reclaim_is_cut_short_by_its_timeout() {
        let (t, v) = fake();
        let fifo = t.path().join("app/memory.reclaim");
        std::fs::remove_file(&fifo).unwrap();
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Our end: a reader that never reads, with the pipe filled up.
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        while (&pipe).write(&[0u8; 4096]).is_ok() {}
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(v.reclaim(&app(), Duration::from_millis(100)));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the reclaim write was not bounded")
            .unwrap()
            .unwrap();
        assert_eq!(r.end, ReclaimEnd::TimedOut);
        assert!(r.took >= Duration::from_millis(100), "{r:?}");
        drop(pipe);
    }

    #[test]
    fn psi_trigger_parses_and_checks_the_kernel_bounds() {
        let t = PsiTrigger::parse("some 100ms 1s").unwrap();
        assert_eq!(t.kernel_line(), "some 100000 1000000");
        assert_eq!(
            PsiTrigger::parse("full 150ms 2s").unwrap().kernel_line(),
            "full 150000 2000000"
        );
        for bad in [
            "",
            "some 100ms",
            "most 100ms 1s",
            "some 100ms 100ms",
            "some 2s 1s",
            "some 0ms 1s",
            "some 1s 20s",
            "some x 1s",
        ] {
            assert!(PsiTrigger::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn register_stall_opens_events_and_writes_the_psi_trigger() {
        let (t, v) = fake();
        put(&t, "memory.pressure", "");
        let w = v.register_stall(&app(), None).unwrap();
        assert_eq!(w.fds.len(), 1);
        assert_eq!(w.fds[0].source(), StallSource::Events);
        assert!(w.fds[0].priority());
        w.fds[0].clear();
        let trig = PsiTrigger::parse("some 100ms 1s").unwrap();
        let w = v.register_stall(&app(), Some(&trig)).unwrap();
        assert_eq!(w.fds[1].source(), StallSource::Pressure);
        assert_eq!(get(&t, "memory.pressure"), "some 100000 1000000");
        assert!(v.register_stall(&CgroupPath::new("/gone"), None).is_err());
    }

    #[test]
    fn a_loan_raises_high_with_max_and_restores_both() {
        use crate::journal::Journal;
        use crate::loan::{Lend, LoanBook, Restore};
        use crate::policy::{Amount, Ceiling, Raise};
        let (t, v) = fake();
        put(&t, "memory.current", 58 * MIB);
        let jt = tempfile::tempdir().unwrap();
        let book = LoanBook::new(Some(Journal::open(jt.path()).unwrap())).with_page_size(4096);
        let raise = Raise {
            by: Amount::Percent(0.25),
            ceiling: Ceiling::MaxExtra(Amount::Percent(0.5)),
            hold: Duration::from_secs(60),
            restore_below: 0.9,
            restore_after: Duration::ZERO,
        };
        let l = book.lend(&v, &app(), "p", &raise, 1, 2, false).unwrap();
        assert_eq!(
            l,
            Lend::Raised {
                old: 64 * MIB,
                new: 80 * MIB
            }
        );
        assert_eq!(get(&t, "memory.max"), (80 * MIB).to_string());
        assert_eq!(
            get(&t, "memory.high"),
            (74 * MIB).to_string(),
            "same headroom"
        );
        let recs = Journal::open(jt.path()).unwrap().load().unwrap();
        assert_eq!(recs[0].original.high, Some(58 * MIB));
        assert_eq!(recs[0].lent.high, Some(74 * MIB));
        // Still above the original max: v2 would kill, so nothing is given back yet.
        put(&t, "memory.current", 70 * MIB);
        assert_eq!(book.restore(&v, &app()).unwrap(), Restore::DoesNotFit);
        assert_eq!(get(&t, "memory.max"), (80 * MIB).to_string());
        put(&t, "memory.current", 40 * MIB);
        assert_eq!(
            book.restore(&v, &app()).unwrap(),
            Restore::Restored {
                old: 80 * MIB,
                new: 64 * MIB
            }
        );
        assert_eq!(get(&t, "memory.max"), (64 * MIB).to_string());
        assert_eq!(get(&t, "memory.high"), (58 * MIB).to_string());
    }
}
